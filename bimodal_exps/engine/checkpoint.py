"""Checkpoint files: written atomically, found again for --resume auto."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

LATEST = "checkpoint_latest.pth"
BEST = "checkpoint_best.pth"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, then rename it into place, so a
    crash mid-write leaves the previous file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the same checkpoint as ``src`` (a hard link when possible, else a copy)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: str | Path) -> dict:
    """Load on the CPU; tensors are moved by the modules that receive them."""
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    path = Path(output_dir) / LATEST
    return path if path.is_file() else None
