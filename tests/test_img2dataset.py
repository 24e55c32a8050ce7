"""``prepare.py cc3m`` / ``cc12m`` with the real img2dataset (installed into .venv-img2dataset by
prepare.py's own code on first use, then reused) downloading from an HTTP server on 127.0.0.1
that serves generated JPEGs, 404s, a body that is not an image and answers too slow for
``--timeout``; the shards are read by the project's loader as they are and trained on."""

from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clip
from data.batching import Skips
from data.shards import read_shard
from tiny_run import tiny_run_args

REPO = Path(__file__).resolve().parents[1]
PREPARE = REPO / "bimodal_exps" / "prepare.py"

ROWS, PER_SHARD, TIMEOUT_S = 300, 100, 2
MISSING = set(range(5, ROWS, 31))  # 404
NOT_IMAGE = set(range(11, ROWS, 43))  # 200 with an HTML body, which img2dataset cannot decode
SLOW = {17, 150, 283}  # answers only after img2dataset's --timeout
GOOD = sorted(set(range(ROWS)) - MISSING - NOT_IMAGE - SLOW)
# Captions that img2dataset's own TSV reader (pyarrow's CSV parser) would change: an unmatched
# leading quote merges the following rows, quotes vanish, digits become a number.
CAPTIONS = ('"an unmatched quote, row {i}', "{i:05d}", '"quoted" words, row {i}', "café ☕ row {i}", "a dog, row {i}")


LONG = " and so on" * 12_500  # 125 kB: the rows of MISSING make img2dataset read the input in several blocks


def caption(i: int) -> str:
    return CAPTIONS[i % len(CAPTIONS)].format(i=i) + (LONG if i in MISSING else "")


def url(port: int, i: int) -> str:
    kind = "missing" if i in MISSING else "text" if i in NOT_IMAGE else "slow" if i in SLOW else "image"
    return f"http://127.0.0.1:{port}/{kind}/{i}.jpg"


def photo(i: int) -> bytes:
    """A 128 x 96 JPEG with the texture of a photo: smooth colour fields plus grain."""
    rng = np.random.default_rng(i)
    fields = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)
    pixels = np.asarray(fields, dtype=np.float32) + rng.normal(0, 12, (96, 128, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        kind, name = self.path.strip("/").split("/")
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "slow":
            time.sleep(TIMEOUT_S + 3)  # the client has given up by now: no answer
            return
        body = b"<html>not an image</html>" if kind == "text" else self.server.images[int(name.split(".")[0])]
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if kind == "text" else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet: hundreds of requests
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a sleeping handler must not hold up the shutdown
    request_queue_size = 128  # img2dataset opens --threads connections per process at once

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.images = {i: photo(i) for i in GOOD}  # made beforehand, so that answers are quick


@pytest.fixture(scope="module")
def port():
    server = Server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PREPARE), *args], capture_output=True, text=True, timeout=600, check=False
    )


def download(name: str, tsv: Path, out: Path, per_shard: int = PER_SHARD) -> subprocess.CompletedProcess:
    flags = ["--out", str(out), "--samples_per_shard", str(per_shard), "--timeout", str(TIMEOUT_S)]
    return prepare(name, str(tsv), *flags, "--processes", "2", "--threads", "16")


def summary(stdout: str) -> str:
    """prepare.py's summary: from its first line (``cc3m: N TSV rows ...``) to the end."""
    return stdout[re.search(r"^cc(3|12)m: [0-9,]+ TSV rows", stdout, re.MULTILINE).start() :]


def count(text: str, label: str) -> int:
    return int(re.search(rf"^\s*{label}:?\s+([0-9,]+)", text, re.MULTILINE).group(1).replace(",", ""))


def reason_count(text: str, reason: str) -> int:
    return int(re.search(rf"^\s+([0-9,]+)  {re.escape(reason)}$", text, re.MULTILINE).group(1).replace(",", ""))


