"""Run records: log.jsonl, eval.jsonl, TensorBoard events and the text log (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("clip")


def setup_logging(output_dir: str | Path | None, is_main: bool) -> None:
    """Console (rank 0) and ``output_dir/train.log`` (rank 0) handlers for every logger."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_main and output_dir is not None:
        handler = logging.FileHandler(Path(output_dir) / "train.log")
        handler.setFormatter(fmt)
        root.addHandler(handler)


class RunLog:
    """Appends JSON lines and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.writer = SummaryWriter(str(self.dir / "tensorboard")) if enabled and tensorboard else None

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, record: dict) -> None:
        """One training line: {"step", "epoch", "lr", "loss", ...}."""
        if not self.enabled:
            return
        self._append("log.jsonl", record)
        if self.writer:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def eval(self, record: dict, step: int) -> None:
        """One evaluation line: {"dataset", "split", "epoch", metrics...}."""
        if not self.enabled:
            return
        self._append("eval.jsonl", record)
        if self.writer:
            for key, value in record.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"{record['dataset']}_{record['split']}/{key}", value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
