"""Checkpoint files in ``--output_dir``: atomic writes, step and epoch files, pruning.

    checkpoint_<epoch>.pth        after every epoch (kept)
    checkpoint_step<step>.pth     every --save_every_steps steps and on preemption (the newest
                                  --keep_step_checkpoints are kept)
    checkpoint_latest.pth         the newest of all of them (what --resume auto loads)
    checkpoint_best.pth           the epoch checkpoint with the best validation r_mean

Every file is written to a temporary name and renamed into place, so a process killed while
writing leaves the previous file intact; ``latest`` and ``best`` are hard links when the file
system allows.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

LATEST = "checkpoint_latest.pth"
BEST = "checkpoint_best.pth"
_STEP_FILE = re.compile(r"checkpoint_step(\d+)\.pth")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, then rename it into place."""
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


def link_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` the same checkpoint as ``src`` (a hard link when possible, else a copy), atomically."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: str | Path) -> dict:
    """Load on the CPU; tensors are moved by the modules that receive them."""
    return torch.load(path, map_location="cpu", weights_only=False)


class CheckpointDir:
    """The checkpoints of one run (written by rank 0 only)."""

    def __init__(self, output_dir: str | Path, keep_step_checkpoints: int = 2) -> None:
        self.dir = Path(output_dir)
        self.keep = keep_step_checkpoints

    def latest(self) -> Path | None:
        """The newest checkpoint: the epoch or step file ``checkpoint_latest.pth`` links to (the
        link itself where the file system made a copy), None when there is none."""
        path = self.dir / LATEST
        if not path.is_file():
            return None
        for candidate in sorted(self.dir.glob("checkpoint_*.pth")):
            if candidate.name not in (LATEST, BEST) and candidate.samefile(path):
                return candidate
        return path

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a process killed while writing: never complete, never needed."""
        for tmp in self.dir.glob(".checkpoint_*.tmp"):
            tmp.unlink(missing_ok=True)

    def save_step(self, state: dict, step: int) -> Path:
        path = self.dir / f"checkpoint_step{step}.pth"
        save_checkpoint(state, path)
        link_checkpoint(path, self.dir / LATEST)
        self._prune_steps()
        return path

    def save_epoch(self, state: dict, epoch: int, is_best: bool) -> Path:
        path = self.dir / f"checkpoint_{epoch}.pth"
        save_checkpoint(state, path)
        link_checkpoint(path, self.dir / LATEST)
        if is_best:
            link_checkpoint(path, self.dir / BEST)
        return path

    def _prune_steps(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_FILE.fullmatch(p.name)))
        for _, path in steps[: max(0, len(steps) - self.keep)]:
            path.unlink(missing_ok=True)