@pytest.fixture(scope="module")
def cc3m(port, tmp_path_factory):
    """A CC3M TSV of ROWS rows (caption<TAB>url, no header) downloaded with prepare.py cc3m."""
    root = tmp_path_factory.mktemp("cc3m")
    tsv = root / "Train_GCC-training.tsv"
    tsv.write_text("".join(f"{caption(i)}\t{url(port, i)}\n" for i in range(ROWS)), encoding="utf-8")
    started = time.monotonic()
    result = download("cc3m", tsv, root / "shards")
    print(f"prepare.py cc3m: {time.monotonic() - started:.1f} s\n{result.stdout}{result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    return tsv, root / "shards", result


@pytest.mark.slow
def test_every_sample_sits_at_its_tsv_row(cc3m, port):
    """Keys are TSV rows: each sample's caption, URL and image are those of row int(KEY); the rows
    that failed are gaps, recorded in the .parquet with their status."""
    _, out, _ = cc3m
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".tar", ".parquet") and "_stats" not in p.name) == [
        ".prepare-source"
    ]  # the JSON-lines copy of the TSV and img2dataset's _tmp are gone
    seen = []
    for shard_id, shard in enumerate(shards):
        samples = list(read_shard(str(shard), ROWS, Skips()))
        for sample in samples:
            assert sample.index // PER_SHARD == shard_id
            assert sample.members["txt"].decode() == caption(sample.index)
            image = Image.open(io.BytesIO(sample.members["jpg"]))
            assert min(image.size) == 256 and image.size == (341, 256)  # keep_ratio: shorter side 256
        seen += [sample.index for sample in samples]
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    assert meta["key"] == member.name.removesuffix(".json")
                    assert meta["url"] == url(port, int(meta["key"])) and meta["status"] == "success"
        table = pq.read_table(shard.with_suffix(".parquet")).to_pylist()
        assert [int(row["key"]) for row in sorted(table, key=lambda r: r["key"])] == list(
            range(shard_id * PER_SHARD, (shard_id + 1) * PER_SHARD)
        )
        for row in table:
            i = int(row["key"])
            assert row["url"] == url(port, i) and row["caption"] == caption(i)
            want = "failed_to_resize" if i in NOT_IMAGE else "failed_to_download" if i not in GOOD else "success"
            assert row["status"] == want, (i, row)
    assert sorted(seen) == GOOD


