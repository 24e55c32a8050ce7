"""Shards named by URL (DATA.md 7): ``pipe:COMMAND`` and ``http://``, on real tars read through
real commands and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.batching import Skips
from data.loaders import build_train_data
from data.shards import expand_shards, read_shard
from shard_factory import caption_of, make_tokenizer, sample_members, write_shards, write_tar
from test_data_resume import assert_same_batches, run_epoch

NUM_SHARDS, ROWS = 4, 12
DATA_SIZE = NUM_SHARDS * ROWS
MAX_WORDS = 30
SPEC = "{00000..00003}.tar"

# Two workers on a two-core test machine are intended here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, int]:
    """Four img2dataset-style shards without their stats files, so that the local spec deals the
    epoch to worker streams by shard count, as URL specs do; (folder, samples written)."""
    root = tmp_path_factory.mktemp("url_shards")
    written = write_shards(root, NUM_SHARDS, ROWS)
    for stats in root.glob("*_stats.json"):
        stats.unlink()
    return root, len(written)


@pytest.fixture(scope="module")
def server(shards) -> str:
    """Base URL of an HTTP server on 127.0.0.1 serving the shard folder."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(shards[0])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy set in the environment must not take the requests to the local server.
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([caption_of(i) for i in range(DATA_SIZE)], MAX_WORDS)


def build(spec: str, tokenizer, num_samples: int | None, **overrides):
    args = dict(
        train_data=spec,
        train_file=None,
        train_image_root=None,
        train_num_samples=num_samples,
        data_size=DATA_SIZE,
        tokenizer=tokenizer,
        image_res=16,
        max_words=MAX_WORDS,
        batch_size=2,
        workers=0,
        seed=5,
        rank=0,
        world_size=1,
        shuffle_buffer=8,
    )
    args.update(overrides)
    return build_train_data(**args)


def keys(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["image_idx"]]


