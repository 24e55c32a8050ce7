"""clip.py on shards with corrupt samples (TARGETS R4): skipped, counted and logged while training
goes on; too many of them stop the run with a message naming the worst shard."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import clip
from shard_factory import truncated_jpeg
from tiny_run import tiny_run_args


def corrupt_copy(root, tmp_path, shard: str = "00001") -> tuple:
    """The tiny dataset with every image of one shard (a quarter of the data) damaged in a real tar:
    truncated JPEGs, non-image bytes, a missing caption, an empty and a non-UTF-8 caption."""
    data = tmp_path / "data"
    shutil.copytree(root / "train", data / "train")
    path = data / "train" / f"{shard}.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    damaged = io.BytesIO()
    with tarfile.open(fileobj=damaged, mode="w") as tar:
        for n, (member, payload) in enumerate(members):
            if member.name.endswith(".jpg"):
                payload = truncated_jpeg(n) if n % 2 else b"<html>not an image</html>"
            elif member.name.endswith(".txt") and n % 7 == 0:
                continue  # no caption at all
            elif member.name.endswith(".txt") and n % 11 == 0:
                payload = b"\xff\xfe\xfa broken"
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    path.write_bytes(damaged.getvalue())
    return data, str(path)


def test_bad_samples_are_skipped_counted_and_logged(tiny_dataset, tmp_path, capsys):
    data, _ = corrupt_copy(tiny_dataset, tmp_path)
    out = tmp_path / "run"
    args = tiny_run_args(
        tiny_dataset,
        out,
        train_data=str(data / "train"),
        epochs=1,
        max_bad_fraction=0.5,
        train_num_samples=288,
        workers=2,
    )
    assert clip.main(args) == 0
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    skipped = last["skipped_samples"]
    assert skipped.get("bad_image", 0) + skipped.get("missing_caption", 0) + skipped.get("bad_caption", 0) > 50
    assert skipped.get("bad_image", 0) > 40
    assert last["step"] == 288 // 32


def test_too_many_bad_samples_stop_the_run_naming_the_shard(tiny_dataset, tmp_path, capsys):
    data, shard = corrupt_copy(tiny_dataset, tmp_path)
    out = tmp_path / "run"
    args = tiny_run_args(
        tiny_dataset, out, train_data=str(data / "train"), epochs=1, max_bad_fraction=0.1, log_every=1, workers=0
    )
    # the minimum number of samples before judging is 1000: the tiny data set holds fewer, so read it 4 times
    args += ["--train_num_samples", "1200", "--epochs", "4"]
    capsys.readouterr()
    assert clip.main(args) == clip.EXIT_FAILED
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--max_bad_fraction 0.1" in errors[0] and shard in errors[0], errors