@pytest.mark.slow
def test_summary_counts_what_the_shards_hold(cc3m):
    text = summary(cc3m[2].stdout)
    assert text.startswith(f"cc3m: {ROWS} TSV rows -> 3 of 3 shards in ")
    assert count(text, "rows in the shards") == ROWS
    assert count(text, "successes") == len(GOOD)
    assert count(text, "failed_to_download") == len(MISSING) + len(SLOW)
    assert count(text, "failed_to_resize") == len(NOT_IMAGE)
    assert reason_count(text, "HTTP Error 404: Not Found") == len(MISSING)
    assert reason_count(text, "timed out") == len(SLOW)
    assert reason_count(text, "Image decoding error") == len(NOT_IMAGE)
    assert f"--data_size {ROWS} " in text and f"an epoch is the {len(GOOD)} successes" in text
    stats = [json.loads(p.read_text()) for p in sorted(cc3m[1].glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == len(GOOD)


@pytest.mark.slow
def test_rerun_does_nothing_and_resume_redoes_one_shard(cc3m):
    tsv, out, first = cc3m
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = download("cc3m", tsv, out)
    assert again.returncode == 0, again.stderr
    assert ">>>" not in again.stdout and summary(again.stdout) == summary(first.stdout)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    for suffix in (".tar", ".parquet", "_stats.json"):  # as if the job had stopped in shard 1
        (out / f"00001{suffix}").unlink()
    resumed = download("cc3m", tsv, out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert summary(resumed.stdout) == summary(first.stdout)
    for name in ("00000.tar", "00002.tar", "00000_stats.json", "00002_stats.json"):
        assert (out / name).stat().st_mtime_ns == mtimes[name], name


@pytest.mark.slow
def test_another_tsv_into_the_same_folder_is_refused(cc3m, port, tmp_path):
    _, out, _ = cc3m
    other = tmp_path / "other.tsv"
    other.write_text("".join(f"another caption {i}\t{url(port, i)}\n" for i in range(ROWS)))
    result = download("cc3m", other, out)
    assert result.returncode == 2 and "holds shards made from other input (tsv_sha256" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_training_on_the_shards(cc3m, tiny_dataset, tmp_path):
    """clip.py trains on the shards as img2dataset wrote them, --data_size = TSV rows, the epoch
    length summed from the stats files."""
    _, out, _ = cc3m
    run = tmp_path / "run"
    assert clip.main(tiny_run_args(tiny_dataset, run, train_data=str(out), data_size=ROWS, epochs=1)) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == len(GOOD) // 32  # tiny_run_args' batch of 32
    assert (run / "checkpoint_latest.pth").is_file()


@pytest.mark.slow
def test_cc12m_column_order(port, tmp_path):
    rows = 25
    tsv = tmp_path / "cc12m.tsv"
    tsv.write_text("".join(f"{url(port, i)}\t{caption(i)}\n" for i in range(rows)), encoding="utf-8")
    result = download("cc12m", tsv, tmp_path / "shards", per_shard=10)
    assert result.returncode == 0, result.stdout + result.stderr
    text = summary(result.stdout)
    good = [i for i in range(rows) if i in GOOD]
    assert count(text, "successes") == len(good) and f"--data_size {rows} " in text
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    samples = [sample for shard in shards for sample in read_shard(str(shard), rows, Skips())]
    assert sorted(s.index for s in samples) == good
    assert all(s.members["txt"].decode() == caption(s.index) for s in samples)


# ---------------------------------------------------------------------------------------------
# bad input: one message, exit status 2, nothing written, img2dataset never started


def refused(tmp_path: Path, name: str, lines: list[str] | None, *flags: str) -> str:
    tsv = tmp_path / "in.tsv"
    if lines is not None:
        tsv.write_text("".join(line + "\n" for line in lines))
    result = prepare(name, str(tsv), "--out", str(tmp_path / "out"), *flags)
    assert result.returncode == 2, result
    assert not (tmp_path / "out").exists() and result.stdout == ""
    assert result.stderr.startswith(f"prepare.py {name}: ") and "Traceback" not in result.stderr
    return result.stderr


def test_missing_tsv(tmp_path):
    assert "in.tsv not found: expected the cc3m TSV (Train_GCC-training.tsv)" in refused(tmp_path, "cc3m", None)


def test_empty_tsv(tmp_path):
    assert "is empty" in refused(tmp_path, "cc12m", [])


def test_wrong_column_count(tmp_path):
    lines = ["a dog\thttp://x/1.jpg", "a cat\thttp://x/2.jpg\textra", "no tab at all"]
    error = refused(tmp_path, "cc3m", lines)
    assert "2 of 3 line(s) are not cc3m rows (caption <TAB> url, no header)" in error
    assert "line 2: 3 tab-separated column(s), expected 2" in error and "line 3: 1 tab-separated" in error


def test_header_line(tmp_path):
    error = refused(tmp_path, "cc3m", ["caption\turl", "a dog\thttp://x/1.jpg"])
    assert "line 1: column 2, the url ('url'), is not an http(s) URL" in error


@pytest.mark.parametrize(
    ("name", "other", "line"), [("cc3m", "cc12m", "http://x/1.jpg\ta dog"), ("cc12m", "cc3m", "a dog\thttp://x/1.jpg")]
)
def test_other_datasets_file(tmp_path, name, other, line):
    error = refused(tmp_path, name, [line, line])
    assert "is a URL" in error and f"this looks like a {other} file; use prepare.py {other}" in error


def test_samples_per_shard_not_a_power_of_ten(tmp_path):
    error = refused(tmp_path, "cc3m", ["a dog\thttp://x/1.jpg"], "--samples_per_shard", "300")
    assert "--samples_per_shard 300: must be a power of ten" in error


def test_nonpositive_settings(tmp_path):
    error = refused(tmp_path, "cc12m", ["http://x/1.jpg\ta dog"], "--threads", "0")
    assert "--processes, --threads and --timeout must be positive" in error
