"""The caption-JSON pipeline on a real JSON list and real JPEG files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.loaders import build_train_data
from data.transforms import pre_caption
from shard_factory import caption_of, colour_of, jpeg_bytes, make_tokenizer, nearest_colour

NUM_IMAGES = 24
MAX_WORDS = 30


def image_id_of_row(row: int) -> object:
    """Rows 2k and 2k+1 caption the same image; ids mix strings and ints as real files may."""
    image = row // 2
    return f"img-{image}" if image % 3 else image


def write_caption_json(root: Path) -> tuple[Path, Path, list[dict]]:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rows = []
    for row in range(2 * NUM_IMAGES):
        image = row // 2
        path = f"sub/{image:04d}.jpg"
        if not (images / path).exists():
            (images / path).write_bytes(jpeg_bytes(colour_of(image)))
        rows.append({"image": path, "caption": caption_of(row), "image_id": image_id_of_row(row)})
    ann = root / "train.json"
    ann.write_text(json.dumps(rows))
    return ann, images, rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    return write_caption_json(tmp_path_factory.mktemp("caption_json"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([caption_of(i) for i in range(2 * NUM_IMAGES)], MAX_WORDS)


def build(ann: Path, images: Path, tokenizer, **overrides):
    args = dict(
        train_data=None,
        train_file=str(ann),
        train_image_root=str(images),
        train_num_samples=None,
        data_size=2 * NUM_IMAGES,
        tokenizer=tokenizer,
        image_res=16,
        max_words=MAX_WORDS,
        batch_size=4,
        workers=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    args.update(overrides)
    return build_train_data(**args)


def epoch_rows(data, epoch: int) -> list[int]:
    data.set_epoch(epoch)
    return [int(i) for batch in data.loader for i in batch["text_idx"]]


def test_indices_captions_and_images_match_the_rows(data_files, tokenizer):
    ann, images, rows = data_files
    # Dense image ids in order of first appearance, computed independently of the reader.
    dense: dict = {}
    expected_image_idx = [dense.setdefault(r["image_id"], len(dense)) for r in rows]
    data = build(ann, images, tokenizer, workers=2)
    assert (data.num_samples, data.steps_per_epoch) == (2 * NUM_IMAGES, 2 * NUM_IMAGES // 4)
    data.set_epoch(0)
    batches = list(data.loader)
    assert len(batches) == data.steps_per_epoch
    for batch in batches:
        assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.uint8
        assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
        assert batch["skipped"] == {} and batch["skipped_shards"] == {}
        texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        for row, image_idx, text, image in zip(
            batch["text_idx"].tolist(), batch["image_idx"].tolist(), texts, batch["image"], strict=True
        ):
            assert image_idx == expected_image_idx[row]
            assert text == pre_caption(rows[row]["caption"], MAX_WORDS)
            assert nearest_colour(image.numpy()) == colour_of(row // 2)
    assert sorted(i for b in batches for i in b["text_idx"].tolist()) == list(range(2 * NUM_IMAGES))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_rows(data_files, tokenizer, world_size):
    ann, images, _ = data_files
    per_rank = [
        epoch_rows(build(ann, images, tokenizer, rank=r, world_size=world_size, batch_size=2), epoch=1)
        for r in range(world_size)
    ]
    union = [row for rows in per_rank for row in rows]
    assert len(union) == len(set(union))
    per_rank_rows = (2 * NUM_IMAGES // world_size) // 2 * 2
    assert all(len(rows) == per_rank_rows for rows in per_rank)


def test_set_epoch_reshuffles_and_is_reproducible(data_files, tokenizer):
    ann, images, _ = data_files
    data = build(ann, images, tokenizer)
    first, second, again = epoch_rows(data, 0), epoch_rows(data, 1), epoch_rows(data, 0)
    assert first != second and sorted(first) == sorted(second)
    assert first == again


def test_unreadable_image_is_counted_and_replaced(tmp_path, tokenizer):
    ann, images, rows = write_caption_json(tmp_path)
    (images / rows[5]["image"]).write_bytes(b"not a jpeg")  # rows 4 and 5 share this image
    (images / rows[10]["image"]).unlink()  # rows 10 and 11
    data = build(ann, images, tokenizer, batch_size=8)
    data.set_epoch(0)
    batches = list(data.loader)
    assert all(b["image"].shape[0] == 8 for b in batches)
    # Every failed attempt counts: row 4 tries 4 and 5, row 5 tries 5; the same for 10 and 11.
    assert sum(b["skipped"].get("bad_image", 0) for b in batches) == 6
    used = sorted(i for b in batches for i in b["text_idx"].tolist())
    # Each bad row is replaced by the next usable one: 4 and 5 by 6, 10 and 11 by 12.
    expected = sorted([r for r in range(2 * NUM_IMAGES) if r not in (4, 5, 10, 11)] + [6, 6, 12, 12])
    assert used == expected


def test_bad_rows_are_counted_by_image_folder_and_annotation_file(tmp_path, tokenizer):
    ann, images, rows = write_caption_json(tmp_path)
    (images / rows[5]["image"]).write_bytes(b"not a jpeg")  # rows 4 and 5: three failed attempts
    rows[20]["caption"] = "?! --"  # nothing left after cleaning
    ann.write_text(json.dumps(rows))
    data = build(ann, images, tokenizer, batch_size=8)
    data.set_epoch(0)
    batches = list(data.loader)
    assert sum((Counter(b["skipped"]) for b in batches), Counter()) == Counter(bad_image=3, empty_caption=1)
    sources = sum((Counter(b["skipped_shards"]) for b in batches), Counter())
    assert sources == Counter({str(images / "sub"): 3, str(ann): 1})


def test_missing_paths_and_bad_settings_fail_clearly(data_files, tokenizer, tmp_path):
    ann, images, _ = data_files
    with pytest.raises(FileNotFoundError, match=r"caption JSON file .*absent\.json"):
        build(tmp_path / "absent.json", images, tokenizer)
    with pytest.raises(FileNotFoundError, match=r"image root .*no_images"):
        build(ann, tmp_path / "no_images", tokenizer)
    with pytest.raises(ValueError, match=r"48 rows but --data_size is 40; set --data_size to at least 48"):
        build(ann, images, tokenizer, data_size=40)
    with pytest.raises(ValueError, match=r"exactly one of --train_data"):
        build(ann, images, tokenizer, train_data=str(tmp_path))
    with pytest.raises(ValueError, match=r"--train_num_samples applies to --train_data"):
        build(ann, images, tokenizer, train_num_samples=10)
    with pytest.raises(RuntimeError, match=r"no usable image under .*empty_root"):
        (tmp_path / "empty_root").mkdir()
        build(ann, tmp_path / "empty_root", tokenizer)
    bad_rows = tmp_path / "bad_rows.json"
    bad_rows.write_text(json.dumps([{"image": "a.jpg", "text": "no caption key", "image_id": 1}]))
    with pytest.raises(ValueError, match=r"row 0 of .*bad_rows\.json needs the keys"):
        build(bad_rows, images, tokenizer)
