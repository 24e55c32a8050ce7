"""The GPU-minded options, as far as a CPU can check them: channels-last images and gradient
checkpointing give the same gradients as the plain model; torch.compile is wired in place (the
parameters keep their names, so checkpoints do not change); and runs with the flags train."""

from __future__ import annotations

import pytest
import torch

import clip
from tiny_run import tiny_run_args
from tiny_training import global_batches, tiny_model

PLAIN = {"channels_last": False, "grad_checkpointing": False, "compile": False}


def gradients(**options) -> dict[str, torch.Tensor]:
    model = tiny_model().configure(**{**PLAIN, **options})
    batch = global_batches()[0]
    image, text = model(batch["image"], batch["input_ids"], batch["attention_mask"])
    (image.sum() * 3 + (text**2).sum()).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("option", ["channels_last", "grad_checkpointing"])
def test_option_keeps_the_gradients(option):
    want, got = gradients(), gradients(**{option: True})
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_compile_is_in_place():
    model = tiny_model().configure(**{**PLAIN, "compile": True})
    assert model.visual._compiled_call_impl is not None and model.text_encoder._compiled_call_impl is not None
    assert list(model.state_dict()) == list(tiny_model().state_dict())


def test_a_run_with_the_options_trains(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(tiny_dataset, out, epochs=1, channels_last=True, grad_checkpointing=True)
    assert clip.main(args) == 0
    assert (out / "checkpoint_0.pth").is_file()
