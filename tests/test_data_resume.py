"""Exact mid-epoch resumption of the training data, on real tars and real JPEG files.

An epoch is run without interruption, recording every batch and the position after it;
then fresh data objects are started from some of those positions and must yield exactly
the batches that followed, and the same positions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.loaders import build_train_data
from shard_factory import (
    caption_of,
    jpeg_bytes,
    make_tokenizer,
    sample_members,
    truncated_jpeg,
    write_caption_files,
    write_tar,
)

EPOCH = 1
MAX_WORDS = 30
ROWS_PER_SHARD = 20  # key range of each shard; shard s holds keys from s * ROWS_PER_SHARD
GOOD_PER_SHARD = [7, 3, 12, 5, 9]  # unequal, so worker streams run out at different batches
DATA_SIZE = ROWS_PER_SHARD * len(GOOD_PER_SHARD)
TRUNCATED_SHARD, KEPT_BEFORE_CUT = 4, 6  # shard 4 ends inside its 7th sample
TENSOR_KEYS = ("image", "input_ids", "attention_mask", "image_idx", "text_idx")
CAPTION_ROWS, BROKEN_ROW = 22, 9

# Three workers on a two-core test machine are intended here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def key(index: int) -> str:
    return f"{index:09d}"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([caption_of(i) for i in range(DATA_SIZE)], MAX_WORDS)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    """Five shards of unequal length; shard 2 holds two bad samples, shard 4 is truncated."""
    root = tmp_path_factory.mktemp("uneven_shards")
    for s, count in enumerate(GOOD_PER_SHARD):
        samples = [(key(i), sample_members(i, key(i))) for i in range(s * ROWS_PER_SHARD, s * ROWS_PER_SHARD + count)]
        if s == 2:
            bad = s * ROWS_PER_SHARD + 15
            samples.insert(4, (key(bad), {"jpg": truncated_jpeg(bad), "txt": b"a truncated image"}))
            samples.insert(8, (key(bad + 1), {"jpg": jpeg_bytes("red")}))
        write_tar(root / f"{s:05d}.tar", samples)
    path = root / f"{TRUNCATED_SHARD:05d}.tar"
    data = path.read_bytes()
    cut = data.index(f"{key(TRUNCATED_SHARD * ROWS_PER_SHARD + KEPT_BEFORE_CUT)}.jpg".encode()) + 512 + 100
    path.write_bytes(data[:cut])
    return root


def shard_data(root: Path, tokenizer, **overrides):
    args = dict(
        train_data=str(root),
        train_file=None,
        train_image_root=None,
        train_num_samples=40,
        data_size=DATA_SIZE,
        tokenizer=tokenizer,
        image_res=16,
        max_words=MAX_WORDS,
        batch_size=2,
        workers=0,
        seed=3,
        rank=0,
        world_size=1,
        shuffle_buffer=4,
    )
    args.update(overrides)
    return build_train_data(**args)


def caption_data(files: tuple[Path, Path], tokenizer, **overrides):
    ann, images = files
    args = dict(
        train_data=None,
        train_file=str(ann),
        train_image_root=str(images),
        train_num_samples=None,
        data_size=CAPTION_ROWS,
        tokenizer=tokenizer,
        image_res=16,
        max_words=MAX_WORDS,
        batch_size=3,
        workers=0,
        seed=3,
        rank=0,
        world_size=1,
    )
    args.update(overrides)
    return build_train_data(**args)


def run_epoch(data, position: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Batches of epoch ``EPOCH`` from ``position`` on, and the position after each, each
    position passed through JSON as a checkpoint would store it."""
    data.set_epoch(EPOCH, position)
    batches, positions = [], []
    for batch in data.loader:
        position = data.advance(position, batch)
        assert json.loads(json.dumps(position)) == position
        position = json.loads(json.dumps(position))
        batches.append(batch)
        positions.append(position)
    return batches, positions


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if name in TENSOR_KEYS:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def first_point_with_next_stream_finished(positions: list[dict]) -> int | None:
    """Batches consumed at the first point before the end where the stream whose turn comes
    next has already finished (so the loader must pass over it), or None."""
    for k, p in enumerate(positions[:-1], start=1):
        if "finished" in p and p["finished"][(p["last_worker"] + 1) % len(p["finished"])]:
            return k
    return None


