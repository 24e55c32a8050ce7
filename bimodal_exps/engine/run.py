"""A whole run: where it starts, the epoch loop with an evaluation after every epoch, the best
model, epoch checkpoints, the final evaluation, and stopping on request.

Epochs are numbered from 0 everywhere: ``log.jsonl``'s ``epoch`` is the epoch a step belongs
to; ``checkpoint_<e>.pth``, ``temperatures/epoch_<e>.*`` and the ``eval.jsonl`` lines tagged
``epoch`` are written when epoch ``e`` has ended; ``eval.jsonl``'s ``epoch`` is the last
epoch completed before the evaluation (-1: none, the untrained model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import parallel
from engine.checkpoint import BEST
from engine.resume import choose_resume, load_on_every_rank
from engine.step import broadcast_buffers
from engine.temperatures import save_temperatures
from engine.trainer import Trainer
from evaluation.retrieval import format_recall_table
from evaluation.suite import EvalSuite

log = logging.getLogger("clip")


@dataclass
class StartingPoint:
    """The checkpoint a run takes its weights from, the same on every rank.

    ``state``: the loaded checkpoint, or None (new weights); ``path``: its file; ``resume``:
    whether training continues it (else its weights only: ``--checkpoint``).
    """

    state: dict | None = None
    path: str | None = None
    resume: bool = False

    @property
    def run_dir(self) -> str | None:
        """The folder of the run that wrote the checkpoint."""
        return str(Path(self.path).parent) if self.path else None


def starting_point(*, evaluate: bool, resume: str | None, checkpoint: str | None, output_dir: str) -> StartingPoint:
    """Evaluating: ``checkpoint`` (or nothing: the initial model). Training: the checkpoint that
    ``resume`` names (``"auto"``: the newest in ``output_dir``, chosen by rank 0), else the
    weights of ``checkpoint``, else none. A collective call."""
    if evaluate:
        return StartingPoint(load_on_every_rank(checkpoint, "evaluate"), checkpoint) if checkpoint else StartingPoint()
    path = choose_resume(resume, output_dir)
    if path is not None:
        return StartingPoint(load_on_every_rank(path, "resume"), path, resume=True)
    if checkpoint:
        return StartingPoint(load_on_every_rank(checkpoint, "initialise the model"), checkpoint)
    return StartingPoint()


def log_results(rows: list[tuple[str, dict[str, float]]]) -> None:
    """The recall table, then other metrics (zero-shot) one line each; rank 0 logs."""
    if not parallel.is_main_process():
        return
    lines = [format_recall_table([(name, m) for name, m in rows if "r_mean" in m])]
    lines += [f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) for name, m in rows if "r_mean" not in m]
    log.info("results\n%s", "\n".join(lines))


def evaluate(model, suite: EvalSuite, start: StartingPoint) -> None:
    """Evaluate the starting point's weights (or the initial model) on the val and test splits."""
    epoch, step = -1, 0
    if start.state is not None:
        model.load_state_dict(start.state["model"])
        epoch, step = start.state["progress"]["epoch"] - 1, start.state["progress"]["step"]
        log.info("evaluating %s (after epoch %d, step %d)", start.path, epoch, step)
    log_results(list(suite(model, ("val", "test"), "evaluate", epoch, step).items()))


def train(
    trainer: Trainer,
    data,
    suite: EvalSuite,
    *,
    epochs: int,
    eval_test_every_epoch: bool,
    output_dir: str,
    start: StartingPoint,
) -> bool:
    """Train (or continue) the run to ``epochs`` epochs; False when a stop request ended it
    after a checkpoint. Learned temperatures go to ``output_dir/temperatures``."""
    progress, model, loss_fn = trainer.progress, trainer.model, trainer.loss_fn
    if start.resume:
        trainer.load_state_dict(start.state, start.run_dir, data)
        trainer.run_log.resume_at(progress.step)
        log.info(
            "resumed from %s: epoch %d, step %d (%d into the epoch), %d samples seen",
            start.path,
            progress.epoch,
            progress.step,
            progress.epoch_step,
            progress.samples_seen,
        )
    elif start.state is not None:
        model.load_state_dict(start.state["model"])
        log.info("initialised the model from %s", start.path)
    table = []
    if not start.resume:
        untrained = suite(model, ("test",), "untrained", -1, 0)
        table += [(f"untrained {name}", m) for name, m in untrained.items()]

    while progress.epoch < epochs:
        epoch = progress.epoch
        if not trainer.train_epoch(data):
            return False
        broadcast_buffers(model)  # every rank evaluates rank 0's BatchNorm statistics
        kinds = ("val", "test") if eval_test_every_epoch else ("val",)
        results = suite(model, kinds, "epoch", epoch, progress.step, zeroshot=False)
        for name, m in results.items():
            log.info("epoch %d %s: r_mean %.2f", epoch, name, m["r_mean"])
        val = [results[s.name]["r_mean"] for s in suite.splits if s.kind == "val"]
        is_best = not val or val[0] > trainer.best["r_mean"]  # every rank holds the same metrics
        if is_best:
            trainer.best = {"r_mean": val[0] if val else -1.0, "epoch": epoch}
        trainer.save_epoch_checkpoint(epoch, is_best)
        if hasattr(loss_fn, "temperatures"):  # a collective call: each rank writes what it holds
            sharded = loss_fn.shards is not None
            save_temperatures(loss_fn.temperatures(), output_dir, epoch, sharded=sharded, device=trainer.device)
        if parallel.any_rank(trainer.stop.requested, device=trainer.device)[0]:
            log.warning("stopping after epoch %d (checkpoint saved)", epoch)
            return False

    broadcast_buffers(model)
    final = suite(model, ("test",), "final", progress.epoch - 1, progress.step)
    log_results(table + [(f"final {name}", m) for name, m in final.items()])
    if trainer.best["epoch"] >= 0 and suite.has("val"):
        log.info("best validation r_mean %.2f at epoch %d (%s)", trainer.best["r_mean"], trainer.best["epoch"], BEST)
    return True
