"""The training data of one rank: a loader of tokenised batches and the epoch length."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler

from data.batching import BadSampleError, TokenizingCollator
from data.caption_json import CaptionJsonDataset
from data.shards import (
    ShardStream,
    check_keys_from_metadata,
    count_samples,
    decode_sample,
    expand_shards,
    read_shard,
)
from data.transforms import train_transform

# Raw samples read before giving up on finding one usable sample at start-up.
PROBE_SAMPLES = 1000


class _EpochAware(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class TrainData:
    """``loader`` yields batches of exactly ``batch_size`` pairs (this rank's share).

    ``num_samples``: samples in one epoch over all ranks; ``steps_per_epoch``:
    ``num_samples // (batch_size * world_size)``. Ranks may run dry at different steps;
    the training loop stops every rank at the first one that does.
    """

    loader: Iterable[dict]
    num_samples: int
    steps_per_epoch: int
    epoch_aware: Sequence[_EpochAware]

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch: reshuffles and reseeds augmentation."""
        for part in self.epoch_aware:
            part.set_epoch(epoch)


def build_train_data(
    *,
    train_data: str | None,
    train_file: str | None,
    train_image_root: str | None,
    train_num_samples: int | None,
    data_size: int,
    tokenizer,
    image_res: int,
    max_words: int,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int,
    world_size: int,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    shuffle_buffer: int = 1000,
) -> TrainData:
    """Training data from webdataset shards (``train_data``) or a caption JSON list
    (``train_file`` with images under ``train_image_root``); exactly one must be given.

    Batches: ``image`` float32 [b, 3, image_res, image_res]; ``input_ids``,
    ``attention_mask`` long [b, L]; ``image_idx``, ``text_idx`` long [b] in
    ``[0, data_size)``; ``skipped`` dict kind -> count of bad samples passed over by the
    producing worker since its previous batch. Paths and settings are checked, and one usable
    sample is looked for, before this returns.
    """
    if (train_data is None) == (train_file is None):
        raise ValueError("give exactly one of --train_data (webdataset shards) and --train_file (caption JSON)")
    _check_settings(
        data_size=data_size,
        batch_size=batch_size,
        workers=workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        max_words=max_words,
        shuffle_buffer=shuffle_buffer,
    )
    transform = train_transform(image_res, crop_scale, hflip)
    collate = TokenizingCollator(tokenizer, max_words)
    # Worker seeds come from a generator of our own, so iterating leaves torch's global RNG alone.
    loader_options = dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
    if train_data is not None:
        shards = expand_shards(train_data)
        num_samples = train_num_samples if train_num_samples is not None else count_samples(shards)
        if num_samples is None:
            raise ValueError(
                f"{train_data}: some shards have no _stats.json beside them, so the epoch length is "
                "unknown; pass --train_num_samples (the number of samples in the shards)"
            )
        stream = ShardStream(
            shards,
            data_size=data_size,
            transform=transform,
            collate=collate,
            max_words=max_words,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=shuffle_buffer,
        )
        check_keys_from_metadata(shards, data_size)
        _probe_shards(shards, data_size, transform, max_words)
        # batch_size=None: the stream yields whole batches, each from a single worker.
        loader = DataLoader(stream, batch_size=None, **loader_options)
        epoch_aware: list[_EpochAware] = [stream]
    else:
        if train_num_samples is not None:
            raise ValueError("--train_num_samples applies to --train_data shards; a --train_file epoch is all its rows")
        if train_image_root is None:
            raise ValueError("--train_file needs --train_image_root, the folder its image paths are relative to")
        dataset = CaptionJsonDataset(
            train_file,
            train_image_root,
            data_size=data_size,
            transform=transform,
            max_words=max_words,
            seed=seed,
        )
        dataset[0]  # raises, naming the image root, when no image near the start can be read
        num_samples = len(dataset)
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate, drop_last=True, **loader_options)
        epoch_aware = [sampler, dataset]

    steps_per_epoch = num_samples // (batch_size * world_size)  # may be 0: the caller decides
    return TrainData(loader, num_samples, steps_per_epoch, epoch_aware)


def _check_settings(
    *,
    data_size: int,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int,
    world_size: int,
    max_words: int,
    shuffle_buffer: int,
) -> None:
    checks = [
        (data_size >= 1, f"--data_size must be positive, got {data_size}"),
        (batch_size >= 1, f"the per-rank batch size must be positive, got {batch_size}"),
        (workers >= 0, f"--workers must be 0 or more, got {workers}"),
        (seed >= 0, f"--seed must be 0 or more, got {seed}"),
        (world_size >= 1 and 0 <= rank < world_size, f"rank {rank} is not in a world of size {world_size}"),
        (max_words >= 1, f"max_words must be positive, got {max_words}"),
        (shuffle_buffer >= 1, f"shuffle_buffer must be 1 (no shuffling) or more, got {shuffle_buffer}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _probe_shards(shards: list[str], data_size: int, transform, max_words: int) -> None:
    """Fail before training when the first readable samples are all unusable.

    Stops at the first good sample, so a healthy data set costs one decode. Bad keys
    (non-numeric, beyond ``data_size``) near the start also surface here.
    """
    skipped: Counter[str] = Counter()
    raw = (sample for shard in shards for sample in read_shard(shard, data_size, skipped))
    for sample in islice(raw, PROBE_SAMPLES):
        try:
            decode_sample(sample, transform, max_words, seed=0)
            return
        except BadSampleError as bad:
            skipped[bad.kind] += 1
    raise ValueError(
        f"no usable image-caption sample at the start of the {len(shards)} shard(s) beginning with "
        f"{shards[0]} (skipped: {dict(skipped)}); check --train_data"
    )