def alive(pid: int) -> bool:
    """True while ``pid`` runs or is an unreaped zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_url_specs_expand_braces_and_refuse_other_schemes(shards, server):
    root, _ = shards
    assert expand_shards(f"pipe:cat {root}/{SPEC}") == [f"pipe:cat {root}/{s:05d}.tar" for s in range(NUM_SHARDS)]
    assert expand_shards(f"{server}/{{00002..00003}}.tar::{root}/00000.tar") == [
        f"{server}/00002.tar",
        f"{server}/00003.tar",
        str(root / "00000.tar"),
    ]
    with pytest.raises(ValueError, match=r"'s3://bucket/0\.tar'.*pipe:aws s3 cp"):
        expand_shards("s3://bucket/0.tar")


def test_url_shards_hold_the_local_samples(shards, server):
    root, _ = shards
    for s in range(NUM_SHARDS):
        local = list(read_shard(str(root / f"{s:05d}.tar"), DATA_SIZE, Skips()))
        for url in (f"pipe:cat {root}/{s:05d}.tar", f"{server}/{s:05d}.tar"):
            skipped = Skips()
            got = list(read_shard(url, DATA_SIZE, skipped))
            assert not skipped
            assert [(r.index, r.members) for r in got] == [(r.index, r.members) for r in local]
            assert {r.shard for r in got} == {url}


@pytest.mark.parametrize("workers", [0, 2])
def test_pipe_and_http_train_on_the_same_batches_as_local_paths(shards, server, tokenizer, workers):
    root, total = shards
    expected, _ = run_epoch(build(f"{root}/{SPEC}", tokenizer, total, workers=workers))
    assert len(expected) == total // 2
    for spec in (f"pipe:cat {root}/{SPEC}", f"{server}/{SPEC}"):
        batches, _ = run_epoch(build(spec, tokenizer, total, workers=workers))
        assert keys(batches) == keys(expected)
        assert_same_batches(batches, expected)


def test_pipe_epoch_resumes_exactly(shards, tokenizer):
    root, total = shards
    spec = f"pipe:cat {root}/{SPEC}"
    batches, positions = run_epoch(build(spec, tokenizer, total, workers=2))
    for k in (1, len(batches) // 2, len(batches) - 1):
        rest, rest_positions = run_epoch(build(spec, tokenizer, total, workers=2), positions[k - 1])
        assert_same_batches(rest, batches[k:])
        assert rest_positions == positions[k:]


def test_failed_command_and_http_404_count_as_bad_shards(shards, server, tokenizer, caplog):
    root, total = shards
    cases = {
        f"pipe:cat {root}/missing.tar": r"OSError: the command exited with status 1: cat: .*missing\.tar: No such file",
        f"{server}/missing.tar": r"HTTPError: HTTP Error 404",
    }
    for bad, message in cases.items():
        good = f"pipe:cat {root}/{SPEC}" if bad.startswith("pipe:") else f"{server}/{SPEC}"
        # An epoch longer than the good samples: the stream reads its shards again, the bad one included.
        data = build(f"{good}::{bad}", tokenizer, 2 * total)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="data.shards"):
            batches, _ = run_epoch(data)
        assert len(batches) == total
        shards_skipped = sum((Counter(b["skipped_shards"]) for b in batches), Counter())
        kinds = sum((Counter(b["skipped"]) for b in batches), Counter())
        assert set(shards_skipped) == {bad} and kinds == Counter(bad_shard=shards_skipped[bad]) >= Counter(bad_shard=1)
        warnings = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
        assert len(warnings) == shards_skipped[bad] and all(re.search(message, w) for w in warnings)


def test_a_command_that_dies_mid_shard_is_named_with_its_status(shards, caplog):
    root, _ = shards
    url = f"pipe:head -c 3000 {root}/00000.tar; echo lost the connection >&2; exit 3"
    skipped = Skips()
    with caplog.at_level(logging.WARNING, logger="data.shards"):
        list(read_shard(url, DATA_SIZE, skipped))
    assert skipped.sources == Counter({url: 1})
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "unexpected end of data; the command exited with status 3: lost the connection" in warning


def test_url_shards_need_train_num_samples(shards, server, tokenizer):
    root, _ = shards
    for spec in (f"pipe:cat {root}/{SPEC}", f"{server}/{SPEC}"):
        with pytest.raises(ValueError, match=r"its shards are URLs .*pass --train_num_samples"):
            build(spec, tokenizer, None)


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory) -> Path:
    """One shard far larger than a pipe's buffer, so that a command left unread would block."""
    path = tmp_path_factory.mktemp("big_shard") / "00000.tar"
    members = sample_members(0, "0")
    members["jpg"] += bytes(4096)  # trailing bytes after the JPEG's end marker: a valid image
    write_tar(path, [(f"{i:09d}", members) for i in range(DATA_SIZE)])
    return path


def test_commands_end_when_readers_stop_early(big_shard, tokenizer, tmp_path):
    pids = tmp_path / "pids"
    spec = f"pipe:echo $$ >> {pids}; exec cat {big_shard}"

    def started() -> list[int]:
        return [int(p) for p in pids.read_text().split()]

    skipped = Skips()  # read whole, the command ends by itself with status 0
    assert len(list(read_shard(f"pipe:cat {big_shard}", DATA_SIZE, skipped))) == DATA_SIZE and not skipped

    reader = read_shard(spec, DATA_SIZE, Skips())
    next(reader)
    (pid,) = started()
    assert alive(pid)
    reader.close()
    assert not alive(pid)

    # Start-up probe, an epoch that stops at its share mid-shard, and a loader abandoned after one batch.
    data = build(spec, tokenizer, 8, workers=0)
    run_epoch(data)
    loader = build(f"{spec}::{spec}", tokenizer, 8, workers=2).loader
    batches = iter(loader)
    next(batches)
    del batches
    assert len(started()) >= 5
    assert not [pid for pid in started() if alive(pid)]
