"""AdamW with the usual no-decay groups, and the per-step learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def param_groups(model: nn.Module, extra: nn.Module | None, weight_decay: float) -> list[dict]:
    """Decay only weight matrices: never norms, biases, temperatures, position/class tokens.

    ``extra``: the loss, whose trainable parameters (a temperature, temperature networks) come
    in its own groups (``param_groups()``: never decayed, some with their own learning rate).
    """
    skip = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):  # timm's convention (pos_embed, cls_token, ...)
            skip |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    own = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return own + (extra.param_groups() if extra is not None else [])


def build_optimizer(
    opt: str, model: nn.Module, loss_fn: nn.Module | None, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``--opt adamw``: AdamW, fused (one kernel for all parameters, on CPU and CUDA), which also
    lets the trainer skip a step on the device (``found_inf``) without a host sync."""
    if opt != "adamw":
        raise ValueError(f"unknown --opt {opt!r}; use adamw")
    return torch.optim.AdamW(param_groups(model, loss_fn, weight_decay), lr=lr, fused=True)


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float, cosine: bool) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched: str,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at
    ``total_steps`` (or constant). Call ``step()`` once per optimiser step."""
    factor = functools.partial(
        _lr_factor, warmup=warmup_steps, total=total_steps, min_ratio=min_lr / lr, cosine=sched == "cosine"
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
