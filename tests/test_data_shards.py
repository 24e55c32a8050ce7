"""The webdataset shard pipeline on real img2dataset-style tars with real JPEGs."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.batching import Skips
from data.loaders import build_train_data
from data.shards import count_samples, expand_shards, read_shard
from data.transforms import pre_caption
from shard_factory import (
    caption_of,
    colour_of,
    huge_png,
    jpeg_bytes,
    make_tokenizer,
    nearest_colour,
    sample_members,
    truncated_jpeg,
    write_shards,
    write_stats,
    write_tar,
)

NUM_SHARDS, ROWS = 6, 30
DATA_SIZE = NUM_SHARDS * ROWS
MAX_WORDS = 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    root = tmp_path_factory.mktemp("shards")
    return root, write_shards(root, NUM_SHARDS, ROWS)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([caption_of(i) for i in range(DATA_SIZE)], MAX_WORDS)


def build(root: Path, tokenizer, **overrides):
    args = dict(
        train_data=str(root / "{00000..00005}.tar"),
        train_file=None,
        train_image_root=None,
        train_num_samples=None,
        data_size=DATA_SIZE,
        tokenizer=tokenizer,
        image_res=16,
        max_words=MAX_WORDS,
        batch_size=1,
        workers=0,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=50,
    )
    args.update(overrides)
    return build_train_data(**args)


def epoch_batches(data, epoch: int = 0) -> list[dict]:
    data.set_epoch(epoch)
    return list(data.loader)


def indices(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["image_idx"]]


def check_batch(batch: dict, tokenizer, size: int) -> None:
    """Shapes, dtypes, and that image, caption and index belong to the same sample."""
    assert batch["image"].shape == (size, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == size and batch["input_ids"].shape[1] <= MAX_WORDS
    assert torch.equal(batch["image_idx"], batch["text_idx"]) and batch["image_idx"].dtype == torch.long
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    for index, text, image in zip(batch["image_idx"].tolist(), texts, batch["image"], strict=True):
        assert text == pre_caption(caption_of(index), MAX_WORDS)
        assert nearest_colour(image.numpy()) == colour_of(index)


# ---- shard lists and epoch length -------------------------------------------------------


def test_expand_shards_braces_directories_and_lists(dataset):
    root, _ = dataset
    tars = [str(root / f"{s:05d}.tar") for s in range(NUM_SHARDS)]
    assert expand_shards(str(root / "{00001..00003}.tar")) == tars[1:4]
    assert expand_shards(str(root)) == tars
    assert expand_shards(f"{root}/{{00000..00001}}.tar::{tars[5]}") == [*tars[:2], tars[5]]


def test_expand_shards_names_missing_paths(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(FileNotFoundError, match=r"4 shard path\(s\).*00006\.tar, .*00007\.tar, .*00008\.tar, \.\.\."):
        expand_shards(str(root / "{00004..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_shards(str(root / "00000.tar") + "::" + str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.tar shards in directory"):
        expand_shards(str(tmp_path))


def test_count_samples_sums_successes(dataset, tmp_path):
    root, written = dataset
    assert count_samples(expand_shards(str(root))) == len(written)
    lone = tmp_path / "00000.tar"
    write_tar(lone, [("000000001", sample_members(1, "000000001"))])
    assert count_samples([str(lone)]) is None


def test_epoch_length_needs_stats_or_flag(dataset, tokenizer, tmp_path):
    root, written = dataset
    data = build(root, tokenizer, batch_size=4)
    assert data.num_samples == len(written)
    assert data.steps_per_epoch == len(written) // 4
    write_tar(tmp_path / "00000.tar", [(f"{i:09d}", sample_members(i, f"{i:09d}")) for i in range(8)])
    with pytest.raises(ValueError, match="--train_num_samples"):
        build(tmp_path, tokenizer, train_data=str(tmp_path))
    data = build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=8, batch_size=2)
    assert (data.num_samples, data.steps_per_epoch) == (8, 4)


# ---- one epoch ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_reads_every_sample_once(dataset, tokenizer, workers):
    root, written = dataset
    batches = epoch_batches(build(root, tokenizer, workers=workers))
    for b in batches:
        check_batch(b, tokenizer, 1)
        assert b["skipped"] == {}
    assert sorted(indices(batches)) == sorted(written)


def assert_repeats_only_after_a_whole_pass(batches: list[dict], shard_samples: dict[int, set[int]]) -> None:
    """Within each worker stream, no sample repeats before the stream has used every sample of
    its shards once (``shard_samples``: the samples of every shard, by the stream that reads it)."""
    for worker, samples in shard_samples.items():
        seen = indices([b for b in batches if b["worker"] == worker])
        first_repeat = next((k for k, i in enumerate(seen) if i in seen[:k]), len(seen))
        if first_repeat < len(seen):
            assert set(seen[:first_repeat]) == samples, f"stream {worker} repeats before a whole pass"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_every_rank_makes_exactly_its_steps(dataset, tokenizer, workers, world_size):
    """Epochs have the length they claim: every rank yields steps_per_epoch full batches, with
    unequal shards and however the shards fall to ranks and workers; a stream that runs short
    reads its shards again, one that has more stops at its share."""
    root, written = dataset
    batch_size = 8
    for rank in range(world_size):
        data = build(root, tokenizer, workers=workers, batch_size=batch_size, rank=rank, world_size=world_size)
        assert data.steps_per_epoch == len(written) // (batch_size * world_size)
        for epoch in range(2):
            batches = epoch_batches(data, epoch)
            assert len(batches) == data.steps_per_epoch
            for b in batches:
                check_batch(b, tokenizer, batch_size)
            assert set(indices(batches)) <= set(written)
            assert_repeats_only_after_a_whole_pass(batches, stream_samples(data, written, workers))
            assert [b["worker_done"] for b in batches].count(True) == sum(q > 0 for q in data.stream.quotas())


def test_worker_shares_follow_the_shard_sizes():
    from data.shards import apportion

    assert apportion(10, [3, 1, 1]) == [6, 2, 2]
    assert apportion(7, [1, 1, 1]) == [3, 2, 2]  # ties: the lower index first
    assert apportion(5, [0, 4, 1]) == [0, 4, 1]
    assert apportion(3, [0, 0]) == [2, 1]  # no sizes known: equal shares
    assert sum(apportion(1000, [17, 3, 12, 5, 9])) == 1000


def stream_samples(data, written: dict[int, str], workers: int) -> dict[int, set[int]]:
    """The samples of the shards that each worker stream of ``data`` reads in its current epoch."""
    return {
        w: {i for shard in data.stream.worker_shards(w) for i in written if i // ROWS == int(Path(shard).stem)}
        for w in range(max(workers, 1))
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_whole_shards(dataset, tokenizer, world_size):
    root, written = dataset
    shard_of = {i: i // ROWS for i in written}
    shards_per_rank = []
    for rank in range(world_size):
        data = build(root, tokenizer, rank=rank, world_size=world_size, workers=0)
        batches = epoch_batches(data, epoch=1)
        assert len(batches) == data.steps_per_epoch
        assert_repeats_only_after_a_whole_pass(batches, stream_samples(data, written, 0))
        shards_per_rank.append({shard_of[i] for i in indices(batches)})
    assert sum(len(s) for s in shards_per_rank) == NUM_SHARDS  # every shard goes to one rank
    assert all(len(s) == NUM_SHARDS // world_size for s in shards_per_rank)


def test_epochs_give_different_orders(dataset, tokenizer):
    root, _ = dataset
    data = build(root, tokenizer)
    first, second = indices(epoch_batches(data, 0)), indices(epoch_batches(data, 1))
    assert first != second and sorted(first) == sorted(second)
    # With a single shard only the shuffle buffer can change the order.
    one_shard = build(root, tokenizer, train_data=str(root / "00000.tar"))
    first, second = indices(epoch_batches(one_shard, 0)), indices(epoch_batches(one_shard, 1))
    assert first != second and sorted(first) == sorted(second)


def test_same_arguments_give_identical_batches(dataset, tokenizer):
    root, _ = dataset
    runs = []
    for torch_seed in (1, 2):
        torch.manual_seed(torch_seed)  # the pipeline must not depend on the global RNG
        runs.append(epoch_batches(build(root, tokenizer, workers=2, batch_size=4), epoch=3))
    assert len(runs[0]) == len(runs[1]) > 0
    for a, b in zip(*runs, strict=True):
        for key in ("image", "input_ids", "attention_mask", "image_idx", "text_idx"):
            assert torch.equal(a[key], b[key])
    other_seed = epoch_batches(build(root, tokenizer, workers=2, batch_size=4, seed=1), epoch=3)
    assert indices(other_seed) != indices(runs[0])


def test_augmentation_is_random_per_sample_but_leaves_global_rng_alone(tmp_path, tokenizer):
    # One sample repeated under many keys: identical bytes, different augmentations.
    members = {"jpg": jpeg_bytes("red"), "txt": b"a red square"}
    write_tar(tmp_path / "00000.tar", [(f"{i:03d}", members) for i in range(20)])
    data = build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=20, batch_size=20)
    state = torch.get_rng_state()
    (batch,) = epoch_batches(data)
    assert torch.equal(torch.get_rng_state(), state)
    distinct = {tuple(img.flatten().tolist()) for img in batch["image"]}
    assert len(distinct) > 10


# ---- configuration errors ------------------------------------------------------------------


def test_key_beyond_data_size_names_key_shard_and_flag(tmp_path, tokenizer):
    message = r"key 000000250 in shard .*00000\.tar.*--data_size to at least 251"
    for order in [(250, 3, 5), (3, 250, 5)]:  # caught at start-up or while streaming
        write_tar(tmp_path / "00000.tar", [(f"{i:09d}", sample_members(i, f"{i:09d}")) for i in order])
        with pytest.raises(ValueError, match=message):
            data = build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=3, shuffle_buffer=1)
            epoch_batches(data)


def test_bad_key_later_in_the_stream_stops_the_epoch(tmp_path, tokenizer):
    # workers=0 only: a DataLoader that raised from a worker takes seconds to shut down.
    good = [(f"{i:05d}", sample_members(i, f"{i:05d}")) for i in range(10)]
    write_tar(tmp_path / "00000.tar", good)
    write_tar(tmp_path / "00001.tar", [("00011", sample_members(11, "00011")), ("0x1f", sample_members(12, "x"))])
    data = build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=12, shuffle_buffer=1)
    with pytest.raises(ValueError, match=r"sample key '0x1f' in shard .*00001\.tar is not a decimal number"):
        epoch_batches(data)


def test_fewer_shards_than_ranks(dataset, tokenizer):
    root, _ = dataset
    with pytest.raises(ValueError, match=r"2 shard.*cannot be split over 3 ranks"):
        build(root, tokenizer, train_data=str(root / "{00000..00001}.tar"), world_size=3, rank=0)


def test_all_bad_samples_fail_before_training(tmp_path, tokenizer):
    write_tar(tmp_path / "00000.tar", [(f"{i:03d}", {"jpg": b"not an image", "txt": b"x"}) for i in range(5)])
    with pytest.raises(ValueError, match=r"no usable image-caption sample.*00000\.tar.*'bad_image': 5"):
        build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=5)


# ---- bad samples ---------------------------------------------------------------------------


def write_damaged_data(root: Path) -> tuple[dict[int, str], list[str]]:
    """Shard 0: one bad sample of each kind, then good ones; shard 1: truncated inside a
    member after 6 good samples; shard 2: not a tar. Returns (good samples, bad shard paths)."""
    root.mkdir()
    bad = {
        900: {"jpg": truncated_jpeg(900), "txt": b"truncated image"},
        901: {"jpg": b"<html>404 not found</html>", "txt": b"not an image"},
        902: {"txt": b"no image at all", "json": b"{}"},
        903: {"jpg": jpeg_bytes("red"), "json": b"{}"},
        904: {"jpg": jpeg_bytes("red"), "txt": b"?! ... --"},
        905: {"jpg": jpeg_bytes("red"), "txt": "caf\u00e9 latin-1".encode("latin-1")},
        906: {"png": huge_png(), "txt": b"a huge white image"},
    }
    good = list(range(10, 20))
    write_tar(
        root / "00000.tar",
        [*((f"{k}", m) for k, m in bad.items()), *((f"{i}", sample_members(i, "")) for i in good)],
    )
    write_stats(root / "00000.tar", len(bad) + len(good), len(bad) + len(good))

    kept = list(range(20, 26))
    write_tar(root / "00001.tar", [(f"{i}", sample_members(i, "")) for i in [*kept, 26, 27]])
    data = (root / "00001.tar").read_bytes()
    # Cut inside the jpg of sample 26: the 6 samples before it are complete.
    cut = data.index(b"26.jpg") + 512 + 100
    (root / "00001.tar").write_bytes(data[:cut])
    write_stats(root / "00001.tar", 8, 8)

    (root / "00002.tar").write_bytes(b"this is not a tar file" * 50)
    write_stats(root / "00002.tar", 0, 0)
    return {i: caption_of(i) for i in good + kept}, [str(root / "00001.tar"), str(root / "00002.tar")]


def test_bad_samples_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    root = tmp_path / "damaged"
    good, bad_shards = write_damaged_data(root)
    expected = Counter(bad_image=2, missing_image=1, missing_caption=1, empty_caption=1, bad_caption=1, huge_image=1)
    for epoch in range(2):
        # the epoch as long as the good samples: one pass, every good sample once
        data = build(root, tokenizer, train_data=str(root), shuffle_buffer=1, data_size=1000, train_num_samples=16)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.shards"):
            batches = epoch_batches(data, epoch)
        for b in batches:
            check_batch(b, tokenizer, 1)
        assert sorted(indices(batches)) == sorted(good)
        # Every bad sample and shard read reaches a batch, with the shard it came from. The
        # epoch ends with its last good sample: a bad shard read last may not be reached.
        messages = [r.getMessage() for r in caplog.records if r.name == "data.shards"]
        read = [p for p in bad_shards if sum(p in m for m in messages) == 1]
        assert set(bad_shards) - set(read) <= {data.stream.worker_shards(0)[-1]}
        reported = sum((Counter(b["skipped"]) for b in batches), Counter())
        assert reported == expected + Counter(bad_shard=len(read))
        shards = sum((Counter(b["skipped_shards"]) for b in batches), Counter())
        assert shards == Counter({str(root / "00000.tar"): expected.total(), **dict.fromkeys(read, 1)})
        (summary,) = [m for m in messages if "skipped bad samples" in m]
        assert f"{dict(sorted((expected + Counter(bad_shard=len(read))).items()))}" in summary


def test_malformed_stats_file_is_named(tmp_path):
    path = tmp_path / "00000.tar"
    write_tar(path, [])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10}))
    with pytest.raises(ValueError, match=r"00000_stats\.json has no integer 'successes'"):
        count_samples([str(path)])


def test_json_and_webp_members_are_tolerated(tmp_path, tokenizer):
    # img2dataset may write .webp or .png images; keys with fewer digits; any member order.
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (20, 20, 230)).save(out, format="WEBP")
    samples = [("17", {"json": b"{}", "txt": caption_of(2).encode(), "webp": out.getvalue()})]
    samples += [(str(i), sample_members(i, str(i))) for i in (40, 8)]
    write_tar(tmp_path / "00000.tar", samples)
    batches = epoch_batches(build(tmp_path, tokenizer, train_data=str(tmp_path), train_num_samples=3))
    assert sorted(indices(batches)) == [8, 17, 40]
    seventeen = next(b for b in batches if int(b["image_idx"][0]) == 17)
    assert nearest_colour(seventeen["image"][0].numpy()) == "blue"


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"]
)
@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
def test_tar_reader_reads_what_tarfile_writes(tmp_path, fmt, compress):
    """The project's tar reader against tarfile itself: long names (a prefix field, GNU or pax
    records), a directory entry, empty and multi-block members, gzip."""
    from data.shards import tar_members

    files = {
        "000000001.jpg": jpeg_bytes("red"),
        "000000001.txt": b"",
        "sub/000000002.txt": b"x" * 1025,
        ("d" * 60 + "/" + "e" * 70 + "/000000003.txt"): "caf\u00e9".encode(),
    }
    path = tmp_path / ("a.tar.gz" if compress else "a.tar")
    with tarfile.open(path, "w:gz" if compress else "w", format=fmt) as tar:
        info = tarfile.TarInfo("sub")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if compress else raw
        got = {name: read() for name, read in tar_members(stream)}
    assert got == files
    samples = list(read_shard(str(path), 10, Skips()))
    assert [s.index for s in samples] == [1, 2, 3] and samples[0].members["jpg"] == files["000000001.jpg"]


def test_a_huge_jpeg_is_refused_from_its_header():
    """A JPEG announcing 10000 x 10000 pixels in its frame header is skipped before any decoding."""
    from data.batching import BadSampleError, load_rgb

    frame = b"\xff\xc0\x00\x11\x08" + (10000).to_bytes(2, "big") * 2 + b"\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    data = b"\xff\xd8" + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + frame
    with pytest.raises(BadSampleError, match="huge_image: 10000x10000 pixels"):
        load_rgb(data)
