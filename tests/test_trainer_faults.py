"""The training loop survives faults (TARGETS R4, R6): non-finite steps are skipped without touching
the loss state, repeated ones stop the run, and too many bad samples stop it naming the worst shard."""

from __future__ import annotations

import pytest
import torch

from engine.trainer import TrainingError
from models.losses import build_loss
from tiny_training import ListData, global_batches, make_trainer, tiny_model


def isogclr_trainer(tmp_path, **kwargs):
    model, loss_fn = tiny_model(), build_loss("isogclr", 30, tau_init=0.03, eta_init=0.5)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    return make_trainer(model, loss_fn, optimizer, tmp_path, **kwargs)


def poisoned(batch: dict) -> dict:
    return {**batch, "image": torch.full_like(batch["image"], float("nan"))}


def test_nonfinite_step_is_skipped_and_leaves_the_state_alone(tmp_path):
    trainer = isogclr_trainer(tmp_path)
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
