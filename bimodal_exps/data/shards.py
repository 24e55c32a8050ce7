"""Training pairs streamed from webdataset shards as img2dataset writes them (DATA.md 1).

Each sample is a run of adjacent tar members ``KEY.jpg|png|webp``, ``KEY.txt``,
``KEY.json``; ``int(KEY)`` is both its image and its text index. In epoch ``e`` the shard
list is permuted by an RNG seeded from ``(seed, e)``; permuted shard ``k`` goes to rank
``k % world_size`` and a rank's shards are dealt round-robin to its loader workers, so no
sample is read twice in an epoch. A worker streams its shards, shuffles raw samples in a
buffer, decodes and augments them, and yields whole tokenised batches. Everything random
is seeded from ``(seed, epoch, rank, worker)`` and the position in the shuffled stream, so
the batch sequence is a function of the arguments alone, and an epoch can be resumed after
any batch (see :class:`ShardStream`). Bad samples are skipped and counted per kind and per
shard; they never stop the run.

Shards are local tars or, as webdataset users name them (DATA.md 7), ``pipe:COMMAND`` (the tar
is the command's standard output) and ``http(s)://`` URLs; see :func:`open_shard`.
"""

from __future__ import annotations

import glob
import gzip
import http.client
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, replace
from itertools import islice
from typing import BinaryIO

import braceexpand
import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from data.batching import (
    BadSampleError,
    Pair,
    Skips,
    augment,
    clean_caption,
    derive_seed,
    load_rgb,
)
from data.transforms import TrainAugment

logger = logging.getLogger("data.shards")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_KEY = re.compile(r"[0-9]+")
_SHUFFLE, _AUGMENT = 0, 1  # the two uses of a worker stream's seed

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_HTTP = ("http://", "https://")
# A stalled server counts its shard as bad after this long without data, instead of blocking a worker.
HTTP_TIMEOUT_S = 60.0
# After a failed read, how long a command may take to end by itself, so that its exit status
# can be reported, before it is killed.
COMMAND_GRACE_S = 1.0
STDERR_SHOWN = 1000  # characters of a failed command's stderr quoted in the warning


def is_url(shard: str) -> bool:
    """True for a shard named by ``pipe:COMMAND`` or ``scheme://...`` rather than a local path."""
    return shard.startswith("pipe:") or _SCHEME.match(shard) is not None


def expand_shards(spec: str) -> list[str]:
    """Shards from ``dir/{00000..00019}.tar``, a directory of ``*.tar``, a single tar,
    ``pipe:COMMAND`` or ``http(s)://`` URLs (braces expanded over the whole URL), or several
    of these joined by ``::``. Every local path must exist; URLs are only checked when read."""
    paths: list[str] = []
    missing: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if is_url(part):
            if not (part.startswith("pipe:") or part.lower().startswith(_HTTP)):
                raise ValueError(
                    f"cannot open {part!r}: shards are local paths, pipe:COMMAND or http(s):// URLs; for other "
                    "storage let a command print the tar, e.g. 'pipe:aws s3 cp s3://bucket/{00000..00099}.tar -'"
                )
            paths += braceexpand.braceexpand(part)
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


def shard_sizes(shards: list[str]) -> list[int] | None:
    """``successes`` of the ``_stats.json`` file beside each shard; None if any is missing
    (always for URL shards, whose stats files are not read)."""
    if any(map(is_url, shards)):
        return None
    sizes = []
    for shard in shards:
        path = stats_path(shard)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            try:
                sizes.append(int(json.load(f)["successes"]))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path} has no integer 'successes' field ({error}); "
                    "pass --train_num_samples to skip the stats files"
                ) from error
    return sizes


def count_samples(shards: list[str]) -> int | None:
    """Sum of ``successes`` in the ``_stats.json`` files beside the shards; None if any is missing."""
    sizes = shard_sizes(shards)
    return None if sizes is None else sum(sizes)


