"""clip.py end to end on the tiny synthetic dataset: train, checkpoint, resume, evaluate."""

from __future__ import annotations

import json
import math
import tarfile
from collections import defaultdict

import numpy as np
import pytest
import torch
import yaml

import clip
from models.losses import LOSS_ALIASES, LOSSES
from shard_factory import write_stats, write_tar
from tiny_run import LEARNING, tiny_run_args


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps_per_epoch(root, batch_size: int = 32) -> int:
    """Full batches in one epoch: the samples img2dataset's stats files count, over the batch size."""
    return sum(json.loads(p.read_text())["successes"] for p in (root / "train").glob("*_stats.json")) // batch_size


EPOCHS, BATCH = LEARNING["epochs"], LEARNING["batch_size_train"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """One isogclr run that learns, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "isogclr"
    args = tiny_run_args(
        tiny_dataset, out, ita_type="isogclr", zs_dataset="imagefolder", zs_datafolder="zeroshot", **LEARNING
    )
    assert clip.main(args) == 0
    return out


def test_training_learns(trained):
    """The trained model retrieves far better than the untrained one (chance: r_mean ~12 on 40 images)."""
    evals = read_jsonl(trained / "eval.jsonl")
    untrained = next(e for e in evals if e["tag"] == "untrained" and e["dataset"] == "synthetic_test")
    final = next(e for e in evals if e["tag"] == "final" and e["dataset"] == "synthetic_test")
    assert untrained["r_mean"] < 20
    assert final["r_mean"] > untrained["r_mean"] + 20, (untrained["r_mean"], final["r_mean"])


def test_run_writes_every_output(trained, tiny_dataset):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["ita_type"] == "isogclr" and config["epochs"] == EPOCHS
    last = EPOCHS - 1
    for name in ("checkpoint_latest.pth", "checkpoint_0.pth", f"checkpoint_{last}.pth", "checkpoint_best.pth"):
        assert (trained / name).is_file(), name
    assert (trained / "checkpoint_latest.pth").samefile(trained / f"checkpoint_{last}.pth")
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    snapshot = np.load(trained / "temperatures" / f"epoch_{last}.npz")
    assert len(snapshot["image_index"]) == len(snapshot["image_tau"]) > 300
    assert (snapshot["text_tau"] >= 0.005).all() and (snapshot["text_tau"] <= 1.0).all()
    assert (trained / "temperatures" / f"epoch_{last}.png").stat().st_size > 1000

    lines = read_jsonl(trained / "log.jsonl")
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps) and steps[-1] == EPOCHS * steps_per_epoch(tiny_dataset, BATCH)
    for key in ("epoch", "lr", "loss", "tau_I", "tau_T", "grad_tau_I", "gamma", "eta", "samples_per_s", "data_wait_s"):
        assert key in lines[-1], key
    # one epoch convention: log lines, epoch evaluations, checkpoints and snapshots count from 0
    assert sorted({line["epoch"] for line in lines}) == list(range(EPOCHS))
    # the schedule ends where it claims: cosine decay to --min_lr (1e-6) at the last step
    assert lines[-1]["lr"] == pytest.approx(1e-6, rel=1e-6)

    evals = read_jsonl(trained / "eval.jsonl")
    tags = [(e["tag"], e["dataset"]) for e in evals]
    assert ("untrained", "synthetic_test") in tags and ("final", "synthetic_test") in tags
    assert [e["epoch"] for e in evals if e["tag"] == "epoch"] == list(range(EPOCHS))
    assert {e["epoch"] for e in evals if e["tag"] == "untrained"} == {-1}
    assert {e["epoch"] for e in evals if e["tag"] == "final"} == {last}
    assert ("final", "imagefolder") in tags
    assert "final synthetic_test" in (trained / "train.log").read_text()  # the results table reaches the log
    for e in evals:
        if "r_mean" in e:
            assert 0 <= e["r_mean"] <= 100
            assert e["r_mean"] == pytest.approx((e["txt_r_mean"] + e["img_r_mean"]) / 2)


def test_checkpoint_holds_the_run_state(trained, tiny_dataset):
    state = torch.load(trained / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert {"model", "loss", "optimizer", "scheduler", "scaler", "progress", "best", "config"} <= set(state)
    steps = EPOCHS * steps_per_epoch(tiny_dataset, BATCH)
    assert state["progress"] == {
        "epoch": EPOCHS,
        "epoch_step": 0,
        "step": steps,
        "samples_seen": BATCH * steps,
        "skipped_steps": 0,
        "amp_skipped_steps": 0,
    }
    assert len(state["per_rank"]) == 1 and {"rng", "data_position"} <= set(state["per_rank"][0])
    assert {"tau_I", "tau_T", "log_u_I", "log_u_T", "m_I", "m_T", "seen_I", "seen_T"} <= set(state["loss"])
    # the temperatures learned: some moved away from tau_init
    seen = state["loss"]["seen_I"]
    assert seen.sum() > 300
    assert (state["loss"]["tau_I"][seen] - 0.05).abs().max() > 1e-3
    assert state["scheduler"]["last_epoch"] == steps


def test_evaluate_reproduces_the_validation_metrics(trained, tiny_dataset, capsys):
    """--evaluate on the epoch-1 checkpoint gives exactly the metrics logged for it in training."""
    logged = next(e for e in read_jsonl(trained / "eval.jsonl") if e["tag"] == "epoch" and e["epoch"] == 1)
    capsys.readouterr()
    args = tiny_run_args(
        tiny_dataset,
        trained,
        evaluate=True,
        checkpoint=trained / "checkpoint_1.pth",
        image_encoder="resnet18",
        embed_dim=8,
    )  # the checkpoint's own settings win
    assert clip.main(args) == 0
    printed = capsys.readouterr().out
    assert "synthetic_val" in printed and "r_mean" in printed
    evaluated = [e for e in read_jsonl(trained / "eval.jsonl") if e["tag"] == "evaluate"]
    val = next(e for e in evaluated if e["dataset"] == "synthetic_val")
    assert val["r_mean"] == logged["r_mean"] and val["txt_r1"] == logged["txt_r1"]
    assert (val["epoch"], val["step"]) == (logged["epoch"], logged["step"])
    assert f"{val['r_mean']:.2f}" in printed


# what each loss learns besides the encoders: (a key of its state dict, the value it starts at)
LEARNED = {
    "clip": ("temp", 0.05),
    "fastclip_v0": ("tau", 0.05),
    "fastclip_v3": ("tau", 0.05),
    "siglip": ("bias", -10.0),
    # the output bias starts where sigmoid gives tau_init 0.05 in [0.005, 1]
    "isogclr_tempnet": ("nets.I.3.bias", math.log(0.045 / 0.955)),
}


@pytest.mark.parametrize("loss", [*sorted(set(LOSSES) - {"isogclr"}), "fastclip_v1", "isogclr_new"])
def test_other_losses_train(tiny_dataset, tmp_path, loss):
    out = tmp_path / loss
    assert clip.main(tiny_run_args(tiny_dataset, out, ita_type=loss, epochs=1, learnable_temp=loss == "clip")) == 0
    lines = read_jsonl(out / "log.jsonl")
    assert lines and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    state = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    canonical = LOSS_ALIASES.get(loss, loss)
    if canonical in LEARNED:
        key, start = LEARNED[canonical]
        value = state["loss"][key]
        assert float(value.flatten()[0]) != pytest.approx(start, rel=1e-4), f"{key} did not learn"
    if "seen_I" in state["loss"]:
        assert state["loss"]["seen_I"].sum() > 300
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["ita_type"] == canonical


def test_resume_continues_from_the_latest_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "resume"
    assert clip.main(tiny_run_args(tiny_dataset, out, ita_type="sogclr", epochs=1)) == 0
    first = read_jsonl(out / "log.jsonl")
    assert clip.main(tiny_run_args(tiny_dataset, out, ita_type="sogclr", epochs=2, resume="auto")) == 0
    lines = read_jsonl(out / "log.jsonl")
    assert lines[: len(first)] == first
    assert [line["epoch"] for line in lines[len(first) :]] and all(line["epoch"] == 1 for line in lines[len(first) :])
    state = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (2, 2 * steps_per_epoch(tiny_dataset))
    untrained = [e for e in read_jsonl(out / "eval.jsonl") if e["tag"] == "untrained"]
    assert len(untrained) == 1  # the resumed run does not evaluate the untrained model again


def test_caption_json_training_source(tiny_dataset, tmp_path):
    out = tmp_path / "json"
    args = tiny_run_args(
        tiny_dataset,
        out,
        train_data=None,
        train_file="synthetic_train.json",
        train_image_root="images",
        epochs=1,
        batch_size_train=16,
    )
    assert clip.main(args) == 0
    rows = len(json.loads((tiny_dataset / "clip_train" / "synthetic_train.json").read_text()))
    assert read_jsonl(out / "log.jsonl")[-1]["step"] == rows // 16


def regroup_shards(root, out_dir, sizes: list[int]) -> int:
    """The tiny training samples rewritten as shards of the given (unequal) sizes, with stats files."""
    samples = defaultdict(dict)
    for tar_path in sorted((root / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples[key][suffix] = tar.extractfile(member).read()
    keys = sorted(samples)
    assert sum(sizes) <= len(keys)
    out_dir.mkdir()
    start = 0
    for s, size in enumerate(sizes):
        path = out_dir / f"{s:05d}.tar"
        write_tar(path, [(k, samples[k]) for k in keys[start : start + size]])
        write_stats(path, size, size)
        start += size
    return start


def test_epochs_have_the_length_they_claim(tiny_dataset, tmp_path):
    """Several loader workers over shards of unequal sizes: every epoch runs all its steps (a worker
    whose shards run short reads them again), the schedule ends at --min_lr, and the last step of
    every epoch is logged."""
    samples = regroup_shards(tiny_dataset, tmp_path / "shards", [20, 35, 90, 45, 110, 96])
    out = tmp_path / "run"
    args = tiny_run_args(
        tiny_dataset, out, train_data=str(tmp_path / "shards"), workers=3, batch_size_train=20, log_every=7, epochs=2
    )
    assert clip.main(args) == 0
    steps = samples // 20
    lines = read_jsonl(out / "log.jsonl")
    epoch_ends = [(line["epoch"], line["epoch_step"]) for line in lines if line["epoch_step"] == steps]
    assert epoch_ends == [(0, steps), (1, steps)]
    assert lines[-1]["step"] == 2 * steps and lines[-1]["samples_seen"] == 2 * steps * 20
    assert lines[-1]["lr"] == pytest.approx(1e-6, rel=1e-6)  # --min_lr, the end of the cosine schedule
    assert "skipped_samples" not in lines[-1]


def test_fp16_on_the_cpu_is_fp16(tiny_dataset, tmp_path, capsys):
    """--precision fp16 (and --use_amp) mean autocast float16 with a grad scaler, on the CPU too."""
    out = tmp_path / "run"
    assert clip.main(tiny_run_args(tiny_dataset, out, epochs=1, use_amp=True)) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "fp16"
    assert "precision fp16 (autocast float16, grad scaler)" in capsys.readouterr().out
    line = read_jsonl(out / "log.jsonl")[-1]
    assert line["amp_scale"] > 0 and "amp_skipped_steps" in line and np.isfinite(line["loss"])
