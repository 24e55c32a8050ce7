"""The training loop and everything a run's exact continuation depends on.

``Trainer`` owns the model, loss, optimiser, LR schedule and grad scaler, the progress
counters, the data position within the epoch and the random states, and turns all of them
into one checkpoint (``state_dict``) and back. Between steps it handles what must not lose a
researcher's work: a stop signal (checkpoint, then stop), a non-finite loss or gradient (skip
the step; stop after too many in a row) and bad input samples (counted; stop when too many).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import parallel
from engine.checkpoint import CheckpointDir
from engine.preemption import StopRequest
from engine.run_log import RunLog

log = logging.getLogger("clip")


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps or bad samples); the message says why."""


@dataclass
class Progress:
    """Where the run is: ``epoch`` is the epoch in progress (or next), ``epoch_step`` the steps
    done in it, ``step`` all optimiser steps, ``samples_seen`` all samples over all ranks,
    ``skipped_steps`` the steps skipped for a non-finite loss or gradient."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0


class BadData:
    """Bad samples the loaders skipped, per kind and per shard, summed over ranks when checked."""

    def __init__(self, max_fraction: float, min_samples: int = 1000) -> None:
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.kinds: Counter = Counter()
        self.shards: Counter = Counter()
        self.good = 0

    def add(self, batch: dict) -> None:
        self.kinds.update(batch.get("skipped", {}))
        self.shards.update(batch.get("skipped_shards", {}))
        self.good += len(batch["image_idx"])

    def state_dict(self) -> dict:
        return {"kinds": dict(self.kinds), "shards": dict(self.shards), "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.kinds, self.shards, self.good = Counter(state["kinds"]), Counter(state["shards"]), state["good"]

    def totals(self) -> tuple[Counter, Counter, int]:
        """Counts over all ranks (a collective call)."""
        if parallel.world_size() == 1:
            return self.kinds, self.shards, self.good
        parts = [None] * parallel.world_size()
        dist.all_gather_object(parts, (self.kinds, self.shards, self.good))
        kinds, shards, good = Counter(), Counter(), 0
        for k, s, g in parts:
            kinds.update(k)
            shards.update(s)
            good += g
        return kinds, shards, good

    def check(self) -> dict[str, int]:
        """Total bad samples per kind; raises TrainingError when too large a fraction failed."""
        kinds, shards, good = self.totals()
        bad = sum(n for kind, n in kinds.items() if kind != "bad_shard")  # that one counts shards, not samples
        if bad and bad + good >= self.min_samples and bad / (bad + good) > self.max_fraction:
            shard, count = shards.most_common(1)[0] if shards else ("unknown", bad)
            raise TrainingError(
                f"{bad} of {bad + good} samples ({100 * bad / (bad + good):.1f}%) could not be used "
                f"({dict(kinds)}), more than --max_bad_fraction {self.max_fraction}; the worst shard is {shard} "
                f"({count} bad samples). Fix or remove the bad shards, or raise --max_bad_fraction"
            )
        return dict(kinds)


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (a collective call)."""
    if parallel.world_size() == 1:
        return [obj]
    parts = [None] * parallel.world_size()
    dist.all_gather_object(parts, obj)
    return parts