def check_keys_from_metadata(shards: list[str], data_size: int) -> int | None:
    """Largest sample key listed in the ``.parquet`` metadata beside the shards (img2dataset
    writes one per tar), checked against ``data_size`` before any sample is read.

    Returns None when some shard has no parquet file or is a URL; the keys are then checked as
    samples are read.
    """
    if any(map(is_url, shards)):
        logger.info(
            "--train_data names shards by URL: no .parquet metadata is read to check the sample keys against "
            "--data_size before training; they are checked as samples are read"
        )
        return None
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
    """Undecoded sample of ``shard``: the members it needs, by lower-case suffix (``jpg``, ``txt``, ...)."""

    index: int
    members: dict[str, bytes]
    shard: str


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


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (7: contiguous)


def _octal(field: bytes) -> int:
    """A tar number: octal digits, or base-256 (GNU) when the top bit of the first byte is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) for every regular file of a tar stream, in order; ``read()`` returns the
    file's data (a member not read is skipped). Handles ustar, GNU (long names) and pax (``path``
    records) archives, as tarfile and webdataset write them.

    A plain reader of 512-byte headers, fifteen times faster than tarfile's (which parses every
    field of every header in Python): 6 us per sample instead of 100. The name comes before the
    data, so a reader sees where a member starts even if its data then turns out truncated.
    Raises tarfile.ReadError on a header whose checksum is wrong (not a tar) and on data that
    ends inside a member.
    """
    name_override = None
    while True:
        header = stream.read(_BLOCK)
        if not header.strip(b"\0"):
            return  # the end-of-archive blocks (or a tar that ends without them)
        if len(header) < _BLOCK or not _checksum_ok(header):
            raise tarfile.ReadError("unexpected end of data" if len(header) < _BLOCK else "invalid header")
        size, kind = _octal(header[124:136]), header[156:157]
        padded = size + (-size % _BLOCK)
        if kind in _FILE_TYPES:
            prefix, name = header[345:500].split(b"\0", 1)[0], header[:100].split(b"\0", 1)[0]
            path = name_override or (prefix + b"/" + name if prefix else name).decode("utf-8")
            name_override, unread = None, [padded]

            def read(size=size, unread=unread) -> bytes:
                data = _read_exactly(stream, size)
                stream.read(unread[0] - size)
                unread[0] = 0
                return data

            yield path, read
            if unread[0]:
                _read_exactly(stream, unread[0])
            continue
        data = _read_exactly(stream, padded)[:size]
        if kind == b"L":  # GNU long name of the next member
            name_override = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # pax extended header of the next member: "<len> key=value\n" records
            for record in data.decode("utf-8").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    name_override = value
        elif kind != b"g":  # a directory, link or device: no sample data
            name_override = None


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (the field itself counted as
    spaces); some old tars sum signed bytes."""
    try:
        want = _octal(header[148:156])
        _octal(header[124:136])  # the size field, read next
    except ValueError:  # no octal numbers: no tar header
        return False
    if want == sum(header[:148]) + 256 + sum(header[156:]):
        return True
    signed = np.frombuffer(header, dtype=np.int8).astype(np.int64)
    return want == int(signed[:148].sum() + signed[156:].sum()) + 256


@contextmanager
def open_shard(shard: str) -> Iterator[BinaryIO]:
    """The bytes of a local tar, of a ``pipe:COMMAND``'s standard output, or of an
    ``http(s)://`` response body.

    Leaving the block normally means the tar was read to its end: the rest of the stream is
    read then, and OSError (or http.client.HTTPException) is raised when the command failed or
    the body was cut short. Leaving it early (an exception, or the reading generator closed)
    ends a command at once and reaps it, so no process outlives its reader.
    """
    if shard.startswith("pipe:"):
        with _command_output(shard[len("pipe:") :]) as stream:
            yield stream
    elif shard.lower().startswith(_HTTP):
        # urlopen raises HTTPError, an OSError, for a status such as 404.
        with urllib.request.urlopen(shard, timeout=HTTP_TIMEOUT_S) as response:
            yield response
            response.read()  # the tar's end blocks; raises IncompleteRead when the body is short
    else:
        with open(shard, "rb") as stream:
            yield stream


@contextmanager
def _command_output(command: str) -> Iterator[BinaryIO]:
    """Standard output of a shell command (see :func:`open_shard`)."""
    with tempfile.TemporaryFile() as stderr:
        # A shell, as webdataset runs pipe: URLs, since the spec is a command line (quoting,
        # pipes); in a process group of its own, so that a kill ends every process of a pipeline.
        # stderr goes to a file, which cannot fill up and block the command as an unread pipe would.
        process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            yield process.stdout
            # The tar ends before the stream does (end-of-archive blocks, record padding): read
            # it all, so that the command is not ended by SIGPIPE and its exit status means success.
            while process.stdout.read(1 << 16):
                pass
        except Exception as error:
            status = _end_command(process, COMMAND_GRACE_S)
            if status > 0:  # the command failed by itself (a signal may be the kill above)
                raise OSError(f"{error}; {_command_failure(status, stderr)}") from error
            raise
        except BaseException:  # the reader stopped early (GeneratorExit) or the run is interrupted
            _end_command(process, 0)
            raise
        status = _end_command(process, None)
        if status != 0:
            raise OSError(_command_failure(status, stderr))


def _end_command(process: subprocess.Popen, grace: float | None) -> int:
    """Close the command's output, wait up to ``grace`` seconds (None: until it exits), then kill
    its process group if it still runs; its exit status, once reaped."""
    process.stdout.close()  # a command still writing ends by SIGPIPE
    try:
        return process.wait(grace)
    except subprocess.TimeoutExpired:
        # SIGKILL: loader workers ignore SIGTERM (data.workers), and the commands they start inherit that.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def _command_failure(status: int, stderr: BinaryIO) -> str:
    """How the command ended, with the end of what it wrote to stderr."""
    stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, stderr.tell() - STDERR_SHOWN))
    message = stderr.read().decode("utf-8", "replace").strip()
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    return f"the command {how}" + (f": {message}" if message else " (nothing on stderr)")


def read_shard(path: str, data_size: int, skipped: Skips) -> Iterator[RawSample]:
    """Stream the samples of one tar (plain or gzip-compressed; a path or URL, see
    :func:`open_shard`) in file order.

    A shard that cannot be opened or read to the end (an unreadable file, a failed command, an
    HTTP error) counts once as ``bad_shard`` in ``skipped`` (with a warning); the samples
    completed before the fault are kept, the one being read is dropped.
    """
    kept = (*IMAGE_SUFFIXES, "txt")
    key, members = None, {}
    try:
        with open_shard(path) as raw:
            stream = gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == b"\x1f\x8b" else raw
            for name, read in tar_members(stream):
                dirname, _, name = name.rpartition("/")
                stem, dot, suffix = name.partition(".")
                if not dot:
                    continue
                if (dirname, stem) != key:
                    if key is not None:
                        yield RawSample(sample_index(key[1], path, data_size), members, path)
                    key, members = (dirname, stem), {}
                suffix = suffix.lower()
                if suffix in kept:
                    members[suffix] = read()
    except (OSError, EOFError, UnicodeDecodeError, tarfile.TarError, http.client.HTTPException) as error:
        logger.warning("skipping the rest of shard %s: %s: %s", path, type(error).__name__, error)
        skipped.add("bad_shard", path)
        return
    if key is not None:
        yield RawSample(sample_index(key[1], path, data_size), members, path)


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


def decode_sample(raw: RawSample, transform: TrainAugment, max_words: int, seed: int) -> Pair:
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
    image = augment(transform, load_rgb(members[suffix]), seed)
    return Pair(image, caption, raw.index, raw.index)


def apportion(total: int, weights: list[float]) -> list[int]:
    """``total`` split into integers proportional to ``weights`` (largest remainders, ties to
    the lower index); the parts sum to ``total``."""
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights, weight_sum = [1.0] * len(weights), float(len(weights))
    exact = [total * w / weight_sum for w in weights]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (parts[k] - exact[k], k))
    for k in by_remainder[: total - sum(parts)]:
        parts[k] += 1
    return parts


class ShardStream(IterableDataset):
    """One rank's share of the shards as a stream of exactly ``steps_per_epoch`` whole batches
    per epoch, for a DataLoader with ``batch_size=None``, ``num_workers=workers`` and the
    default in-order delivery.

    The epoch's batches are dealt to the worker streams in proportion to the samples their
    shards hold (``shard_sizes``, from the stats files; one per shard when unknown). Each worker
    stream reads its own shards, batches only its own samples and stops after its share; a
    stream that runs out first starts its shards over (a new shuffle, new augmentations), so
    every rank makes the same number of steps, known before the epoch starts. Call
    :meth:`set_epoch` before creating each epoch's iterator. Besides the
    :class:`~data.batching.TokenizingCollator` keys, a batch carries ``worker`` (the stream that
    made it), ``consumed`` (samples of that stream's shuffled sequence used up to and
    including this batch) and ``worker_done`` (True on the stream's last batch of the epoch).

    Resuming: the DataLoader takes batches from its workers in turn (0, 1, ..., 0, 1, ...),
    passing over workers whose stream has ended, so the epoch's batch sequence is fixed by
    the streams alone. A position within it is how far each stream has been consumed, how many
    batches each has made, which streams have finished, and which stream made the last batch.
    Given one, loader worker ``i`` plays stream ``(i + last + 1) % workers``, so that the stream
    whose turn comes next starts, and each stream skips its consumed samples without decoding
    them.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        shard_sizes: list[int] | None,
        steps_per_epoch: int,
        data_size: int,
        transform: TrainAugment,
        collate: Callable[[list[Pair]], dict],
        max_words: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        shuffle_buffer: int,
    ):
        if len(shards) < world_size:
            raise ValueError(
                f"{len(shards)} shard(s) cannot be split over {world_size} ranks; "
                "use at least as many shards as ranks (each rank reads whole shards)"
            )
        self.shards = list(shards)
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else [1] * len(shards)
        self.steps_per_epoch = steps_per_epoch
        self.data_size = data_size
        self.transform = transform
        self.collate = collate
        self.max_words = max_words
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_streams = max(workers, 1)  # workers=0: one stream, read in the main process
        self.shuffle_buffer = shuffle_buffer
        self.set_epoch(0)

    def set_epoch(self, epoch: int, position: Mapping | None = None) -> None:
        """Start ``epoch`` at its beginning, or right after the batches ``position`` covers (a
        value of :meth:`advance` in this epoch whose settings the caller has checked)."""
        self.epoch = epoch
        if position is None:
            position = self.start_position()
        n = self.num_streams
        consumed, made = position.get("consumed"), position.get("made")
        finished, last = position.get("finished"), position.get("last_worker")
        if not (
            all(isinstance(x, list) and len(x) == n for x in (consumed, made, finished))
            and all(isinstance(c, int) and c >= 0 for c in [*consumed, *made])
            and all(isinstance(f, bool) for f in finished)
            and isinstance(last, int)
            and -1 <= last < n
        ):
            raise ValueError(
                f"malformed shard stream position (consumed {consumed!r}, made {made!r}, finished {finished!r}, "
                f"last_worker {last!r}) for {n} worker stream(s); resume from an unmodified checkpoint"
            )
        self.first_stream = (last + 1) % n
        self.consumed, self.made, self.finished = list(consumed), list(made), list(finished)
        for worker, (done, share) in enumerate(zip(made, self.quotas(), strict=True)):
            if done > share:
                raise ValueError(
                    f"the saved data position has {done} batches of worker stream {worker} made, but its share of "
                    f"epoch {epoch} is {share}; resume with the same --train_data and settings"
                )

    def start_position(self) -> dict:
        """The stream part of a position before the first batch of an epoch."""
        n = self.num_streams
        return {"consumed": [0] * n, "made": [0] * n, "finished": [False] * n, "last_worker": -1}

    def advance(self, position: Mapping, batch: Mapping) -> dict:
        """``position`` (holding the keys of :meth:`start_position`) moved past ``batch``."""
        worker = int(batch["worker"])
        consumed, made, finished = list(position["consumed"]), list(position["made"]), list(position["finished"])
        consumed[worker] = int(batch["consumed"])
        made[worker] += 1
        finished[worker] = bool(batch["worker_done"])
        return {**position, "consumed": consumed, "made": made, "finished": finished, "last_worker": worker}

    def _worker_shard_ids(self, worker: int) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return [int(k) for k in order[self.rank :: self.world_size][worker :: self.num_streams]]

    def worker_shards(self, worker: int) -> list[str]:
        """The shards this rank's stream ``worker`` reads in the current epoch."""
        return [self.shards[k] for k in self._worker_shard_ids(worker)]

    def quotas(self) -> list[int]:
        """Batches each worker stream makes in the current epoch; they sum to ``steps_per_epoch``."""
        weights = [sum(self.shard_sizes[k] for k in self._worker_shard_ids(w)) for w in range(self.num_streams)]
        if sum(weights) == 0:  # stats files that count no successes: deal by shard count
            weights = [len(self._worker_shard_ids(w)) for w in range(self.num_streams)]
        return apportion(self.steps_per_epoch, weights)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_streams:
            raise ValueError(
                f"this shard stream was built for {self.num_streams} worker stream(s) but runs in "
                f"{num_workers}; pass the DataLoader's num_workers as workers"
            )
        worker = (loader_worker + self.first_stream) % num_workers
        if self.finished[worker]:
            return iter(())
        return self.batches(worker, start=self.consumed[worker], made=self.made[worker])

    def _passes(self, worker: int, skipped: Skips) -> Iterator[tuple[int, RawSample]]:
        """(pass, raw sample) over the worker's shards, read over and over, each pass shuffled anew."""
        shards = self.worker_shards(worker)
        for n_pass in itertools.count():
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, _SHUFFLE, n_pass))
            raw = (sample for shard in shards for sample in read_shard(shard, self.data_size, skipped))
            empty = True
            for sample in shuffle_buffered(raw, self.shuffle_buffer, rng):
                empty = False
                yield n_pass, sample
            if empty:
                raise ValueError(
                    f"rank {self.rank} worker stream {worker}: its shards hold no sample in epoch {self.epoch} "
                    f"({', '.join(shards) or 'no shards'}); check --train_data"
                )

    def batches(self, worker: int, start: int = 0, made: int = 0) -> Iterator[dict]:
        """The batches of stream ``worker`` in the current epoch, deterministically, after the
        first ``start`` samples of its shuffled sequence and its first ``made`` batches."""
        quota = self.quotas()[worker]
        if made >= quota:
            return
        skipped = Skips()  # bad samples since the last good one
        # closing: a pipe: shard's command is ended as soon as the stream has made its share,
        # not whenever the generator happens to be collected.
        with closing(self._passes(worker, skipped)) as samples:
            # The augmentation seed depends only on the offset in the shuffled sequence, so a
            # resume skips consumed samples without decoding them.
            for _ in islice(samples, start):
                pass
            skipped.take()  # shard faults met while skipping were reported with the consumed batches
            pairs: list[Pair] = []
            total = Skips()
            current_pass, whole_pass, good_in_pass = None, start == 0, 0
            for offset, (n_pass, sample) in enumerate(samples, start):
                if n_pass != current_pass:
                    if current_pass is not None and whole_pass and not good_in_pass:
                        raise ValueError(
                            f"rank {self.rank} worker stream {worker}: no usable sample in a whole pass over its "
                            f"shards ({', '.join(self.worker_shards(worker))}; skipped: {dict(skipped.kinds)}); "
                            "check --train_data"
                        )
                    whole_pass = whole_pass or current_pass is not None
                    current_pass, good_in_pass = n_pass, 0
                seed = derive_seed(self.seed, self.epoch, self.rank, worker, _AUGMENT, offset)
                try:
                    pair = decode_sample(sample, self.transform, self.max_words, seed)
                except BadSampleError as bad:
                    skipped.add(bad.kind, sample.shard)
                    continue
                good_in_pass += 1
                pairs.append(replace(pair, skipped=skipped.take()))
                total.update(pairs[-1].skipped)
                if len(pairs) == self.batch_size:
                    made += 1
                    done = made == quota
                    yield {**self.collate(pairs), "worker": worker, "consumed": offset + 1, "worker_done": done}
                    pairs = []
                    if done:
                        break
        if total:
            logger.warning(
                "rank %d worker stream %d skipped bad samples in epoch %d: %s",
                self.rank,
                worker,
                self.epoch,
                dict(sorted(total.kinds.items())),
            )
