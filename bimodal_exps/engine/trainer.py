"""One training epoch: forward, loss, backward, optimiser and schedule steps, logging."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import parallel
from engine.run_log import RunLog


@dataclass
class Progress:
    """Counters that checkpoints carry: the 0-based epoch and the number of optimiser steps."""

    epoch: int = 0
    step: int = 0


def _average_loss_param_grads(loss_fn: nn.Module) -> None:
    """DDP averages the model's gradients; a loss's own parameters (a learnable
    temperature) live outside DDP, so average theirs here the same way."""
    if parallel.world_size() == 1:
        return
    for p in loss_fn.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= parallel.world_size()


def _to_float(value) -> float:
    return float(value.item()) if torch.is_tensor(value) else float(value)


def train_one_epoch(
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    loader,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    progress: Progress,
    run_log: RunLog,
    log_every: int,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """Run at most ``steps`` optimiser steps over ``loader``; all ranks stop together when any
    rank's data runs out. Returns the epoch's mean loss and throughput."""
    model.train()
    loss_fn.train()
    world = parallel.world_size()
    bar = tqdm(
        total=steps,
        desc=f"epoch {progress.epoch}",
        disable=not parallel.is_main_process(),
        dynamic_ncols=True,
    )
    iterator = iter(loader)
    loss_sum = torch.zeros((), device=device)
    window = {"loss": torch.zeros((), device=device), "steps": 0, "samples": 0, "data_wait": 0.0}
    skipped: Counter = Counter()
    epoch_steps, epoch_start, window_start = 0, time.perf_counter(), time.perf_counter()
    for _ in range(steps):
        wait_start = time.perf_counter()
        batch = next(iterator, None)
        if not parallel.all_ranks_true(batch is not None, device):
            break
        window["data_wait"] += time.perf_counter() - wait_start
        skipped.update(batch.get("skipped", {}))
        images = batch["image"].to(device, non_blocking=True)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        image_idx = batch["image_idx"].to(device, non_blocking=True)
        text_idx = batch["text_idx"].to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            image_feat, text_feat = model(images, input_ids, attention_mask)
        loss, stats = loss_fn(image_feat, text_feat, image_idx, text_idx)  # float32 inside

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        _average_loss_param_grads(loss_fn)
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        progress.step += 1
        epoch_steps += 1
        loss_sum += loss.detach()
        window["loss"] += loss.detach()
        window["steps"] += 1
        window["samples"] += images.shape[0] * world
        bar.update(1)
        if progress.step % log_every == 0 or epoch_steps == steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": progress.step,
                "epoch": progress.epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "loss": parallel.all_reduce_mean(_to_float(window["loss"]) / window["steps"], device),
                **{k: parallel.all_reduce_mean(_to_float(v), device) for k, v in stats.items()},
                "samples_per_s": window["samples"] / elapsed,
                "data_wait_s": window["data_wait"] / window["steps"],
            }
            if skipped:
                record["skipped"] = dict(skipped)
            run_log.train(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.0f}")
            window = {"loss": torch.zeros((), device=device), "steps": 0, "samples": 0, "data_wait": 0.0}
            window_start = time.perf_counter()
    bar.close()
    del iterator  # shuts the loader's workers down
    elapsed = time.perf_counter() - epoch_start
    return {
        "loss": parallel.all_reduce_mean(_to_float(loss_sum) / max(1, epoch_steps), device),
        "steps": epoch_steps,
        "samples_per_s": epoch_steps * world * (images.shape[0] if epoch_steps else 0) / elapsed,
        "skipped": dict(skipped),
    }