class Trainer:
    """One run's training state and loop; every rank holds one."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        device: torch.device,
        run_log: RunLog,
        checkpoints: CheckpointDir,
        stop: StopRequest,
        log_every: int,
        grad_clip: float = 0.0,
        save_every_steps: int = 0,
        max_bad_fraction: float = 0.1,
        max_nonfinite_steps: int = 20,
        config: dict | None = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler, self.scaler = (
            model,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
        )
        self.ddp_model = DistributedDataParallel(model) if parallel.world_size() > 1 else model
        self.amp_dtype, self.device, self.run_log, self.checkpoints, self.stop = (
            amp_dtype,
            device,
            run_log,
            checkpoints,
            stop,
        )
        self.log_every, self.grad_clip, self.save_every_steps = log_every, grad_clip, save_every_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.config = config or {}
        self.progress = Progress()
        self.best = {"r_mean": -1.0, "epoch": -1}
        self.data_position: dict | None = None
        self.bad_data = BadData(max_bad_fraction)
        self._params = [p for p in [*model.parameters(), *loss_fn.parameters()] if p.requires_grad]
        self._nonfinite_in_a_row = 0
        self.last_log: dict | None = None  # the latest log.jsonl record

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the run depends on. A collective call: the per-rank parts (data position,
        random states, bad-sample counts) of every rank are gathered into the one state."""
        per_rank = _gather_objects(
            {
                "data_position": self.data_position,
                "rng": _rng_state(self.device),
                "bad_data": self.bad_data.state_dict(),
            }
        )
        return {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "best": dict(self.best),
            "world_size": parallel.world_size(),
            "per_rank": per_rank,
            "config": self.config,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; with another number of ranks the epoch in progress restarts."""
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        vars(self.progress).update(state["progress"])  # in place: callers may hold self.progress
        self.best = dict(state["best"])
        if state["world_size"] == parallel.world_size():
            mine = state["per_rank"][parallel.rank()]
            self.data_position = mine["data_position"]
            self.bad_data.load_state_dict(mine["bad_data"])
            _set_rng_state(mine["rng"], self.device)
        elif self.progress.epoch_step:
            log.warning(
                "the checkpoint was written by %d ranks, this run has %d: epoch %d restarts from its first "
                "batch (its %d finished steps stay trained)",
                state["world_size"],
                parallel.world_size(),
                self.progress.epoch,
                self.progress.epoch_step,
            )
            self.progress.epoch_step, self.data_position = 0, None

    def save_step_checkpoint(self) -> None:
        state = self.state_dict()  # every rank takes part
        if parallel.is_main_process():
            path = self.checkpoints.save_step(state, self.progress.step)
            log.info("saved %s", path)

    def save_epoch_checkpoint(self, epoch: int, is_best: bool) -> None:
        state = self.state_dict()
        if parallel.is_main_process():
            self.checkpoints.save_epoch(state, epoch, is_best)

    # ---- the loop ----------------------------------------------------------------------

    def train_epoch(self, data, steps: int) -> bool:
        """Continue the current epoch up to ``steps`` steps (all ranks stop together when any
        rank's data runs out). Returns False when a stop signal ended it early (after saving a
        checkpoint), True when the epoch is complete."""
        progress = self.progress
        self.model.train()
        self.loss_fn.train()
        self.loss_fn.set_epoch(progress.epoch)
        data.set_epoch(progress.epoch, self.data_position)
        world = parallel.world_size()
        bar = parallel.progress_bar(total=steps, initial=progress.epoch_step, desc=f"epoch {progress.epoch}")
        window = _Window(self.device)
        iterator = iter(data.loader)
        try:
            while progress.epoch_step < steps:
                wait_start = time.perf_counter()
                batch = next(iterator, None)
                ran_dry, stop = parallel.any_rank(batch is None, self.stop.requested, device=self.device)
                if stop:
                    log.warning(
                        "%s: saving a checkpoint at step %d and stopping",
                        self.stop.signal_name or "a stop signal on another rank",
                        progress.step,
                    )
                    self.save_step_checkpoint()
                    return False
                if ran_dry:  # some rank's data ran out: the epoch ends for all
                    break
                window.data_wait += time.perf_counter() - wait_start
                self.data_position = data.advance(self.data_position, batch)
                self.bad_data.add(batch)
                loss, stats = self._step(batch)
                progress.step += 1
                progress.epoch_step += 1
                progress.samples_seen += len(batch["image_idx"]) * world
                window.add(loss, len(batch["image_idx"]) * world)
                bar.update(1)
                if progress.step % self.log_every == 0 or progress.epoch_step == steps:
                    self._log(window, stats, bar)
                    window = _Window(self.device)
                if self.save_every_steps and progress.step % self.save_every_steps == 0 and progress.epoch_step < steps:
                    self.save_step_checkpoint()
        finally:
            bar.close()
            del iterator  # shuts the loader's workers down
        progress.epoch += 1
        progress.epoch_step = 0
        self.data_position = None
        return True

    def _step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Forward, loss, backward, optimiser step; a non-finite gradient skips the update."""
        to = {
            k: batch[k].to(self.device, non_blocking=True)
            for k in ("image", "input_ids", "attention_mask", "image_idx", "text_idx")
        }
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
            image_feat, text_feat = self.ddp_model(to["image"], to["input_ids"], to["attention_mask"])
        # float32 inside; a non-finite feature leaves the loss state untouched
        loss, stats = self.loss_fn(image_feat, text_feat, to["image_idx"], to["text_idx"])

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._average_loss_param_grads()
        self.scaler.unscale_(self.optimizer)
        # DDP has averaged the gradients, so every rank sees the same norm and takes the same decision
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip if self.grad_clip > 0 else math.inf)
        if torch.isfinite(norm):
            self.scaler.step(self.optimizer)
            self._nonfinite_in_a_row = 0
        else:
            self.progress.skipped_steps += 1
            self._nonfinite_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", self.progress.step)
            if self._nonfinite_in_a_row > self.max_nonfinite_steps:
                raise TrainingError(
                    f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (the last "
                    f"before step {self.progress.step + 1}); lower --lr, use --grad_clip, check the data, or "
                    "use --precision bf16/fp32 instead of fp16"
                )
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), stats

    def _average_loss_param_grads(self) -> None:
        """DDP averages the model's gradients; a loss's own parameters (a learnable
        temperature) live outside DDP, so average theirs here the same way."""
        if parallel.world_size() == 1:
            return
        for p in self.loss_fn.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= parallel.world_size()

    def _log(self, window: _Window, stats: dict, bar: tqdm) -> None:
        progress = self.progress
        elapsed = time.perf_counter() - window.start
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "epoch_step": progress.epoch_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": parallel.all_reduce_mean(float(window.loss) / window.steps, self.device),
            **{k: parallel.all_reduce_mean(v, self.device) for k, v in stats.items()},
            "samples_per_s": window.samples / elapsed,
            "data_wait_s": window.data_wait / window.steps,
            "samples_seen": progress.samples_seen,
            "skipped_steps": progress.skipped_steps,
        }
        if self.scaler.is_enabled():
            record["amp_scale"] = self.scaler.get_scale()
        skipped = self.bad_data.check()
        if skipped:
            record["skipped_samples"] = skipped
        self.run_log.train(record)
        self.last_log = record
        bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}")


class _Window:
    """Sums between two log lines."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples
