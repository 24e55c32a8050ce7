"""The training loop survives faults (TARGETS R4, R6, R11): non-finite steps and fp16 overflows are
skipped without touching parameters, optimiser or loss state; repeated non-finite steps stop the
run (fp16 overflows do not); too many bad samples stop it naming the worst shard."""

from __future__ import annotations

import pytest
import torch

from engine.optim import build_optimizer
from engine.trainer import TrainingError
from models.losses import build_loss
from tiny_training import ListData, global_batches, make_trainer, tiny_model


def isogclr_trainer(tmp_path, fused: bool = False, **kwargs):
    """``fused``: the run's own optimiser (fused AdamW, skipping on the device); otherwise a plain
    AdamW, which the trainer skips by reading the decision on the host."""
    model, loss_fn = tiny_model(), build_loss("isogclr", 30, tau_init=0.03, eta_init=0.5)
    if fused:
        optimizer = build_optimizer("adamw", model, loss_fn, 1e-3, 0.01)
    else:
        optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    return make_trainer(model, loss_fn, optimizer, tmp_path, **kwargs)


def poisoned(batch: dict) -> dict:
    """The batch with NaN pixels (a float image: uint8 cannot hold NaN; the model takes both)."""
    return {**batch, "image": torch.full(batch["image"].shape, float("nan"))}


def snapshot(trainer) -> dict:
    """Parameters, loss state and optimiser state, copied."""
    return {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "loss": {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()},
        "optimizer": {
            i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()
        },
    }


def assert_unchanged(before: dict, trainer) -> None:
    after = snapshot(trainer)
    for part in ("model", "loss"):
        for key, value in before[part].items():
            assert torch.equal(after[part][key], value), f"{part}.{key} changed"
    for index, state in before["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"][index][key], value), f"optimizer state {index}.{key} changed"


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "adamw"])
def test_nonfinite_step_is_skipped_and_leaves_the_state_alone(tmp_path, fused):
    trainer = isogclr_trainer(tmp_path, fused=fused)
    good, second = global_batches()[:2]
    assert trainer.train_epoch(ListData([good]))
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state = {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()}
    adam = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()

    assert trainer.train_epoch(ListData([poisoned(second)]))
    assert trainer.progress.skipped_steps == 1 and trainer.progress.step == 2
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for key, value in trainer.loss_fn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], adam)
    assert trainer.last_log["skipped_steps"] == 1

    assert trainer.train_epoch(ListData([second]))  # and training goes on
    assert trainer.progress.skipped_steps == 1
    assert not torch.equal(trainer.model.state_dict()["vision_proj.weight"], params["vision_proj.weight"])


def test_fp16_overflow_skips_the_step_and_changes_nothing(tmp_path):
    """A real fp16 overflow on the CPU: autocast float16 and a grad scaler whose scale (2^40) makes
    the scaled gradients overflow float16. The scaler skips the step; parameters, Adam's moments
    and step count, and the loss state (u, tau, momentum, already computed in the forward) stay
    as they were. Such skips are counted apart and do not count towards --max_nonfinite_steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trainer = isogclr_trainer(tmp_path, fused=True, scaler=scaler, amp_dtype=torch.float16, max_nonfinite_steps=1)
    good = global_batches()[0]
    assert trainer.train_epoch(ListData([good]))  # builds the optimiser state (it stays at step 0)
    before = snapshot(trainer)
    assert trainer.train_epoch(ListData(global_batches()))
    assert_unchanged(before, trainer)
    assert trainer.progress.amp_skipped_steps == 4 and trainer.progress.skipped_steps == 0
    assert trainer.scaler.get_scale() == 2.0**36  # halved at every overflow
    assert trainer.last_log["amp_skipped_steps"] == 4 and trainer.last_log["skipped_steps"] == 0
    assert all(int(s["step"]) == 0 for s in trainer.optimizer.state_dict()["state"].values())


def test_fp16_steps_train_on_the_cpu(tmp_path):
    """With a scale float16 can hold, the same steps train: parameters and temperatures move."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = isogclr_trainer(tmp_path, fused=True, scaler=scaler, amp_dtype=torch.float16)
    before = snapshot(trainer)
    assert trainer.train_epoch(ListData(global_batches()))
    assert (trainer.progress.amp_skipped_steps, trainer.progress.skipped_steps) == (0, 0)
    after = snapshot(trainer)
    assert not torch.equal(after["model"]["vision_proj.weight"], before["model"]["vision_proj.weight"])
    assert not torch.equal(after["loss"]["tau_I"], before["loss"]["tau_I"])
    assert all(int(s["step"]) == 3 for s in trainer.optimizer.state_dict()["state"].values())


def test_nonfinite_loss_under_fp16_is_no_overflow(tmp_path):
    """Under fp16, a non-finite loss is counted as a non-finite step, not as a grad-scaler skip."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = isogclr_trainer(tmp_path, fused=True, scaler=scaler, amp_dtype=torch.float16)
    assert trainer.train_epoch(ListData([global_batches()[0]]))
    before = snapshot(trainer)
    assert trainer.train_epoch(ListData([poisoned(global_batches()[1])]))
    assert_unchanged(before, trainer)
    assert (trainer.progress.skipped_steps, trainer.progress.amp_skipped_steps) == (1, 0)


def test_repeated_nonfinite_steps_stop_training(tmp_path):
    trainer = isogclr_trainer(tmp_path, max_nonfinite_steps=3)
    bad = poisoned(global_batches()[0])
    with pytest.raises(TrainingError, match="4 steps in a row had a non-finite loss or gradient"):
        trainer.train_epoch(ListData([bad] * 10))


def test_too_many_bad_samples_stop_training_naming_the_worst_shard(tmp_path):
    trainer = isogclr_trainer(tmp_path, max_bad_fraction=0.15)
    trainer.bad_data.min_samples = 10
    batches = global_batches()
    batches[0] = {**batches[0], "skipped": {"bad_image": 2}, "skipped_shards": {"a.tar": 2}}
    batches[1] = {**batches[1], "skipped": {"bad_image": 3, "missing_caption": 1}, "skipped_shards": {"b.tar": 4}}
    assert trainer.train_epoch(ListData(batches[:1]))  # 2 bad of 14 read: under the limit
    assert trainer.last_log["skipped_samples"] == {"bad_image": 2}
    with pytest.raises(TrainingError, match=r"more than --max_bad_fraction 0.15; the worst shard is b\.tar \(4 bad"):
        trainer.train_epoch(ListData(batches[1:2]))  # 6 bad of 30
