"""Run records: log.jsonl, eval.jsonl, TensorBoard events and the text log (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

RECORDS = ("log.jsonl", "eval.jsonl")


def setup_logging(output_dir: str | Path | None, is_main: bool) -> None:
    """Console and ``output_dir/train.log`` handlers (rank 0); other ranks log warnings only."""
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


def _records(path: Path) -> list[str]:
    """The complete JSON lines of a record file; a line torn by a kill mid-write (it can only be
    the last) is dropped with a warning."""
    lines = [line if line.endswith("\n") else line + "\n" for line in path.read_text().splitlines() if line.strip()]
    complete = []
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            logging.getLogger("clip").warning(
                "%s: dropping line %d, torn by an interrupted write: %r", path, number, line[:80]
            )
            continue
        complete.append(line)
    return complete


class RunLog:
    """Appends JSON lines and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, output_dir: str | Path, enabled: bool) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None

    def resume_at(self, step: int) -> None:
        """Continue a run from a checkpoint of ``step``: drop the records written after it (the
        interrupted run got further than its last checkpoint), so each file reads as one run."""
        if not self.enabled:
            return
        for name in RECORDS:
            path = self.dir / name
            if path.is_file():
                kept = [line for line in _records(path) if json.loads(line).get("step", 0) <= step]
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)
        self._purge_step = step + 1

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            self._writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=self._purge_step)
        return self._writer

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, record: dict) -> None:
        """One training line: {"step", "epoch", "lr", "loss", ...}."""
        if not self.enabled:
            return
        self._append("log.jsonl", record)
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def eval(self, record: dict, step: int) -> None:
        """One evaluation line: {"dataset", "split", "tag", "epoch", "step", metrics...}."""
        if not self.enabled:
            return
        self._append("eval.jsonl", record)
        for key, value in record.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"{record['dataset']}_{record['split']}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
