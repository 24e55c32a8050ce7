"""The module a training step runs: the two encoders and the loss, under one DDP wrapper.

The loss's learnable parameters (a temperature) are parameters of the same module as the
encoders, so DistributedDataParallel averages their gradients with the model's; the loss's
per-sample state buffers are excluded from DDP's buffer broadcasts (the losses keep them
identical on every rank themselves). The encoders run under autocast, the loss in float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import parallel
from models.losses import ContrastiveLoss, LossOutput


class ContrastiveStep(nn.Module):
    """``forward(image, input_ids, attention_mask, image_idx, text_idx)`` -> :class:`LossOutput`
    of this rank's local batch (image [b, 3, H, W], tokens and mask [b, L], indices [b])."""

    def __init__(self, model: nn.Module, loss: ContrastiveLoss, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.loss, self.amp_dtype = model, loss, amp_dtype

    def forward(self, image, input_ids, attention_mask, image_idx, text_idx) -> LossOutput:
        return self.loss_on(*self.embed(image, input_ids, attention_mask), image_idx, text_idx)

    def embed(self, image, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text features [b, d], float32, from the encoders under autocast."""
        with torch.autocast(image.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            image_feat, text_feat = self.model(image, input_ids, attention_mask, self.loss.normalized_features)
        return image_feat.float(), text_feat.float()

    def loss_on(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        with torch.autocast(image_feat.device.type, enabled=False):  # the loss always runs in float32
            return self.loss.compute(image_feat, text_feat, image_idx, text_idx)


def wrap_for_training(step: ContrastiveStep, device: torch.device) -> nn.Module:
    """DDP around ``step`` when several ranks train; the module itself in one process."""
    if parallel.world_size() == 1:
        return step
    state_buffers = [f"loss.{name}" for name, _ in step.loss.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, state_buffers)
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward, so after the last step of an epoch every
    rank holds its own; evaluation and checkpoints use rank 0's, on every rank.
    """
    if parallel.world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
