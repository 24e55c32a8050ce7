"""The training step, the epoch loop, and everything a run's exact continuation depends on.

``Trainer`` owns the model and loss (one module under DDP, see ``engine.step``), the
optimiser, LR schedule and grad scaler, the progress counters, the data position within the
epoch and the random states, and turns all of them into one checkpoint (``state_dict``) and
back. Between steps it handles what must not lose a researcher's work: a stop signal
(checkpoint, then stop), a non-finite loss or gradient or an fp16 overflow (skip the step,
leaving parameters, optimiser and loss state as they were; stop after too many non-finite
steps in a row) and bad input samples (counted; stop when too many).

Host-device synchronisation: a step that does not log reads nothing from the device. The
skip decision stays on the device (the fused optimiser skips its update, the loss state is
committed under the same flag); counters are read at log steps and checkpoints. With several
ranks a stop request is shared every ``STOP_POLL_STEPS`` steps.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import parallel
from engine.accumulate import accumulate_gradients
from engine.checkpoint import CheckpointDir, read_shard, shard_file_name
from engine.resume import CheckpointError
from engine.run_log import RunLog
from engine.step import ContrastiveStep, broadcast_buffers, wrap_for_training
from engine.stop import StopRequest
from models.losses import ContrastiveLoss, LossOutput

log = logging.getLogger("clip")

STOP_POLL_STEPS = 10  # steps between the all-reduces that share a stop request among ranks
BATCH_TENSORS = ("image", "input_ids", "attention_mask", "image_idx", "text_idx")


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps or bad samples); the message says why."""


