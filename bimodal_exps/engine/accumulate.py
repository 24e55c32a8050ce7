"""Exact gradient accumulation (ALGORITHMS.md 10): K micro-batches per rank, one step of the loss
on the whole ``K x b x W`` batch, with the encoders' activations of one micro-batch in memory.

A global contrastive loss couples every pair of the batch, so per-micro-batch losses summed
are a different (smaller-batch) objective. Instead, in three phases:

1. embed every micro-batch without autograd and keep the features (``K x b x d`` floats);
2. compute the loss on all of them at once (gathered across ranks as usual): its state update
   (each index written once) and, by back-propagation to the features as leaves, the feature
   gradients and the loss's own parameter gradients;
3. embed each micro-batch again with autograd, from the random state the first pass had
   (dropout draws the same masks), and back-propagate its slice of the feature gradients.

The encoders' parameter gradients are then exactly those of one step on the concatenated batch
(the backward is linear in the incoming gradient). Buffers that a forward in training mode
changes (BatchNorm running statistics) keep the values of the first pass: updated once per
micro-batch. With several ranks the gradients are averaged here, once per step, as DDP would
(the DDP wrapper is not used on this path).
"""

from __future__ import annotations

import torch

import parallel
from engine.step import ContrastiveStep
from models.losses import LossOutput


def accumulate_gradients(step: ContrastiveStep, micro_batches: list[dict], scale) -> LossOutput:
    """Back-propagate one step's loss over ``micro_batches`` (each a dict of image, input_ids,
    attention_mask, image_idx, text_idx of ``b`` samples, on the device) into the parameters'
    ``.grad`` (which the caller has zeroed).

    ``scale``: applied to the loss before back-propagation (the fp16 grad scaler's
    ``scale``; identity otherwise). Returns the loss output of the whole ``K x b`` local batch;
    its state update is not committed.
    """
    devices = [t.device for t in micro_batches[0].values() if t.device.type == "cuda"][:1]
    rng_states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_rng_state(devices))
            image_feat, text_feat = step.embed(micro["image"], micro["input_ids"], micro["attention_mask"])
            image_parts.append(image_feat)
            text_parts.append(text_feat)
    image_feat = torch.cat(image_parts).requires_grad_(True)
    text_feat = torch.cat(text_parts).requires_grad_(True)
    out = step.loss_on(
        image_feat,
        text_feat,
        torch.cat([m["image_idx"] for m in micro_batches]),
        torch.cat([m["text_idx"] for m in micro_batches]),
    )
    scale(out.loss).backward()
    image_grads = image_feat.grad.split([len(p) for p in image_parts])
    text_grads = text_feat.grad.split([len(p) for p in text_parts])

    buffers = [b.detach().clone() for b in step.model.buffers()]
    for micro, rng, image_grad, text_grad in zip(micro_batches, rng_states, image_grads, text_grads, strict=True):
        with torch.random.fork_rng(devices=devices):
            _set_rng_state(rng, devices)
            again = step.embed(micro["image"], micro["input_ids"], micro["attention_mask"])
            torch.autograd.backward(again, (image_grad, text_grad))
    with torch.no_grad():
        for buffer, first_pass in zip(step.model.buffers(), buffers, strict=True):
            buffer.copy_(first_pass)
    parallel.average_gradients([p for p in step.parameters() if p.requires_grad])
    return out


def _rng_state(devices: list[torch.device]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in zip(devices, cuda, strict=True):
        torch.cuda.set_rng_state(value, device)
