"""A tiny model, fixed batches and a Trainer around them: the real training loop without the data
pipeline (tested on its own), for tests of the loop itself."""

from __future__ import annotations

import timm
import torch
from transformers import BertConfig, BertModel

from engine.checkpoint import CheckpointDir
from engine.run_log import RunLog
from engine.stop import StopRequest
from engine.trainer import Trainer
from models.model_clip import CLIPModel

GLOBAL_BATCH, STEPS = 12, 3


def tiny_model(dropout: float = 0.0) -> CLIPModel:
    """ViT + BERT towers of width 16 (no dropout unless ``dropout``), embed_dim 8."""
    torch.manual_seed(0)
    image = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        drop_rate=dropout,
        proj_drop_rate=dropout,
    )
    text = BertModel(
        BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=0.0,
        )
    )
    return CLIPModel(image, text, embed_dim=8)


def global_batches() -> list[dict]:
    """STEPS global batches; indices repeat across steps and, in the last step, across ranks."""
    g = torch.Generator().manual_seed(1)
    index_sets = [
        list(range(12)),
        [3, 14, 5, 16, 7, 18, 9, 20, 11, 22, 0, 24],
        [1, 25, 2, 26, 25, 27, 4, 28, 1, 29, 6, 2],
    ]
    batches = []
    for idx in index_sets[:STEPS]:
        batches.append(
            {
                "image": torch.randint(0, 256, (GLOBAL_BATCH, 3, 16, 16), generator=g, dtype=torch.uint8),
                "input_ids": torch.randint(1, 40, (GLOBAL_BATCH, 7), generator=g),
                "attention_mask": torch.ones(GLOBAL_BATCH, 7, dtype=torch.long),
                "image_idx": torch.tensor(idx),
                "text_idx": torch.tensor(idx[::-1]),
            }
        )
    return batches


class ListData:
    """The training loop's data interface over a fixed list of batches (one epoch)."""

    def __init__(self, batches: list[dict]) -> None:
        self.loader = batches
        self.steps_per_epoch = len(batches)

    def set_epoch(self, epoch: int, position: dict | None = None) -> None:
        pass

    def advance(self, position: dict | None, batch: dict) -> None:
        return None


def make_trainer(model, loss_fn, optimizer, tmp_dir, scaler=None, amp_dtype=None, **kwargs) -> Trainer:
    """A Trainer on the CPU with a constant learning rate, logging every step to ``tmp_dir``
    (float32 unless ``amp_dtype`` and a grad ``scaler`` are given)."""
    return Trainer(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=scaler or torch.amp.GradScaler("cpu", enabled=False),
        amp_dtype=amp_dtype,
        device=torch.device("cpu"),
        run_log=RunLog(tmp_dir, enabled=True),
        checkpoints=CheckpointDir(tmp_dir),
        stop=StopRequest(),
        log_every=1,
        **kwargs,
    )
