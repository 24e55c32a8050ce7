"""Plots of a run folder: training curves, recall over epochs, learned temperatures.

    python bimodal_exps/plot.py RUN_DIR [--out DIR]      (default: RUN_DIR/plots)

Reads what a run writes (README "What a run writes") and writes
``training.png``   one panel per quantity present in ``log.jsonl`` (loss, GCL estimate, mean
                   temperatures, lr, the loss's other statistics) against the step;
``recall.png``     ``r_mean`` and the six recalls (and zero-shot accuracy) of each evaluated
                   dataset in ``eval.jsonl`` against the epoch (-1: the untrained model);
``temperatures.png`` histograms of the per-sample temperatures of every ``temperatures/epoch_<e>`` snapshot
                   (whole, or in the parts of an owner-sharded run).
A plot whose input is missing is left out; a folder without ``log.jsonl`` is an error (exit 2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # no pyplot: renders with Agg, no GUI backend or global state
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from engine.temperatures import read_temperatures, snapshot_epochs

# training panels: (title, log.jsonl keys drawn in it); a panel appears when any of its keys does
TRAINING_PANELS = (
    ("loss", ("loss",)),
    ("GCL estimate", ("gcl_I", "gcl_T")),
    ("mean temperature", ("tau_I", "tau_T", "temp")),
    ("mean temperature gradient", ("grad_tau_I", "grad_tau_T")),
    ("learning rate", ("lr",)),
    ("gamma (moving-average weight)", ("gamma",)),
    ("eta (temperature step size)", ("eta",)),
    ("SigLIP scale", ("scale",)),
    ("SigLIP bias", ("bias",)),
    ("CyCLIP terms", ("cyclip_in", "cyclip_cross")),
    ("VICReg terms", ("invariance", "variance", "covariance")),
)
# eval.jsonl metrics and their line styles (image->text solid, text->image dashed)
EVAL_STYLES = {
    "r_mean": dict(color="black", linewidth=2.0),
    "txt_r1": dict(color="C0"),
    "txt_r5": dict(color="C1"),
    "txt_r10": dict(color="C2"),
    "img_r1": dict(color="C0", linestyle="--"),
    "img_r5": dict(color="C1", linestyle="--"),
    "img_r10": dict(color="C2", linestyle="--"),
    "zs_top1": dict(color="C3"),
    "zs_top5": dict(color="C4"),
}
# the evaluations of training (eval.jsonl tags); later --evaluate runs are left out
TRAINING_TAGS = ("untrained", "epoch", "final")
SPLIT_ORDER = {"val": 0, "test": 1, "zeroshot": 2}


class RunFolderError(Exception):
    """The folder is not a run folder (no training records)."""


def read_records(path: Path) -> list[dict]:
    """The JSON lines of a record file; a line that does not parse (torn by a kill mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _grid(n: int, width: float, height: float, columns: int = 3) -> tuple[Figure, list]:
    """A figure with ``n`` axes in rows of at most ``columns``; unused cells are hidden."""
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_training(records: list[dict], path: Path) -> Path:
    """Each known quantity of the training records against the step, epoch ends marked."""
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in TRAINING_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    epoch_ends = [a["step"] for a, b in itertools.pairwise(records) if a["epoch"] != b["epoch"]]
    fig, axes = _grid(len(panels), 4.5, 3.0)
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), label=key)
        for step in epoch_ends:
            ax.axvline(step, color="grey", linewidth=0.5, alpha=0.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_recall(records: list[dict], path: Path) -> Path | None:
    """Metrics of each evaluated dataset (val, test, zero-shot) against the epoch; None when there are none.
    An epoch evaluated twice (its epoch-end test and the final test) is drawn once."""
    by_dataset: dict[tuple[str, str], dict[int, dict]] = {}
    for r in records:
        if r.get("tag") in TRAINING_TAGS and any(k in r for k in EVAL_STYLES):
            by_dataset.setdefault((r["dataset"], r["split"]), {})[r["epoch"]] = r
    if not by_dataset:
        return None
    panels = sorted(by_dataset.items(), key=lambda item: SPLIT_ORDER.get(item[0][1], len(SPLIT_ORDER)))
    fig, axes = _grid(len(panels), 5.0, 3.5)
    for ax, ((dataset, split), by_epoch) in zip(axes, panels, strict=True):
        epochs = sorted(by_epoch)
        for key, style in EVAL_STYLES.items():
            if any(key in r for r in by_epoch.values()):
                ax.plot(epochs, [by_epoch[e].get(key, np.nan) for e in epochs], marker="o", label=key, **style)
        ax.set_title(f"{dataset} ({split})")
        ax.set_xlabel("epoch (-1: untrained)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("%")
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_temperatures(folder: Path, path: Path) -> Path | None:
    """Per modality, the histogram of the learned temperatures after each epoch (colour: epoch, log
    scale, shared bins); None when the folder holds no snapshots."""
    epochs = snapshot_epochs(folder)
    taus: dict[str, dict[int, np.ndarray]] = {}
    for epoch in list(epochs):
        try:
            snapshot = read_temperatures(folder, epoch)
        except FileNotFoundError as e:  # the parts of a running sharded run, still being written
            print(f"skipped: {e}", file=sys.stderr)
            epochs.remove(epoch)
            continue
        for side, (_, tau) in snapshot.items():
            if tau.size:
                taus.setdefault(side, {})[epoch] = tau
    if not taus:
        return None
    colours = ScalarMappable(Normalize(min(epochs), max(max(epochs), min(epochs) + 1)), "viridis")
    fig, axes = _grid(len(taus), 5.5, 3.5)
    for ax, (name, by_epoch) in zip(axes, taus.items(), strict=True):
        low = min(v.min() for v in by_epoch.values())
        high = max(max(v.max() for v in by_epoch.values()), low * 1.5)  # all equal: still a valid range
        bins = np.geomspace(low, high, 40)
        for epoch, values in by_epoch.items():
            ax.hist(values, bins=bins, histtype="step", color=colours.to_rgba(epoch))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{name} temperatures")
        ax.set_xlabel("tau")
        ax.set_ylabel("samples")
        fig.colorbar(colours, ax=ax, label="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def make_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the plots of ``run_dir`` to ``out_dir`` (default ``run_dir/plots``); returns the files
    written. Raises RunFolderError when ``run_dir`` has no training records."""
    run_dir = Path(run_dir)
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise RunFolderError(f"{log_path} not found: RUN_DIR must be a run's --output_dir")
    records = read_records(log_path)
    if not records:
        raise RunFolderError(f"{log_path} holds no training records yet (the run logs every --log_every steps)")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_training(records, out / "training.png")]
    eval_path = run_dir / "eval.jsonl"
    if eval_path.is_file():
        written.append(plot_recall(read_records(eval_path), out / "recall.png"))
    written.append(plot_temperatures(run_dir / "temperatures", out / "temperatures.png"))
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's --output_dir")
    parser.add_argument("--out", type=Path, default=None, help="where to write the plots (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.run_dir, args.out)
    except RunFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
