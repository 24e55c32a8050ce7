"""Training pairs streamed from webdataset shards as img2dataset writes them (DATA.md 1).

Each sample is a run of adjacent tar members ``KEY.jpg|png|webp``, ``KEY.txt``,
``KEY.json``; ``int(KEY)`` is both its image and its text index. In epoch ``e`` the shard
list is permuted by an RNG seeded from ``(seed, e)``; permuted shard ``k`` goes to rank
``k % world_size`` and a rank's shards are dealt round-robin to its loader workers, so no
sample is read twice in an epoch. A worker streams its shards, shuffles raw samples in a
buffer, decodes and augments them, and yields whole tokenised batches. Everything random
is seeded from ``(seed, epoch, rank, worker)`` and the position in the shuffled stream, so
the batch sequence is a function of the arguments alone. Bad samples are skipped and
counted per kind; they never stop the run.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import braceexpand
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.batching import (
    BadSampleError,
    Pair,
    augment_seeded,
    clean_caption,
    derive_seed,
    load_rgb,
)

logger = logging.getLogger("data.shards")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_KEY = re.compile(r"[0-9]+")


def expand_shards(spec: str) -> list[str]:
    """Shard paths from ``dir/{00000..00019}.tar``, a directory of ``*.tar``, a single tar,
    or several of these joined by ``::``. Every path must exist."""
    paths: list[str] = []
    missing: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not found:
                raise FileNotFoundError(f"no *.tar shards in directory {part}")
            paths += found
            continue
        for path in braceexpand.braceexpand(part):
            (paths if os.path.isfile(path) else missing).append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard path(s) of {spec!r} not found: {shown}")
    if not paths:
        raise ValueError(f"no shards named by {spec!r}; pass a brace pattern, a directory or tar files")
    return paths


def stats_path(shard: str) -> str:
    """``.../00000.tar`` -> ``.../00000_stats.json`` (img2dataset's per-shard stats)."""
    return os.path.splitext(shard)[0] + "_stats.json"


def count_samples(shards: list[str]) -> int | None:
    """Sum of ``successes`` in the ``_stats.json`` files beside the shards; None if any is missing."""
    total = 0
    for shard in shards:
        path = stats_path(shard)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            try:
                total += int(json.load(f)["successes"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path} has no integer 'successes' field ({error}); "
                    "pass --train_num_samples to skip the stats files"
                ) from error
    return total


def check_keys_from_metadata(shards: list[str], data_size: int) -> int | None:
    """Largest sample key listed in the ``.parquet`` metadata beside the shards (img2dataset
    writes one per tar), checked against ``data_size`` before any sample is read.

    Returns None when some shard has no parquet file; the keys are then checked as samples
    are read.
    """
    largest, where = -1, None
    for shard in shards:
        path = os.path.splitext(shard)[0] + ".parquet"
        if not os.path.isfile(path):
            return None
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        for key in keys:
            if key is not None and _KEY.fullmatch(str(key)) and int(key) > largest:
                largest, where = int(key), path
    if largest >= data_size:
        raise ValueError(
            f"the shard metadata lists sample keys up to {largest} (in {where}), outside the index space "
            f"of --data_size {data_size}; set --data_size to at least {largest + 1} "
            "(the number of rows of the input metadata)"
        )
    return largest


@dataclass
class RawSample:
    """Undecoded sample: the members it needs, by lower-case suffix (``jpg``, ``txt``, ...)."""

    index: int
    members: dict[str, bytes]


def sample_index(key: str, shard: str, data_size: int) -> int:
    """``int(KEY)``, checked to be a decimal key inside ``[0, data_size)``."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"sample key {key!r} in shard {shard} is not a decimal number (img2dataset keys are)")
    index = int(key)
    if index >= data_size:
        raise ValueError(
            f"sample key {key} in shard {shard} is outside the index space of --data_size {data_size}; "
            f"set --data_size to at least {index + 1} (the number of rows of the input metadata)"
        )
    return index


def read_shard(path: str, data_size: int, skipped: Counter[str]) -> Iterator[RawSample]:
    """Stream the samples of one tar in file order.

    A shard that cannot be opened or read to the end counts once as ``bad_shard`` (with a
    warning); the samples completed before the fault are kept, the one being read is dropped.
    """
    kept = (*IMAGE_SUFFIXES, "txt")
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, _, name = info.name.rpartition("/")
                stem, dot, suffix = name.partition(".")
                if not dot:
                    continue
                if (dirname, stem) != key:
                    if key is not None:
                        yield RawSample(sample_index(key[1], path, data_size), members)
                    key, members = (dirname, stem), {}
                suffix = suffix.lower()
                if suffix in kept:
                    members[suffix] = tar.extractfile(info).read()
    except (OSError, EOFError, tarfile.TarError) as error:
        logger.warning("skipping the rest of shard %s: %s: %s", path, type(error).__name__, error)
        skipped["bad_shard"] += 1
        return
    if key is not None:
        yield RawSample(sample_index(key[1], path, data_size), members)


def shuffle_buffered(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream: hold ``size`` items and emit a random one per new item."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def decode_sample(raw: RawSample, transform: Callable[[Image.Image], torch.Tensor], max_words: int, seed: int) -> Pair:
    """Raw sample -> augmented ``Pair``; raises ``BadSampleError`` naming what is wrong."""
    members = raw.members
    suffix = next((s for s in IMAGE_SUFFIXES if s in members), None)
    if suffix is None:
        raise BadSampleError("missing_image", f"key {raw.index}")
    if "txt" not in members:
        raise BadSampleError("missing_caption", f"key {raw.index}")
    try:
        text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadSampleError("bad_caption", f"key {raw.index}: {error}") from error
    caption = clean_caption(text, max_words)
    image = augment_seeded(transform, load_rgb(members[suffix]), seed)
    return Pair(image, caption, raw.index, raw.index)


class ShardStream(IterableDataset):
    """One rank's share of the shards as a stream of whole batches (use ``batch_size=None``).

    Each loader worker batches only its own samples and drops its incomplete last batch.
    Call :meth:`set_epoch` before creating each epoch's iterator.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        data_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        collate: Callable[[list[Pair]], dict],
        max_words: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
    ):
        if len(shards) < world_size:
            raise ValueError(
                f"{len(shards)} shard(s) cannot be split over {world_size} ranks; "
                "use at least as many shards as ranks (each rank reads whole shards)"
            )
        self.shards = list(shards)
        self.data_size = data_size
        self.transform = transform
        self.collate = collate
        self.max_words = max_words
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards this rank's ``worker`` reads in the current epoch."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        mine = [self.shards[k] for k in order[self.rank :: self.world_size]]
        return mine[worker::num_workers]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(worker, num_workers)

    def batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The batches of one worker in the current epoch, deterministically."""
        stream_seed = (self.seed, self.epoch, self.rank, worker)
        skipped: Counter[str] = Counter()
        raw = (
            sample
            for shard in self.worker_shards(worker, num_workers)
            for sample in read_shard(shard, self.data_size, skipped)
        )
        shuffled = shuffle_buffered(raw, self.shuffle_buffer, random.Random(derive_seed(*stream_seed)))
        pairs: list[Pair] = []
        epoch_total: Counter[str] = Counter()
        # The augmentation seed depends only on the position in the shuffled raw stream, so a
        # resume can skip raw samples without decoding them.
        for position, sample in enumerate(shuffled):
            try:
                pair = decode_sample(sample, self.transform, self.max_words, derive_seed(*stream_seed, position))
            except BadSampleError as bad:
                skipped[bad.kind] += 1
                continue
            pairs.append(replace(pair, skipped=dict(skipped)))
            epoch_total.update(skipped)
            skipped.clear()
            if len(pairs) == self.batch_size:
                yield self.collate(pairs)
                pairs = []
        # Counts after the last full batch reach no batch; the total is logged instead.
        epoch_total.update(skipped)
        if epoch_total:
            logger.warning(
                "rank %d worker %d skipped bad samples in epoch %d: %s",
                self.rank,
                worker,
                self.epoch,
                dict(sorted(epoch_total.items())),
            )
