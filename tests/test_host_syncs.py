"""A training step that does not log reads nothing from the device (TARGETS P6).

Every way Python code reads a tensor's value on the host (``item``, ``tolist``, ``bool``,
``float``, ``int``, ``index``) is wrapped to record calls made from the project's own code
(``bimodal_exps/``); 20 steps of the real Trainer, with the fused optimiser, the isogclr loss and
its state update, must make none outside the logging of the epoch's last step. On a GPU each such
call would wait for the device; on a CPU they are counted all the same.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from engine.optim import build_optimizer
from models.losses import build_loss
from models.model_clip import CLIPModel
from tiny_training import ListData, global_batches, make_trainer, tiny_model

PROJECT = str(Path(__file__).resolve().parents[1] / "bimodal_exps")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts tensor reads whose caller is a function in bimodal_exps/: {(file:function): n}."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}

    def __enter__(self) -> HostReads:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._wrap(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, original):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PROJECT):
                self.calls[f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"] += 1
            return original(tensor, *args, **kwargs)

        return read


LOGGING = {"trainer.py:_log", "trainer.py:_sync_progress", "trainer.py:read", "parallel.py:mean_over_ranks"}


@pytest.mark.parametrize("name", ["isogclr", "clip"])
def test_twenty_steps_read_nothing_from_the_device(tmp_path, name):
    model = tiny_model()
    hp = {"tau_init": 0.03} if name == "isogclr" else {"learnable_temp": True}
    loss_fn = build_loss(name, 30, **hp)
    trainer = make_trainer(model, loss_fn, build_optimizer("adamw", model, loss_fn, 1e-3, 0.01), tmp_path)
    trainer.log_every = 1000  # no log line but the epoch's last
    batches = [global_batches()[k % 3] for k in range(20)]
    with HostReads() as reads:
        assert trainer.train_epoch(ListData(batches))
    assert trainer.progress.step == 20 and trainer.last_log["step"] == 20
    outside_logging = {k: n for k, n in reads.calls.items() if k not in LOGGING}
    assert not outside_logging, f"host reads in non-logging code: {outside_logging}"
    assert reads.calls, "the epoch's last step logs, which reads values: the counter must see it"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_text_mask_handed_over_in_4d_means_the_same(attention):
    """The text encoder gets a 4D mask (which Hugging Face does not inspect with a sync): the same
    embeddings as with the 2D padding mask, for both attention implementations."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config._attn_implementation = attention
    text = BertModel(config).eval()
    image = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    model = CLIPModel(image, text, embed_dim=8).eval()
    ids = torch.randint(1, 40, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:], mask[3, 2:] = 0, 0
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        hidden = text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        want = torch.nn.functional.normalize(model.text_proj(hidden), dim=-1)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
