"""The training data of one rank: a loader of tokenised batches, the epoch length, and the
position within an epoch that makes a mid-epoch resume exact."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from itertools import islice

import torch

from data.batching import BadSampleError, Skips, TokenizingCollator
from data.caption_json import CaptionJsonDataset, ResumableSampler
from data.shards import (
    ShardStream,
    check_keys_from_metadata,
    decode_sample,
    expand_shards,
    is_url,
    read_shard,
    shard_sizes,
)
from data.transforms import TrainAugment
from data.workers import DataLoader

# Raw samples, and shards from the start of the list, read before giving up on finding one
# usable sample at start-up. The shard limit matters for URLs: with wrong credentials every
# pipe: command fails, and trying a thousand of them would take many minutes.
PROBE_SAMPLES = 1000
PROBE_SHARDS = 10

# Settings a data position depends on, with the flag that sets each, for error messages.
POSITION_SETTINGS = {
    "seed": "--seed",
    "world_size": "the number of ranks",
    "rank": "the rank",
    "workers": "--workers",
    "batch_size": "the per-rank batch size",
    "shards": "the number of --train_data shards",
    "shuffle_buffer": "--shuffle_buffer",
    "rows": "the number of --train_file rows",
    "num_samples": "the epoch length (--train_num_samples or the stats files)",
}


@dataclass
class TrainData:
    """The training data of one rank: ``loader`` yields exactly ``steps_per_epoch`` batches of
    exactly ``batch_size`` pairs per epoch, on every rank.

    ``num_samples``: samples in one epoch over all ranks; ``steps_per_epoch``:
    ``num_samples // (batch_size * world_size)``. With shards, a worker stream whose shards
    hold fewer samples than its share of the epoch reads them again (see
    :class:`~data.shards.ShardStream`).

    Batch keys: ``image`` uint8 [b, 3, image_res, image_res]; ``input_ids``,
    ``attention_mask`` long [b, L]; ``image_idx``, ``text_idx`` long [b] in
    ``[0, data_size)``; ``skipped`` dict kind -> count and ``skipped_shards`` dict source ->
    count of the bad samples passed over since the producing worker's previous batch (kinds:
    bad_image, missing_image, missing_caption, empty_caption, bad_caption, huge_image,
    bad_shard; a source is a shard path, or for caption JSON an image folder or the
    annotation file). With shards also ``worker`` int, ``consumed`` int and ``worker_done``
    bool (see :class:`~data.shards.ShardStream`).

    Position within an epoch (:meth:`advance`), a JSON-serialisable dict: ``settings`` (what
    the batch sequence depends on: ``source`` "shards" or "caption_json", ``seed``,
    ``world_size``, ``rank``, ``workers``, ``batch_size``, and ``shards`` and
    ``shuffle_buffer`` or ``rows``), ``epoch``, ``batches`` consumed, and with shards
    ``consumed`` [int per worker stream], ``made`` [batches per worker stream], ``finished``
    [bool per worker stream] and ``last_worker`` (-1 before the first batch).
    """

    loader: DataLoader
    num_samples: int
    steps_per_epoch: int
    settings: dict[str, int | str]
    stream: ShardStream | None = None
    sampler: ResumableSampler | None = None
    dataset: CaptionJsonDataset | None = None
    epoch: int = 0

    def set_epoch(self, epoch: int, position: dict | None = None) -> None:
        """Call before iterating each epoch: reshuffles and reseeds augmentation.

        ``position``: a value of :meth:`advance` in this epoch (from a checkpoint of this
        rank); the loader then yields exactly the batches that followed it. Raises
        ValueError when it was taken with other settings.
        """
        if position is not None:
            self._check(position, epoch)
        self.epoch = epoch
        if self.stream is not None:
            self.stream.set_epoch(epoch, position)
        else:
            self.sampler.set_epoch(epoch, 0 if position is None else position["batches"])
            self.dataset.set_epoch(epoch)

    def advance(self, position: dict | None, batch: dict) -> dict:
        """The epoch's position after consuming ``batch``; ``position`` None is the start of
        the epoch. Returns a new dict; ``position`` is left as it was."""
        if position is None:
            position = {**self.settings, "epoch": self.epoch, "batches": 0}
            if self.stream is not None:
                position.update(self.stream.start_position())
        moved = {**position, "batches": position["batches"] + 1}
        return self.stream.advance(moved, batch) if self.stream is not None else moved

    def rebase(self, position: dict, saved_accum_freq: int, accum_freq: int) -> dict | None:
        """This rank's position at the global place of ``position``, a step boundary saved by
        rank 0 of a run with other ranks, per-rank batch or ``--accum_freq``
        (``saved_accum_freq``); None where this data cannot continue from there.

        Caption JSON continues when the global batch (accum_freq x batch_size x world_size) is
        the same: every number of ranks then deals the same rows to each global batch, and
        each row's augmentation depends on (seed, epoch, row) only. Shards cannot: which
        samples a rank reads depends on how whole shards fall to the ranks."""
        settings = self.settings
        if self.stream is not None or any(position.get(k) != settings[k] for k in ("source", "rows", "seed")):
            return None
        saved_global = saved_accum_freq * position["batch_size"] * position["world_size"]
        if saved_global != accum_freq * settings["batch_size"] * settings["world_size"]:
            return None
        if position["batches"] % saved_accum_freq:
            return None  # not at a step boundary
        steps = position["batches"] // saved_accum_freq
        return {**settings, "epoch": position["epoch"], "batches": steps * accum_freq}

    def _check(self, position: dict, epoch: int) -> None:
        if not isinstance(position, dict):
            raise ValueError(f"the saved data position must be a dict, got {type(position).__name__}")
        if position.get("source") != self.settings["source"]:
            raise ValueError(
                f"the saved data position was taken reading {position.get('source')!r}, but this run reads "
                f"{self.settings['source']!r}; resume with the same --train_data or --train_file"
            )
        if not {*self.settings, "epoch", "batches"} <= position.keys():
            raise ValueError(
                f"the saved data position {position!r} lacks some of the keys "
                f"{sorted({*self.settings, 'epoch', 'batches'})}; resume from a checkpoint written by this code"
            )
        for key, current in self.settings.items():
            if position[key] != current:
                raise ValueError(
                    f"the saved data position was taken with {POSITION_SETTINGS[key]} = {position[key]!r}, "
                    f"but this run has {current!r}; resume with the same --workers, number of ranks, "
                    "per-rank batch size, seed and data"
                )
        if position["epoch"] != epoch or not isinstance(position["batches"], int) or position["batches"] < 0:
            raise ValueError(
                f"the saved data position (epoch {position['epoch']!r}, {position['batches']!r} batches) "
                f"does not belong to epoch {epoch}; pass the position saved in this epoch"
            )


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

    Batches are described in :class:`TrainData`. Paths and settings are checked, and one
    usable sample is looked for, before this returns. The loader delivers batches in order
    (``in_order=True``) with fresh workers each epoch, which exact resumption relies on.
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
    transform = TrainAugment(image_res, crop_scale, hflip)
    collate = TokenizingCollator(tokenizer, max_words)
    # Worker seeds come from a generator of our own, so iterating leaves torch's global RNG alone.
    loader_options = dict(
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
    loop_settings = dict(seed=seed, world_size=world_size, rank=rank, workers=workers, batch_size=batch_size)
    if train_data is not None:
        shards = expand_shards(train_data)
        sizes = shard_sizes(shards)
        num_samples = train_num_samples
        if num_samples is None and sizes is not None:
            num_samples = sum(sizes)
        if num_samples is None:
            why = (
                "its shards are URLs (pipe:, http://), whose _stats.json files are not read"
                if any(map(is_url, shards))
                else "some shards have no _stats.json beside them"
            )
            raise ValueError(
                f"{train_data}: {why}, so the epoch length is unknown; "
                "pass --train_num_samples (the number of samples in the shards)"
            )
        steps_per_epoch = num_samples // (batch_size * world_size)
        stream = ShardStream(
            shards,
            shard_sizes=sizes,
            steps_per_epoch=steps_per_epoch,
            data_size=data_size,
            transform=transform,
            collate=collate,
            max_words=max_words,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            workers=workers,
            shuffle_buffer=shuffle_buffer,
        )
        check_keys_from_metadata(shards, data_size)
        _probe_shards(shards, data_size, transform, max_words)
        # batch_size=None: the stream yields whole batches, each from a single worker.
        loader = DataLoader(stream, batch_size=None, **loader_options)
        settings = dict(
            source="shards", shards=len(shards), shuffle_buffer=shuffle_buffer, num_samples=num_samples, **loop_settings
        )
        parts = dict(stream=stream)
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
        steps_per_epoch = num_samples // (batch_size * world_size)
        sampler = ResumableSampler(dataset, batch_size=batch_size, num_replicas=world_size, rank=rank, seed=seed)
        loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate, drop_last=True, **loader_options)
        settings = dict(source="caption_json", rows=num_samples, **loop_settings)
        parts = dict(sampler=sampler, dataset=dataset)

    return TrainData(loader, num_samples, steps_per_epoch, settings, **parts)


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
    """Fail before training when the first readable samples of the first ``PROBE_SHARDS``
    shards are all unusable.

    Stops at the first good sample, so a healthy data set costs one decode. Bad keys
    (non-numeric, beyond ``data_size``) near the start also surface here.
    """
    skipped = Skips()
    probed = shards[:PROBE_SHARDS]
    raw = (sample for shard in probed for sample in read_shard(shard, data_size, skipped))
    with closing(raw):  # ends the command of a pipe: shard left half read
        for sample in islice(raw, PROBE_SAMPLES):
            try:
                decode_sample(sample, transform, max_words, seed=0)
                return
            except BadSampleError as bad:
                skipped.add(bad.kind, sample.shard)
    raise ValueError(
        f"no usable image-caption sample at the start of the {len(probed)} shard(s) beginning with "
        f"{shards[0]} (skipped: {dict(skipped.kinds)}); check --train_data"
    )