@dataclass
class Progress:
    """Where the run is: ``epoch`` is the 0-based epoch in progress (so, between epochs, the
    number of epochs done), ``epoch_step`` the steps done in it, ``step`` all optimiser steps,
    ``samples_seen`` all samples over all ranks, ``skipped_steps`` the steps skipped for a
    non-finite loss or gradient, ``amp_skipped_steps`` those the fp16 grad scaler skipped for
    an overflow."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    amp_skipped_steps: int = 0


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
        kinds, shards, good = Counter(), Counter(), 0
        for k, s, g in parallel.gather_objects((self.kinds, self.shards, self.good)):
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


class _Outcomes:
    """What the steps did, counted on the device (read at log steps and checkpoints).

    ``skipped``: steps with a non-finite loss, loss state or gradient (without fp16 loss
    scaling, a non-finite gradient); ``amp_skipped``: steps whose loss was finite but whose
    fp16-scaled gradient overflowed; ``longest_run``: the longest run of skipped steps in a row
    since the last read; ``loss_sum`` / ``loss_steps``: the finite losses since the last read.
    """

    def __init__(self, device: torch.device, scaled: bool) -> None:
        self.scaled = scaled

        def zero(dtype=torch.long):
            return torch.zeros((), dtype=dtype, device=device)

        self.skipped, self.amp_skipped, self.in_a_row, self.longest_run = zero(), zero(), zero(), zero()
        self.loss_sum, self.loss_steps = zero(torch.float64), zero()

    def add(self, loss: torch.Tensor, loss_ok: torch.Tensor, ok: torch.Tensor) -> None:
        skipped = ~ok & ~loss_ok if self.scaled else ~ok
        self.skipped += skipped
        if self.scaled:
            self.amp_skipped += ~ok & loss_ok
        self.in_a_row = torch.where(skipped, self.in_a_row + 1, 0)
        self.longest_run = torch.maximum(self.longest_run, self.in_a_row)
        self.loss_sum += torch.where(loss_ok, loss.double(), 0.0)
        self.loss_steps += loss_ok

    def read(self) -> dict[str, float]:
        """The counters as numbers (one device sync); the loss sums and the run length restart."""
        names = ("skipped", "amp_skipped", "longest_run", "loss_sum", "loss_steps")
        values = dict(zip(names, torch.stack([getattr(self, n).double() for n in names]).tolist(), strict=True))
        self.loss_sum.zero_()
        self.loss_steps.zero_()
        self.longest_run.copy_(self.in_a_row)
        return values

    def restore(self, skipped: int, amp_skipped: int) -> None:
        self.skipped.fill_(skipped)
        self.amp_skipped.fill_(amp_skipped)


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


class Trainer:
    """One run's training state and loop; every rank holds one."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: ContrastiveLoss,
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
        accum_freq: int = 1,
        config: dict | None = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler, self.scaler = (
            model,
            loss_fn,
            optimizer,
            scheduler,
            scaler,
        )
        self.step_module = ContrastiveStep(model, loss_fn, amp_dtype)
        self.ddp = wrap_for_training(self.step_module, device)
        self.device, self.run_log, self.checkpoints, self.stop = device, run_log, checkpoints, stop
        self.log_every, self.grad_clip, self.save_every_steps = log_every, grad_clip, save_every_steps
        self.max_nonfinite_steps, self.accum_freq = max_nonfinite_steps, accum_freq
        self.config = config or {}
        self.progress = Progress()
        self.best = {"r_mean": -1.0, "epoch": -1}
        self.data_position: dict | None = None
        self.bad_data = BadData(max_bad_fraction)
        self.outcomes = _Outcomes(device, scaled=scaler.is_enabled())
        self._params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.last_log: dict | None = None  # the latest log.jsonl record

    # ---- checkpoints -------------------------------------------------------------------

    def _sync_progress(self) -> dict[str, float]:
        """Read the device counters into ``progress`` (a device sync); returns them."""
        counts = self.outcomes.read()
        self.progress.skipped_steps = int(counts["skipped"])
        self.progress.amp_skipped_steps = int(counts["amp_skipped"])
        return counts

    def state_dict(self) -> dict:
        """Everything the run depends on, whole (owner-sharded per-sample arrays gathered onto
        rank 0: see ``ContrastiveLoss.state_dict``). A collective call."""
        return self._state(self.loss_fn.state_dict())

    def _state(self, loss_state: dict) -> dict:
        """The checkpoint around ``loss_state``. A collective call: rank 0's model buffers are
        broadcast first (so every rank goes on with the checkpoint's BatchNorm statistics), and
        the per-rank parts (data position, random states, bad-sample counts) of every rank are
        gathered into the one state."""
        broadcast_buffers(self.model)
        counts = self._sync_progress()
        self._check_nonfinite_run(counts)
        per_rank = parallel.gather_objects(
            {
                "data_position": self.data_position,
                "rng": _rng_state(self.device),
                "bad_data": self.bad_data.state_dict(),
            }
        )
        return {
            "model": self.model.state_dict(),
            "loss": loss_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "best": dict(self.best),
            "world_size": parallel.world_size(),
            "accum_freq": self.accum_freq,
            "per_rank": per_rank,
            "config": self.config,
        }

    def load_state_dict(self, state: dict, directory: str | Path | None = None, data=None) -> None:
        """Restore a checkpoint (``directory``: its folder, which holds the loss state shard
        files its ``loss_shards`` manifest names; a collective call then). Written by another
        number of ranks or with another ``--accum_freq``, the epoch in progress continues where
        this run's ``data`` can take it up at the same global place (``TrainData.rebase``: the
        same global batch, caption JSON), else it restarts from its first batch."""
        self.model.load_state_dict(state["model"])
        if "loss_shards" in state:
            self._load_loss_shards(state, Path(directory))
        else:
            self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        vars(self.progress).update(state["progress"])  # in place: callers may hold self.progress
        self.outcomes.restore(self.progress.skipped_steps, self.progress.amp_skipped_steps)
        self.best = dict(state["best"])
        saved_world, saved_accum = state["world_size"], state.get("accum_freq", 1)  # older checkpoints: 1
        if saved_world == parallel.world_size() and saved_accum == self.accum_freq:
            mine = state["per_rank"][parallel.rank()]
            self.data_position = mine["data_position"]
            self.bad_data.load_state_dict(mine["bad_data"])
            _set_rng_state(mine["rng"], self.device)
            return
        if not self.progress.epoch_step:
            return
        saved = state["per_rank"][0]["data_position"]
        self.data_position = None if data is None or saved is None else data.rebase(saved, saved_accum, self.accum_freq)
        what = (
            f"the checkpoint was written by {saved_world} ranks with --accum_freq {saved_accum}, this run has "
            f"{parallel.world_size()} and {self.accum_freq}"
        )
        if self.data_position is not None:
            log.warning(
                "%s: epoch %d continues after its %d finished steps with the same global batches (random "
                "states and bad-sample counts start afresh)",
                what,
                self.progress.epoch,
                self.progress.epoch_step,
            )
            return
        log.warning(
            "%s: epoch %d restarts from its first batch (its %d finished steps stay trained; only caption-JSON "
            "data with the same global batch continues mid-epoch)",
            what,
            self.progress.epoch,
            self.progress.epoch_step,
        )
        self.progress.epoch_step = 0

    def _load_loss_shards(self, state: dict, directory: Path) -> None:
        """The loss state from the checkpoint and the shard files of the ranks that wrote it,
        read one at a time; every rank raises CheckpointError when one rank cannot."""
        manifest, step = state["loss_shards"], state["progress"]["step"]
        error = None
        try:
            self.loss_fn.load_checkpoint_parts(
                state["loss"], lambda r: read_shard(directory / manifest["files"][r], step), manifest["world"]
            )
        except Exception as err:  # every rank must hear of it, or the others wait in the next collective
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        problems = [f"rank {r}: {e}" for r, e in enumerate(parallel.gather_objects(error)) if e]
        if problems:
            raise CheckpointError(
                f"cannot load the loss state shards ({', '.join(manifest['files'])}) in {directory}: "
                f"{'; '.join(problems)}; every rank must see every shard file of the checkpoint",
                parallel.rank(),
            )

    def save_step_checkpoint(self) -> None:
        step = self.progress.step
        path = self._save(self.checkpoints.step_name(step), lambda state: self.checkpoints.save_step(state, step))
        if path is not None:
            log.info("saved %s", path)

    def save_epoch_checkpoint(self, epoch: int, is_best: bool) -> None:
        self._save(self.checkpoints.epoch_name(epoch), lambda state: self.checkpoints.save_epoch(state, epoch, is_best))

    def _save(self, name: str, write: Callable[[dict], Path]) -> Path | None:
        """Checkpoint ``name`` (a collective call). Owner-sharded loss state: every rank first
        writes its shard to a file of its own (so that no rank gathers the whole state); then
        rank 0 writes the checkpoint with ``write``, its ``loss_shards`` manifest naming them.
        Returns the path on rank 0."""
        loss_state, shard = self.loss_fn.checkpoint_parts()
        state = self._state(loss_state)
        if shard is not None:
            rank, world, error = parallel.rank(), parallel.world_size(), None
            try:
                self.checkpoints.save_shard({"step": self.progress.step, "arrays": shard}, name, rank, world)
            except OSError as err:
                error = f"rank {rank}: {err}"
            errors = [e for e in parallel.gather_objects(error) if e]
            if errors:
                raise TrainingError(f"cannot write the loss state shards of {name}: {'; '.join(errors)}")
            state["loss_shards"] = {"world": world, "files": [shard_file_name(name, r, world) for r in range(world)]}
        return write(state) if parallel.is_main_process() else None

    # ---- the loop ----------------------------------------------------------------------

    def steps_per_epoch(self, batches: int) -> int:
        """Optimiser steps in an epoch of ``batches`` batches per rank (``accum_freq`` each; the
        last ``batches % accum_freq`` batches are left out)."""
        return batches // self.accum_freq

    def train_epoch(self, data) -> bool:
        """Continue the current epoch to its end: ``steps_per_epoch(data.steps_per_epoch)``
        steps of ``accum_freq`` batches, the same on every rank. Returns False when a stop
        signal ended it early (after saving a checkpoint), True when the epoch is complete."""
        progress = self.progress
        steps = self.steps_per_epoch(data.steps_per_epoch)
        self.step_module.train()
        self.loss_fn.set_epoch(progress.epoch)
        data.set_epoch(progress.epoch, self.data_position)
        world = parallel.world_size()
        bar = parallel.progress_bar(total=steps, initial=progress.epoch_step, desc=f"epoch {progress.epoch}")
        window = _Window(progress.step)
        iterator = iter(data.loader)
        try:
            while progress.epoch_step < steps:
                if self._stop_requested():
                    log.warning(
                        "%s: saving a checkpoint at step %d and stopping",
                        self.stop.signal_name or "a stop signal on another rank",
                        progress.step,
                    )
                    self.save_step_checkpoint()
                    return False
                micro_batches = []
                for _ in range(self.accum_freq):
                    wait_start = time.perf_counter()
                    batch = next(iterator, None)
                    if batch is None:
                        raise TrainingError(
                            f"rank {parallel.rank()}: the training data ended after {progress.epoch_step} of the "
                            f"{steps} steps of epoch {progress.epoch}"
                        )
                    window.data_wait += time.perf_counter() - wait_start
                    self.data_position = data.advance(self.data_position, batch)
                    self.bad_data.add(batch)
                    micro_batches.append(batch)
                out = self._step(micro_batches)
                samples = sum(len(batch["image_idx"]) for batch in micro_batches) * world
                progress.step += 1
                progress.epoch_step += 1
                progress.samples_seen += samples
                window.steps += 1
                window.samples += samples
                bar.update(1)
                if progress.step % self.log_every == 0 or progress.epoch_step == steps:
                    self._log(window, out, bar)
                    window = _Window(progress.step)
                if self.save_every_steps and progress.step % self.save_every_steps == 0 and progress.epoch_step < steps:
                    self.save_step_checkpoint()
        finally:
            bar.close()
            del iterator  # shuts the loader's workers down
        progress.epoch += 1
        progress.epoch_step = 0
        self.data_position = None
        return True

    def _stop_requested(self) -> bool:
        """Whether to stop before the next step; every rank gets the same answer at the same step."""
        if parallel.world_size() == 1:
            return self.stop.requested
        if self.progress.step % STOP_POLL_STEPS:
            return False
        return parallel.any_rank(self.stop.requested, device=self.device)[0]

    def _step(self, micro_batches: list[dict]) -> LossOutput:
        """Forward, loss, backward, optimiser step on the concatenation of ``micro_batches``
        (one: through DDP; several: ``engine.accumulate``, exactly the same step). A non-finite
        loss, loss state or gradient (or an fp16 overflow) skips the update and leaves the loss
        state as it was; the decision stays on the device."""
        inputs = [{k: batch[k].to(self.device, non_blocking=True) for k in BATCH_TENSORS} for batch in micro_batches]
        self.optimizer.zero_grad(set_to_none=True)
        if len(inputs) == 1:
            out = self.ddp(**inputs[0])
            self.scaler.scale(out.loss).backward()
        else:
            out = accumulate_gradients(self.step_module, inputs, self.scaler.scale)
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        # DDP has averaged the gradients, so every rank sees the same norm and takes the same decision
        loss_ok = torch.isfinite(out.loss) & out.update.finite
        ok = loss_ok & torch.isfinite(norm)
        self._optimizer_step(ok)
        self.scaler.update()  # lowers the fp16 scale after an overflow, which unscale_ recorded
        self.scheduler.step()
        out.update.commit(ok)
        self.outcomes.add(out.loss.detach(), loss_ok, ok)
        return out

    def _optimizer_step(self, ok: torch.Tensor) -> None:
        """The update, only where ``ok`` (0-dim bool tensor) holds."""
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # fused optimisers skip their update on the device when found_inf is set (the
            # protocol torch's GradScaler uses): parameters, moments and step count stay put
            self.optimizer.found_inf = (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif ok:  # other optimisers: the decision is read on the host
            self.optimizer.step()

    def _check_nonfinite_run(self, counts: dict[str, float]) -> None:
        if counts["longest_run"] > self.max_nonfinite_steps:
            raise TrainingError(
                f"{int(counts['longest_run'])} steps in a row had a non-finite loss or gradient (by step "
                f"{self.progress.step}); lower --lr, use --grad_clip, check the data, or use --precision "
                "bf16/fp32 instead of fp16"
            )

    def _log(self, window: _Window, out: LossOutput, bar: tqdm) -> None:
        progress = self.progress
        before = (progress.skipped_steps, progress.amp_skipped_steps)
        counts = self._sync_progress()
        skipped, amp_skipped = progress.skipped_steps - before[0], progress.amp_skipped_steps - before[1]
        if skipped:
            log.warning(
                "steps %d-%d: %d step(s) skipped for a non-finite loss or gradient",
                window.first_step + 1,
                progress.step,
                skipped,
            )
        if amp_skipped:
            log.info(
                "steps %d-%d: the fp16 grad scaler skipped %d step(s) (an overflow; expected while the scale "
                "settles), scale now %g",
                window.first_step + 1,
                progress.step,
                amp_skipped,
                self.scaler.get_scale(),
            )
        self._check_nonfinite_run(counts)
        loss = counts["loss_sum"] / counts["loss_steps"] if counts["loss_steps"] else math.nan
        means = parallel.mean_over_ranks({"loss": loss, **out.stats}, self.device)
        elapsed = time.perf_counter() - window.start
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "epoch_step": progress.epoch_step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **means,
            "samples_per_s": window.samples / elapsed,
            "data_wait_s": window.data_wait / window.steps,
            "samples_seen": progress.samples_seen,
            "skipped_steps": progress.skipped_steps,
        }
        if self.scaler.is_enabled():
            record["amp_skipped_steps"] = progress.amp_skipped_steps
            record["amp_scale"] = self.scaler.get_scale()
        skipped_samples = self.bad_data.check()
        if skipped_samples:
            record["skipped_samples"] = skipped_samples
        self.run_log.train(record)
        self.last_log = record
        bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}")


@dataclass
class _Window:
    """Host-side sums between two log lines."""

    first_step: int
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()
