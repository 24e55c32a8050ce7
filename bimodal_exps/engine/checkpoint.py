"""Checkpoint files in ``--output_dir``: atomic writes, step and epoch files, pruning.

    checkpoint_<epoch>.pth        after every epoch (kept)
    checkpoint_step<step>.pth     every --save_every_steps steps and on preemption (the newest
                                  --keep_step_checkpoints are kept)
    checkpoint_latest.pth         the newest of all of them (what --resume auto loads)
    checkpoint_best.pth           the epoch checkpoint with the best validation r_mean
    <checkpoint>.state-<r>-of-<W>.pth
                                  with owner-sharded loss state (``--state_sharding owner``):
                                  rank r's shard of the per-sample arrays, written by that rank
                                  before rank 0 writes the checkpoint itself, whose
                                  ``loss_shards`` manifest names them (``latest`` and ``best``
                                  name the same files)

Every file is written to a temporary name and renamed into place, so a process killed while
writing leaves the previous file intact; ``latest`` and ``best`` are hard links when the file
system allows.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

import torch

LATEST = "checkpoint_latest.pth"
BEST = "checkpoint_best.pth"
_STEP_FILE = re.compile(r"checkpoint_step(\d+)\.pth")
_SHARD_FILE = re.compile(r"(checkpoint_.+)\.state-\d+-of-\d+\.pth")


def shard_file_name(checkpoint_name: str, rank: int, world: int) -> str:
    """``checkpoint_step10.pth`` -> ``checkpoint_step10.state-1-of-2.pth``: rank 1's loss state shard."""
    return f"{checkpoint_name.removesuffix('.pth')}.state-{rank}-of-{world}.pth"


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


def read_shard(path: str | Path, step: int) -> dict[str, torch.Tensor]:
    """The per-sample arrays of a loss state shard file, which must belong to step ``step``."""
    shard = load_checkpoint(path)
    if shard.get("step") != step:
        raise ValueError(f"{path} holds the loss state of step {shard.get('step')}, the checkpoint is of step {step}")
    return shard["arrays"]


class CheckpointDir:
    """The checkpoints of one run: written by rank 0, loss state shards by their ranks."""

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
        """Temporary files of a process killed while writing, and shard files whose checkpoint
        was never written (killed between the two): never complete, never needed."""
        for tmp in self.dir.glob(".checkpoint_*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in self.dir.glob("checkpoint_*.state-*-of-*.pth"):
            m = _SHARD_FILE.fullmatch(path.name)
            if m and not (self.dir / f"{m.group(1)}.pth").exists():
                path.unlink(missing_ok=True)

    @staticmethod
    def step_name(step: int) -> str:
        return f"checkpoint_step{step}.pth"

    @staticmethod
    def epoch_name(epoch: int) -> str:
        return f"checkpoint_{epoch}.pth"

    def save_shard(self, shard: dict, checkpoint_name: str, rank: int, world: int) -> str:
        """Write rank ``rank``'s loss state shard of the checkpoint ``checkpoint_name`` (each
        rank its own, before rank 0 writes the checkpoint); returns the file's name."""
        name = shard_file_name(checkpoint_name, rank, world)
        save_checkpoint(shard, self.dir / name)
        return name

    def save_step(self, state: dict, step: int) -> Path:
        path = self._save(state, self.step_name(step))
        link_checkpoint(path, self.dir / LATEST)
        self._prune_steps()
        return path

    def save_epoch(self, state: dict, epoch: int, is_best: bool) -> Path:
        path = self._save(state, self.epoch_name(epoch))
        link_checkpoint(path, self.dir / LATEST)
        if is_best:
            link_checkpoint(path, self.dir / BEST)
        return path

    def _save(self, state: dict, name: str) -> Path:
        """The checkpoint ``name``; then the shard files of its name that its manifest does not
        name go (left by an earlier run with another number of ranks)."""
        path = self.dir / name
        save_checkpoint(state, path)
        self._remove_shards(name, keep=set(state.get("loss_shards", {}).get("files", ())))
        return path

    def _remove_shards(self, checkpoint_name: str, keep: Collection[str] = ()) -> None:
        for shard in self.dir.glob(f"{checkpoint_name.removesuffix('.pth')}.state-*-of-*.pth"):
            if shard.name not in keep:
                shard.unlink(missing_ok=True)

    def _prune_steps(self) -> None:
        steps = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_FILE.fullmatch(p.name)))
        for _, path in steps[: max(0, len(steps) - self.keep)]:
            path.unlink(missing_ok=True)
            self._remove_shards(path.name)
