"""Snapshots of learned per-sample temperatures: arrays for analysis and a histogram plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state


def save_temperatures(
    temperatures: dict[str, tuple[torch.Tensor, torch.Tensor]], output_dir: str | Path, epoch: int
) -> Path:
    """Write ``temperatures/epoch_<epoch>.npz`` (per modality: sample indices and tau) and a
    histogram ``epoch_<epoch>.png``; returns the .npz path."""
    folder = Path(output_dir) / "temperatures"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (idx, tau) in temperatures.items():
        arrays[f"{name}_index"], arrays[f"{name}_tau"] = idx.numpy(), tau.float().numpy()
    path = folder / f"epoch_{epoch}.npz"
    np.savez_compressed(path, **arrays)

    fig = Figure(figsize=(5 * len(temperatures), 3.2))
    axes = fig.subplots(1, len(temperatures), squeeze=False)
    for ax, (name, (_, tau)) in zip(axes[0], temperatures.items(), strict=True):
        values = tau.float().numpy()
        if len(values):
            low, high = values.min(), values.max()
            high = max(high, low * 1.5)  # all equal (e.g. every tau at tau_min): still a valid range
            ax.hist(values, bins=np.geomspace(low, high, 40))
            ax.set_xscale("log")
        ax.set_title(f"{name} temperatures after epoch {epoch} (n={len(values)})")
        ax.set_xlabel("tau")
        ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(folder / f"epoch_{epoch}.png", dpi=100)
    return path
