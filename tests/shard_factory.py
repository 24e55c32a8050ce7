"""Small real test data: img2dataset-style webdataset shards, caption-JSON lists with their image
folders, and an offline word-level tokenizer.

Every image is a 16x16 JPEG whose dominant colour is ``colour_of(index)`` (with a mild
gradient so crops and flips change pixels), and whose caption is ``caption_of(index)``, so
a test can check from a batch alone that image, caption and index belong together.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data.transforms import pre_caption

PALETTE = {
    "red": (230, 20, 20),
    "green": (20, 230, 20),
    "blue": (20, 20, 230),
    "yellow": (230, 230, 20),
    "cyan": (20, 230, 230),
    "magenta": (230, 20, 230),
    "white": (235, 235, 235),
    "black": (15, 15, 15),
}
NAMES = list(PALETTE)


def colour_of(index: int) -> str:
    return NAMES[index % len(NAMES)]


def caption_of(index: int) -> str:
    """Raw caption with capitals and punctuation, so ``pre_caption`` has work to do."""
    return f"Sample {index}: a {colour_of(index).upper()} square, seen from afar!"


def jpeg_bytes(colour: str, size: int = 16) -> bytes:
    """A JPEG of ``colour`` with a +-20 diagonal gradient."""
    ramp = np.add.outer(np.arange(size), np.arange(size)) / (2 * size - 2) * 40 - 20
    pixels = np.clip(np.array(PALETTE[colour])[None, None, :] + ramp[:, :, None], 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def nearest_colour(image) -> str:
    """Palette name closest to the mean colour of a uint8 image [3, H, W]."""
    rgb = np.asarray(image, dtype=np.float64).mean(axis=(1, 2))
    return min(NAMES, key=lambda n: float(np.sum((np.array(PALETTE[n]) - np.asarray(rgb)) ** 2)))


def sample_members(index: int, key: str) -> dict[str, bytes]:
    """The members img2dataset writes for one successful row: jpg, txt, json."""
    meta = {
        "caption": caption_of(index),
        "url": f"http://example.com/{index}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 16,
        "height": 16,
        "original_width": 16,
        "original_height": 16,
        "exif": "{}",
        "sha256": "0" * 64,
    }
    return {
        "jpg": jpeg_bytes(colour_of(index)),
        "txt": caption_of(index).encode("utf-8"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """One tar with the members of each (key, {suffix: bytes}) adjacent, in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def write_stats(path: Path, count: int, successes: int) -> None:
    stats = {
        "count": count,
        "successes": successes,
        "failed_to_download": count - successes,
        "failed_to_resize": 0,
        "duration": 1.0,
    }
    (path.parent / f"{path.stem}_stats.json").write_text(json.dumps(stats))


def write_shards(root: Path, num_shards: int, rows_per_shard: int, *, digits: int = 9, seed: int = 0) -> dict[int, str]:
    """img2dataset-style shards ``root/00000.tar ...``: shard s holds rows
    ``[s * rows_per_shard, (s + 1) * rows_per_shard)`` except every 7th row (a failed
    download), in shuffled order, with ``_stats.json`` beside each tar.

    Returns {index: raw caption} of the samples written; data_size = num_shards * rows_per_shard.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written: dict[int, str] = {}
    for s in range(num_shards):
        rows = [r for r in range(s * rows_per_shard, (s + 1) * rows_per_shard) if r % 7 != 3]
        rng.shuffle(rows)
        path = root / f"{s:05d}.tar"
        write_tar(path, [(f"{r:0{digits}d}", sample_members(r, f"{r:0{digits}d}")) for r in rows])
        write_stats(path, rows_per_shard, len(rows))
        written.update({r: caption_of(r) for r in rows})
    return written


def truncated_jpeg(index: int) -> bytes:
    data = jpeg_bytes(colour_of(index))
    return data[: len(data) * 2 // 3]


def huge_png(side: int = 8000) -> bytes:
    """A valid bilevel PNG of side x side pixels (64 megapixels by default), a few KB on disk."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


def make_tokenizer(captions: Iterable[str], max_words: int = 30) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the cleaned captions, with [CLS] ... [SEP] around each text."""
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    core.train_from_iterator(
        [pre_caption(c, max_words) for c in captions], trainers.WordLevelTrainer(special_tokens=specials)
    )
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, core.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def write_caption_files(root: Path, num_rows: int) -> tuple[Path, Path]:
    """A caption-JSON list ``root/train.json`` whose row ``r`` captions ``images/{r // 2:04d}.jpg``
    (coloured ``colour_of(r // 2)``, image_id ``r // 2``) with ``caption_of(r)``.

    Returns (annotation file, image root).
    """
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for row in range(num_rows):
        path = images / f"{row // 2:04d}.jpg"
        if not path.exists():
            path.write_bytes(jpeg_bytes(colour_of(row // 2)))
        rows.append({"image": path.name, "caption": caption_of(row), "image_id": row // 2})
    ann = root / "train.json"
    ann.write_text(json.dumps(rows))
    return ann, images
