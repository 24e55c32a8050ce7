"""Training pairs from a caption JSON list, the original code base's format (DATA.md 2).

The file is a list of ``{"image": <path under the image root>, "caption": <str>,
"image_id": <hashable>}``. Text index = row number; image index = dense id of
``image_id`` in order of first appearance, so captions of one image share it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from data.batching import BadSampleError, Pair, Skips, augment, clean_caption, derive_seed, load_rgb
from data.transforms import TrainAugment

# A row whose image cannot be used is replaced by the next rows, at most this many.
MAX_REPLACEMENTS = 64


class _Strings:
    """Many strings in one UTF-8 buffer.

    Forked loader workers share numpy buffers, whereas a list of millions of Python strings
    would be copied page by page into every worker as reference counts change.
    """

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.cumsum([0, *(len(b) for b in encoded)], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


def read_caption_rows(ann_file: str) -> list[tuple[str, str, object]]:
    """``(image, caption, image_id)`` per row, checked for the expected fields and types."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"caption JSON file {ann_file} not found (--train_file)")
    with open(ann_file, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{ann_file} must hold a non-empty JSON list of {{image, caption, image_id}} rows")
    parsed = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not {"image", "caption", "image_id"} <= row.keys():
            raise ValueError(f"row {n} of {ann_file} needs the keys 'image', 'caption' and 'image_id': {row!r}")
        if not isinstance(row["image"], str) or not isinstance(row["caption"], str):
            raise ValueError(f"row {n} of {ann_file}: 'image' and 'caption' must be strings: {row!r}")
        parsed.append((row["image"], row["caption"], row["image_id"]))
    return parsed


class CaptionJsonDataset(Dataset):
    """Map-style dataset of augmented pairs; ``dataset[row]`` -> :class:`Pair`.

    An image that cannot be used (missing, corrupt, huge) or a caption that is empty after
    cleaning is replaced by the next usable row and counted in ``Pair.skipped`` (by kind, and
    by the image's folder or, for a caption, the annotation file), so batches keep their
    size. Augmentation is seeded from ``(seed, epoch, row)``.
    """

    def __init__(
        self,
        ann_file: str,
        image_root: str,
        *,
        data_size: int,
        transform: TrainAugment,
        max_words: int,
        seed: int,
    ):
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image root {image_root} not found (--train_image_root)")
        rows = read_caption_rows(ann_file)
        if data_size < len(rows):
            raise ValueError(
                f"{ann_file} has {len(rows)} rows but --data_size is {data_size}; "
                f"set --data_size to at least {len(rows)} (text indices are row numbers)"
            )
        dense: dict = {}
        try:
            self.image_idx = np.array([dense.setdefault(r[2], len(dense)) for r in rows], dtype=np.int64)
        except TypeError as error:
            raise ValueError(f"{ann_file}: every 'image_id' must be a string or a number ({error})") from error
        self.paths = _Strings(r[0] for r in rows)
        self.captions = _Strings(r[1] for r in rows)
        self.num_images = len(dense)
        self.image_root = image_root
        self.ann_file = ann_file
        self.transform = transform
        self.max_words = max_words
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_idx)

    def __getitem__(self, row: int) -> Pair:
        skipped = Skips()
        for attempt in range(MAX_REPLACEMENTS + 1):
            used = (row + attempt) % len(self)
            path = os.path.join(self.image_root, self.paths[used])
            try:
                caption = clean_caption(self.captions[used], self.max_words)
            except BadSampleError as bad:
                skipped.add(bad.kind, self.ann_file)
                continue
            try:
                image = load_rgb(path)
            except BadSampleError as bad:
                # Counted per folder: broken images cluster in the folders of failed downloads.
                skipped.add(bad.kind, os.path.dirname(path))
                continue
            # The requested row is part of the seed so that a replacement never repeats the
            # augmentation of the row it duplicates.
            image = augment(self.transform, image, derive_seed(self.seed, self.epoch, row, used))
            return Pair(image, caption, int(self.image_idx[used]), used, skipped)
        raise RuntimeError(
            f"rows {row}..{used} of {self.ann_file} have no usable image under {self.image_root} "
            f"({dict(skipped.kinds)}); check --train_image_root and the image files"
        )


class ResumableSampler(DistributedSampler):
    """This rank's rows in the ``(seed, epoch)``-fixed order of ``DistributedSampler``
    (shuffled, ``drop_last``), optionally starting after the first ``batches`` batches.

    Resuming skips the rows of the consumed batches without reading them; the batches that
    follow are the same as in an uninterrupted epoch because the order and every
    augmentation seed depend only on ``(seed, epoch, row)``.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start = 0

    def set_epoch(self, epoch: int, batches: int = 0) -> None:
        full_batches = self.num_samples // self.batch_size
        if not 0 <= batches <= full_batches:
            raise ValueError(
                f"the saved data position is {batches} batches into the epoch, but this rank's epoch holds "
                f"{full_batches} batches of {self.batch_size}; resume with the same --train_file, ranks and "
                "batch size"
            )
        super().set_epoch(epoch)
        self.start = batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start