def resume_points(positions: list[dict]) -> list[int]:
    """Numbers of consumed batches to resume after: the first, the middle, the last two, the
    end, and the first point where the next stream has finished."""
    n = len(positions)
    points = {1, n // 2, n - 1, n, first_point_with_next_stream_finished(positions)}
    return sorted(k for k in points if k is not None and 1 <= k <= n)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_shard_epoch_resumes_exactly_after_any_batch(shard_root, tokenizer, workers, world_size):
    for rank in range(world_size):
        settings = dict(workers=workers, rank=rank, world_size=world_size)
        data = shard_data(shard_root, tokenizer, **settings)
        batches, positions = run_epoch(data)
        assert len(batches) == data.steps_per_epoch > 0
        if workers > 1 and world_size == 1:  # the uneven shards make a stream finish early
            assert first_point_with_next_stream_finished(positions) < len(batches) - 1
        for k in resume_points(positions):
            rest, rest_positions = run_epoch(shard_data(shard_root, tokenizer, **settings), positions[k - 1])
            assert_same_batches(rest, batches[k:])
            assert rest_positions == positions[k:]


@pytest.mark.parametrize("workers", [0, 3])
def test_every_bad_sample_read_reaches_a_batch_with_its_shard(shard_root, tokenizer, workers):
    # Both ranks together read every shard at least once (the epoch is longer than the good samples).
    kinds, shards = Counter(), Counter()
    for rank in range(2):
        data = shard_data(shard_root, tokenizer, workers=workers, rank=rank, world_size=2, train_num_samples=60)
        batches, _ = run_epoch(data)
        for batch in batches:
            kinds.update(batch["skipped"])
            shards.update(batch["skipped_shards"])
    assert set(kinds) == {"bad_image", "missing_caption", "bad_shard"}
    assert set(shards) == {str(shard_root / "00002.tar"), str(shard_root / f"{TRUNCATED_SHARD:05d}.tar")}
    assert shards[str(shard_root / "00002.tar")] == kinds["bad_image"] + kinds["missing_caption"]


@pytest.fixture(scope="module")
def caption_files(tmp_path_factory) -> tuple[Path, Path]:
    ann, images = write_caption_files(tmp_path_factory.mktemp("caption_resume"), CAPTION_ROWS)
    (images / f"{BROKEN_ROW // 2:04d}.jpg").write_bytes(b"not a jpeg")
    return ann, images


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_caption_json_epoch_resumes_exactly_after_any_batch(caption_files, tokenizer, workers, world_size):
    for rank in range(world_size):
        settings = dict(workers=workers, rank=rank, world_size=world_size)
        batches, positions = run_epoch(caption_data(caption_files, tokenizer, **settings))
        assert [p["batches"] for p in positions] == list(range(1, len(batches) + 1))
        for k in resume_points(positions):
            rest, rest_positions = run_epoch(caption_data(caption_files, tokenizer, **settings), positions[k - 1])
            assert_same_batches(rest, batches[k:])
            assert rest_positions == positions[k:]


def test_position_from_other_settings_is_refused(shard_root, caption_files, tokenizer):
    data = shard_data(shard_root, tokenizer, workers=2)
    data.set_epoch(EPOCH)
    position = None
    for batch, _ in zip(data.loader, range(3), strict=False):
        position = data.advance(position, batch)
    changes = {
        r"--workers = 2, but this run has 3": dict(workers=3),
        r"per-rank batch size = 2, but this run has 4": dict(batch_size=4),
        r"number of ranks = 1, but this run has 2": dict(world_size=2),
        r"--seed = 3, but this run has 4": dict(seed=4),
        r"--shuffle_buffer = 4, but this run has 8": dict(shuffle_buffer=8),
    }
    for message, change in changes.items():
        with pytest.raises(ValueError, match=message):
            shard_data(shard_root, tokenizer, **{"workers": 2, **change}).set_epoch(EPOCH, position)
    with pytest.raises(ValueError, match=r"does not belong to epoch 2"):
        data.set_epoch(EPOCH + 1, position)
    with pytest.raises(ValueError, match=r"reading 'shards', but this run reads 'caption_json'"):
        caption_data(caption_files, tokenizer).set_epoch(EPOCH, position)
    with pytest.raises(ValueError, match=r"malformed shard stream position"):
        data.set_epoch(EPOCH, {**position, "consumed": position["consumed"][:1]})


def test_position_beyond_the_data_is_refused(shard_root, caption_files, tokenizer):
    shards = shard_data(shard_root, tokenizer)
    shards.set_epoch(EPOCH)
    position = shards.advance(None, {"worker": 0, "consumed": 10_000, "worker_done": False})
    position = {**position, "made": [25]}
    with pytest.raises(ValueError, match=r"25 batches of worker stream 0 .* its share of epoch 1 is 20"):
        shards.set_epoch(EPOCH, position)
    captions = caption_data(caption_files, tokenizer)
    captions.set_epoch(EPOCH)
    position = {**captions.advance(None, {}), "batches": 8}
    with pytest.raises(ValueError, match=r"8 batches into the epoch, but this rank's epoch holds 7 batches of 3"):
        captions.set_epoch(EPOCH, position)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_stops_at_its_share(tmp_path, tokenizer, workers):
    # Two shards of ten samples (stats say so), an epoch of 8 batches of 2: each stream makes
    # its share of 4, leaves the rest of its shard, and marks its last batch.
    for s in range(2):
        write_tar(tmp_path / f"{s:05d}.tar", [(key(i), sample_members(i, key(i))) for i in range(10 * s, 10 * s + 10)])
        (tmp_path / f"{s:05d}_stats.json").write_text(json.dumps({"successes": 10}))
    data = shard_data(tmp_path, tokenizer, train_data=str(tmp_path), workers=workers, train_num_samples=16)
    batches, positions = run_epoch(data)
    assert len(batches) == data.steps_per_epoch == 8
    assert data.stream.quotas() == ([8] if workers == 0 else [4, 4])
    assert [b["worker_done"] for b in batches].count(True) == max(workers, 1)
    assert positions[-1]["finished"] == [True] * max(workers, 1)
    seen = [i for b in batches for i in b["image_idx"].tolist()]
    assert len(seen) == len(set(seen)) == 16


def rows_of(batch: dict) -> dict[int, tuple]:
    """A batch by row (text_idx): its augmented image and tokens."""
    return {
        int(t): (batch["image"][i], batch["input_ids"][i], int(batch["image_idx"][i]))
        for i, t in enumerate(batch["text_idx"])
    }


def assert_same_rows(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for row, (image, ids, image_idx) in want.items():
        assert torch.equal(got[row][0], image) and torch.equal(got[row][1], ids) and got[row][2] == image_idx, row


def test_caption_json_position_rebases_to_another_number_of_ranks(caption_files, tokenizer, shard_root):
    """A step boundary saved by rank 0 of 2 ranks x 3 rows continues, on 1 rank x 6 rows or
    on 1 rank x 3 rows x 2 micro-batches, with the same rows in each global batch and the same
    augmentation of each row; another global batch, or shards, cannot continue."""
    ranks = [run_epoch(caption_data(caption_files, tokenizer, rank=r, world_size=2)) for r in range(2)]
    saved = ranks[0][1][0]  # rank 0 after the first step
    global_batches = [rows_of(a) | rows_of(b) for a, b in zip(ranks[0][0], ranks[1][0], strict=True)]

    one = caption_data(caption_files, tokenizer, batch_size=6)
    position = one.rebase(saved, 1, 1)
    assert position["batches"] == 1 and position["world_size"] == 1
    rest, _ = run_epoch(one, position)
    assert len(rest) == len(global_batches) - 1
    for got, want in zip(rest, global_batches[1:], strict=True):
        assert_same_rows(rows_of(got), want)

    micro = caption_data(caption_files, tokenizer, batch_size=3)
    position = micro.rebase(saved, 1, 2)
    assert position["batches"] == 2
    rest, _ = run_epoch(micro, position)
    for k, want in enumerate(global_batches[1:]):
        assert_same_rows(rows_of(rest[2 * k]) | rows_of(rest[2 * k + 1]), want)

    assert micro.rebase(saved, 1, 1) is None  # a global batch of 3, not 6
    assert one.rebase({**saved, "batches": 4}, 2, 2)["batches"] == 4  # 2 x 3 x 2 rows, as 1 x 6 x 2
    assert one.rebase({**saved, "batches": 3}, 2, 2) is None  # inside a step of 2 micro-batches
    assert caption_data(caption_files, tokenizer, batch_size=6, seed=5).rebase(saved, 1, 1) is None
    assert shard_data(shard_root, tokenizer, batch_size=6).rebase(saved, 1, 1) is None
