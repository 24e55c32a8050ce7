"""Snapshots of learned per-sample temperatures: arrays for analysis and a histogram plot.

After epoch ``e`` the run writes ``temperatures/epoch_<e>.npz`` (per modality: ``<m>_index``,
the dataset indices of the samples seen so far, and ``<m>_tau``, their temperatures). With
owner-sharded state no rank holds every temperature, so each rank writes the indices it owns
to ``epoch_<e>.part-<r>-of-<W>.npz`` instead; :func:`read_temperatures` reads either form.
The histogram ``epoch_<e>.png`` is drawn by rank 0 from counts summed over the ranks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

import parallel

BINS = 40
_SNAPSHOT = re.compile(r"epoch_(\d+)(?:\.part-(\d+)-of-(\d+))?\.npz")


def save_temperatures(
    temperatures: dict[str, tuple[torch.Tensor, torch.Tensor]],
    output_dir: str | Path,
    epoch: int,
    *,
    sharded: bool,
    device: torch.device | str = "cpu",
) -> None:
    """Write epoch ``epoch``'s snapshot of what this rank holds (``loss.temperatures()``:
    name -> (indices [n], tau [n]) on the host): rank 0 the whole one, or, ``sharded``, every
    rank its part; then the histogram. A collective call (two all-reduces of 2 x modalities and
    ``BINS`` x modalities values on ``device``), which every rank makes."""
    folder = Path(output_dir) / "temperatures"
    rank, world = parallel.rank(), parallel.world_size()
    mine = sharded or rank == 0  # replicated, the other ranks hold copies of rank 0's values
    names = [f"epoch_{epoch}.part-{r}-of-{world}.npz" for r in range(world)] if sharded and world > 1 else None
    if rank == 0 and folder.is_dir():  # another form of this epoch's snapshot (a resume on another W)
        for stale in folder.glob(f"epoch_{epoch}.*npz"):
            if stale.name not in (names or [f"epoch_{epoch}.npz"]):
                stale.unlink()
    if mine:
        folder.mkdir(parents=True, exist_ok=True)
        name = names[rank] if names else f"epoch_{epoch}.npz"
        arrays = {}
        for side, (idx, tau) in temperatures.items():
            arrays[f"{side}_index"], arrays[f"{side}_tau"] = idx.numpy(), tau.float().numpy()
        np.savez_compressed(folder / name, **arrays)

    # shared log-spaced bins from the global range, then the counts of every rank's part
    values = {side: tau.float().numpy() if mine else np.zeros(0, np.float32) for side, (_, tau) in temperatures.items()}
    bounds = torch.tensor(
        [[-v.min(), v.max()] if len(v) else [-np.inf, -np.inf] for v in values.values()], dtype=torch.float64
    )
    bounds = parallel.max_over_ranks(bounds.to(device)).cpu().numpy()
    counts, edges = [], []
    for v, (neg_low, high) in zip(values.values(), bounds, strict=True):
        low = -neg_low
        if np.isfinite(low):
            bins = np.geomspace(low, max(high, low * 1.5), BINS)  # all equal (tau_min): still a range
            counts.append(np.histogram(v, bins)[0])
        else:  # no sample seen on any rank
            bins = None
            counts.append(np.zeros(BINS - 1, np.int64))
        edges.append(bins)
    total = parallel.sum_over_ranks(torch.tensor(np.stack(counts)).to(device)).cpu().numpy()
    if rank == 0:
        _draw_histograms(dict(zip(values, zip(edges, total, strict=True), strict=True)), folder, epoch)


def _draw_histograms(histograms: dict[str, tuple[np.ndarray | None, np.ndarray]], folder: Path, epoch: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5 * len(histograms), 3.2))
    axes = fig.subplots(1, len(histograms), squeeze=False)
    for ax, (side, (bins, counts)) in zip(axes[0], histograms.items(), strict=True):
        if bins is not None:
            ax.stairs(counts, bins, fill=True)
            ax.set_xscale("log")
        ax.set_title(f"{side} temperatures after epoch {epoch} (n={int(counts.sum())})")
        ax.set_xlabel("tau")
        ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(folder / f"epoch_{epoch}.png", dpi=100)


def snapshot_epochs(folder: str | Path) -> list[int]:
    """The epochs that have a snapshot (whole or in parts) in a run's ``temperatures`` folder."""
    found = (_SNAPSHOT.fullmatch(p.name) for p in Path(folder).glob("epoch_*.npz"))
    return sorted({int(m.group(1)) for m in found if m})


def read_temperatures(folder: str | Path, epoch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Epoch ``epoch``'s snapshot, name -> (indices [n] ascending, tau [n]), from the whole
    file or from every part of a sharded run (for analysis: this holds all of them)."""
    folder = Path(folder)
    whole = folder / f"epoch_{epoch}.npz"
    if whole.exists():
        paths = [whole]
    else:
        parts = {}
        for p in folder.glob(f"epoch_{epoch}.part-*.npz"):
            m = _SNAPSHOT.fullmatch(p.name)
            if m and int(m.group(1)) == epoch:
                parts[(int(m.group(2)), int(m.group(3)))] = p
        worlds = {w for _, w in parts}
        if not parts:
            raise FileNotFoundError(f"no temperature snapshot of epoch {epoch} in {folder}")
        if len(worlds) != 1 or len(parts) != next(iter(worlds)):
            raise FileNotFoundError(
                f"the temperature snapshot of epoch {epoch} in {folder} is incomplete: parts "
                f"{sorted(p.name for p in parts.values())}"
            )
        paths = [parts[key] for key in sorted(parts)]
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in paths:
        with np.load(path) as arrays:
            for key in arrays.files:
                if key.endswith("_index"):
                    side = key.removesuffix("_index")
                    pieces.setdefault(side, []).append((arrays[key], arrays[f"{side}_tau"]))
    out = {}
    for side, parts_of_side in pieces.items():
        idx = np.concatenate([i for i, _ in parts_of_side])
        tau = np.concatenate([t for _, t in parts_of_side])
        order = np.argsort(idx, kind="stable")
        out[side] = (idx[order], tau[order])
    return out
