"""Bad input to clip.py: one clear message on stderr, exit status 2, nothing trained (TARGETS R5, R7)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

import clip
from tiny_run import tiny_run_args


def run_failing(args, capsys) -> str:
    capsys.readouterr()
    assert clip.main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_missing_shards(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", train_data="train/{00000..00009}.tar"), capsys)
    assert "00005.tar" in message and "6 shard path(s)" in message and "not found" in message
    assert not (tmp_path / "o" / "checkpoint_latest.pth").exists()


def test_missing_shard_folder(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", train_data="nowhere"), capsys)
    assert "nowhere" in message


def test_missing_annotation_file(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", test_coco_file="coco_test.json"), capsys)
    assert "--test_coco_file" in message and "coco_test.json" in message


def test_missing_image_root(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", coco_image_root="no_images"), capsys)
    assert "--coco_image_root" in message and "no_images" in message


def test_missing_image_files(tiny_dataset, tmp_path, capsys):
    """An annotation file naming images that are not there fails before training."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    (root / "images" / "test" / "000003.jpg").unlink()
    message = run_failing(tiny_run_args(root, tmp_path / "o", text_encoder=tiny_dataset / "text_encoder"), capsys)
    assert "000003.jpg" in message
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_index_beyond_data_size(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", data_size=150), capsys)
    assert "--data_size" in message and "at least 400" in message  # the largest key is 399
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_batch_of_one(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", batch_size_train=1), capsys)
    assert "--batch_size_train" in message and "at least 2" in message


def test_unknown_loss(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", ita_type="simclr"), capsys)
    assert "simclr" in message and "isogclr" in message and "sogclr" in message


@pytest.mark.parametrize("what", ["weights", "text_encoder"])
def test_pretrained_unavailable_offline(tiny_dataset, tmp_path, capsys, what):
    """Offline and uncached, --init_model and hub names stop with a message saying how to provide them."""
    overrides = {"init_model": True, "image_encoder": "resnet18", "image_encoder_kwargs": "{}"}
    if what == "text_encoder":
        overrides = {"text_encoder": "distilbert-base-uncased"}
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", **overrides), capsys)
    assert "HF_HOME" in message and "python -c" in message
    if what == "weights":
        assert "--init_model" in message and "resnet18" in message
    else:
        assert "distilbert-base-uncased" in message


def test_unknown_config_key(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 2\nlearning_rate: 0.1\n")
    message = run_failing(["--config", str(config), *tiny_run_args(tiny_dataset, tmp_path / "o")], capsys)
    assert "learning_rate" in message


def test_all_samples_bad(tiny_dataset, tmp_path, capsys):
    """Shards whose every image is undecodable: an error naming the shards, before training."""
    shard_dir = tmp_path / "bad"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "00000.tar", "w") as tar:
        for key in range(40):
            for suffix, data in (("jpg", b"not a jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key:08d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (shard_dir / "00000_stats.json").write_text(json.dumps({"successes": 40}))
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", train_data=str(shard_dir)), capsys)
    assert "00000.tar" in message and "bad_image" in message


def test_sync_bn_needs_cuda(tiny_dataset, tmp_path, capsys):
    message = run_failing(tiny_run_args(tiny_dataset, tmp_path / "o", sync_bn=True), capsys)
    assert "--sync_bn needs CUDA devices" in message and "--device is cpu" in message
