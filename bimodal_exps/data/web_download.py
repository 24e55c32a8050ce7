"""CC3M and CC12M: the dataset's own TSV -> img2dataset webdataset shards (spec DATA.md 1).

``prepare.py cc3m Train_GCC-training.tsv`` / ``prepare.py cc12m cc12m.tsv`` check the whole TSV,
run the real img2dataset on it (installed in its own environment, ``.venv-img2dataset``, because
it pins an old webdataset, opencv, albumentations and wandb) and print what the shards hold, read
from img2dataset's ``*_stats.json`` files, with the ``--data_size`` to train with.

The sample key img2dataset writes is ``shard * 10**ceil(log10(n)) + position`` for ``n`` rows per
shard; with ``n`` a power of ten that is the row of the input, the index clip.py gives the sample
(data/shards.py), so ``n`` must be one. img2dataset's own TSV reader is not used: pyarrow's CSV
parser treats a caption that starts with ``"`` as quoted (the quotes vanish, or the rows after an
unmatched one merge, shifting every later key) and turns a caption such as ``2`` into a number.
The TSV is instead rewritten as JSON lines, one per row in order, whose strings pyarrow keeps.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from data.prepare_status import EXIT_INCOMPLETE, EXIT_OK, InputError

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-img2dataset.txt"  # the pinned img2dataset version
VENV = REPO / ".venv-img2dataset"

IMAGE_SIZE = 256  # the paper's training resolution; keep_ratio resizes the shorter side to it
SAMPLES_PER_SHARD = 10_000  # img2dataset's default: CC3M in 332 shards
THREADS = 64  # per process: downloads wait on the network, not on a core
SHOWN = 5  # bad lines quoted in a message
REASONS_SHOWN = 10  # failure reasons listed in the summary
URL = re.compile(r"\s*https?://", re.IGNORECASE)
# No ".json" suffix: img2dataset takes every *.json of its output folder for a finished shard's stats.
SOURCE_RECORD = ".prepare-source"
INPUT_JSONL = ".prepare-input.jsonl"


@dataclass(frozen=True)
class WebSet:
    """A web dataset published as a headerless two-column TSV."""

    name: str
    tsv_file: str  # the published file name
    columns: tuple[str, str]  # the order of caption and url on a line
    published_rows: int


WEB_SETS = {
    s.name: s
    for s in (
        WebSet("cc3m", "Train_GCC-training.tsv", ("caption", "url"), 3_318_333),
        WebSet("cc12m", "cc12m.tsv", ("url", "caption"), 12_423_374),
    )
}


@dataclass(frozen=True)
class TsvInfo:
    rows: int
    sha256: str


def _fields(line: bytes) -> list[str]:
    return line.rstrip(b"\n").removesuffix(b"\r").decode("utf-8").split("\t")


def _problem(fields: list[str], spec: WebSet) -> str | None:
    """Why a split line is not a row of ``spec``; None when it is."""
    if len(fields) != 2:
        return f"{len(fields)} tab-separated column(s), expected 2 ({' <TAB> '.join(spec.columns)})"
    row = dict(zip(spec.columns, fields, strict=True))
    if URL.match(row["caption"]):
        return f"column {spec.columns.index('caption') + 1}, the caption ({row['caption'][:60]!r}), is a URL"
    if not URL.match(row["url"]):
        return f"column {spec.columns.index('url') + 1}, the url ({row['url'][:60]!r}), is not an http(s) URL"
    return None


def read_tsv(path: Path, spec: WebSet) -> TsvInfo:
    """Check every line of ``path`` and count the rows; InputError naming the first bad lines."""
    if not path.is_file():
        raise InputError(f"{path} not found: expected the {spec.name} TSV ({spec.tsv_file})")
    digest = hashlib.sha256()
    rows = 0
    bad: list[str] = []
    n_bad = 0
    swapped = 0  # lines whose columns are in the other set's order
    with open(path, "rb") as f:
        for rows, line in enumerate(f, 1):
            digest.update(line)
            try:
                fields = _fields(line)
            except UnicodeDecodeError as error:
                problem = f"not UTF-8 ({error})"
            else:
                problem = _problem(fields, spec)
                swapped += problem is not None and len(fields) == 2 and _problem(fields[::-1], spec) is None
            if problem is not None:
                n_bad += 1
                if len(bad) < SHOWN:
                    bad.append(f"line {rows}: {problem}")
    if rows == 0:
        raise InputError(f"{path} is empty: expected the {spec.name} TSV ({spec.tsv_file})")
    if n_bad:
        message = (
            f"{path}: {n_bad:,} of {rows:,} line(s) are not {spec.name} rows "
            f"({' <TAB> '.join(spec.columns)}, no header):\n  " + "\n  ".join(bad)
        )
        if swapped == n_bad:
            other = next(s for s in WEB_SETS.values() if s.columns != spec.columns)
            message += (
                f"\nEvery bad line has the columns the other way round ({' <TAB> '.join(other.columns)}): "
                f"this looks like a {other.name} file; use prepare.py {other.name}"
            )
        raise InputError(message)
    return TsvInfo(rows, digest.hexdigest())


def write_jsonl(path: Path, spec: WebSet, dest: Path) -> None:
    """The rows of a checked TSV as JSON lines ``{"caption", "url"}``, in order, for img2dataset."""
    with open(path, "rb") as f, open(dest, "w", encoding="utf-8") as out:
        for line in f:
            row = dict(zip(spec.columns, _fields(line), strict=True))
            out.write(json.dumps({"caption": row["caption"], "url": row["url"]}, ensure_ascii=False) + "\n")


def img2dataset_executable(venv: Path = VENV, requirements: Path = REQUIREMENTS) -> Path:
    """``venv/bin/img2dataset``, installing ``requirements`` into a new ``venv`` when it is absent
    or was filled from other requirements. Safe when several processes call it at once."""
    exe = venv / "bin" / "img2dataset"
    stamp = venv / ".requirements"
    wanted = requirements.read_text()
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return exe
        print(f">>> installing {requirements.name} into {venv} (first use only; needs the package index)", flush=True)
        shutil.rmtree(venv, ignore_errors=True)  # half made, or made from another pin
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
            subprocess.run([*pip, "-r", str(requirements)], check=True)
        except subprocess.CalledProcessError as error:
            sys.exit(f"installing img2dataset into {venv} failed ({error}); see the messages above")
        stamp.write_text(wanted)  # last: an interrupted install is redone
    return exe


def shard_names(out: Path, shards: int) -> list[Path]:
    return [out / f"{shard:05d}" for shard in range(shards)]  # img2dataset's 5-digit shard names


def stats_file(name: Path) -> Path:
    """img2dataset writes it after closing the shard's tar: its presence means the shard is whole."""
    return name.with_name(name.name + "_stats.json")


def check_source(out: Path, record: dict) -> None:
    """InputError when ``out`` holds shards of another TSV or shard size, which a resume would mix in."""
    path = out / SOURCE_RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        if old == record:
            return
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in record.items() if old.get(k) != v)
        raise InputError(f"{out} holds shards made from other input ({changed}): give another --out or remove it")
    if any(out.glob("*_stats.json")):
        raise InputError(f"{out} holds shards that prepare.py did not make: give another --out or remove it")


def run_img2dataset(exe: Path, url_list: Path, out: Path, args: argparse.Namespace) -> None:
    """The real img2dataset on ``url_list``; a rerun skips the shards whose stats file exists."""
    command = [str(exe), "--url_list", str(url_list), "--input_format", "jsonl"]
    command += ["--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset"]
    command += ["--output_folder", str(out), "--image_size", str(IMAGE_SIZE), "--resize_mode", "keep_ratio"]
    command += ["--processes_count", str(args.processes), "--thread_count", str(args.threads)]
    command += ["--number_sample_per_shard", str(args.samples_per_shard), "--timeout", str(args.timeout)]
    command += ["--incremental_mode", "incremental", "--enable_wandb", "False"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["WANDB_MODE"] = "disabled"  # offline even if a wandb login exists
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations asks PyPI for a newer version on import
    print(">>> " + " ".join(command), flush=True)
    subprocess.run(command, env=env, check=False)  # its status says nothing about shards; the stats files do


@dataclass(frozen=True)
class Summary:
    shards: int
    done: int
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    reasons: Counter


def summarize(out: Path, shards: int) -> Summary:
    """The sums of img2dataset's ``*_stats.json`` files of shards ``0 .. shards - 1``."""
    totals = dict.fromkeys(("count", "successes", "failed_to_download", "failed_to_resize"), 0)
    reasons: Counter = Counter()
    done = 0
    for name in shard_names(out, shards):
        if not (stats_file(name).is_file() and name.with_suffix(".tar").is_file()):
            continue
        stats = json.loads(stats_file(name).read_text())
        done += 1
        for key in totals:
            totals[key] += int(stats[key])
        reasons.update(stats["status_dict"])
    reasons.pop("success", None)
    return Summary(shards, done, **totals, reasons=reasons)


def print_summary(spec: WebSet, out: Path, rows: int, s: Summary) -> None:
    def share(n: int) -> str:
        return f"{n:,} ({100 * n / max(s.count, 1):.1f}%)"

    print(f"{spec.name}: {rows:,} TSV rows -> {s.done} of {s.shards} shards in {out}/{{00000..{s.shards - 1:05d}}}.tar")
    print(f"  rows in the shards:  {s.count:,}")
    print(f"  successes:           {share(s.successes)}")
    print(f"  failed_to_download:  {share(s.failed_to_download)}")
    print(f"  failed_to_resize:    {share(s.failed_to_resize)}")
    if s.reasons:
        print("  failures by reason:")
        for reason, n in s.reasons.most_common(REASONS_SHOWN):
            print(f"    {n:>10,}  {reason[:150]}")
        others = sum(s.reasons.values()) - sum(n for _, n in s.reasons.most_common(REASONS_SHOWN))
        if others:
            print(f"    {others:>10,}  (other reasons)")
    print(
        f"train with: --train_data {out.resolve()} --data_size {rows} (sample keys are the TSV rows 0..{rows - 1}, "
        f"failed rows are gaps; an epoch is the {s.successes:,} successes)"
    )


def prepare_web(args: argparse.Namespace) -> int:
    """``cc3m`` / ``cc12m``: the TSV -> webdataset shards in ``--out``, then the summary."""
    spec = WEB_SETS[args.command]
    out = Path(args.out or f"datasets/{spec.name}")
    n = args.samples_per_shard
    if n < 1 or 10 ** round(math.log10(n)) != n:
        raise InputError(
            f"--samples_per_shard {n}: must be a power of ten, or img2dataset's keys "
            "(shard * 10**digits + position) are not the TSV rows"
        )
    if min(args.processes, args.threads) < 1 or args.timeout <= 0:
        raise InputError("--processes, --threads and --timeout must be positive")
    tsv = read_tsv(Path(args.tsv), spec)
    record = {"dataset": spec.name, "rows": tsv.rows, "tsv_sha256": tsv.sha256, "samples_per_shard": n}
    if out.is_dir():
        check_source(out, record)
    if tsv.rows != spec.published_rows:
        print(f"note: {tsv.rows:,} rows; the published {spec.tsv_file} has {spec.published_rows:,}")
    shards = math.ceil(tsv.rows / n)
    if summarize(out, shards).done < shards:
        exe = img2dataset_executable()
        out.mkdir(parents=True, exist_ok=True)
        (out / SOURCE_RECORD).write_text(json.dumps(record))
        url_list = out / INPUT_JSONL
        try:
            write_jsonl(Path(args.tsv), spec, url_list)
            run_img2dataset(exe, url_list, out, args)
        finally:
            with suppress(FileNotFoundError):
                url_list.unlink()
    summary = summarize(out, shards)
    print_summary(spec, out, tsv.rows, summary)
    if summary.done < shards:
        missing = [name.name for name in shard_names(out, shards) if not stats_file(name).is_file()]
        print(f"{shards - summary.done} shard(s) unfinished (e.g. {', '.join(missing[:SHOWN])}): run this again")
        return EXIT_INCOMPLETE
    return EXIT_OK


def add_web_download(subparsers: argparse._SubParsersAction, name: str) -> None:
    """The parser of ``cc3m`` or ``cc12m``."""
    spec = WEB_SETS[name]
    cpus = os.cpu_count() or 1
    p = subparsers.add_parser(
        name,
        help=f"{spec.tsv_file} -> webdataset shards in datasets/{name} (downloads with img2dataset)",
        description=(
            f"Download {name} from its TSV ({spec.tsv_file}: one '{'<TAB>'.join(spec.columns)}' line per row, no "
            f"header; {spec.published_rows:,} rows) into webdataset shards with img2dataset "
            f"(--output_format webdataset, {IMAGE_SIZE} px, --resize_mode keep_ratio), installed on first use "
            f"into its own environment {VENV.name} from {REQUIREMENTS.name}. The whole TSV is checked first. "
            "Sample keys are the TSV rows, so train with --data_size = rows, printed at the end with the "
            "successes and failures (from img2dataset's *_stats.json). A rerun resumes: finished shards are "
            "kept, and when all are there nothing is downloaded. Exit status 0 all shards done, 1 shards "
            "unfinished (run it again), 2 bad input (nothing written)."
        ),
    )
    p.add_argument("tsv", metavar="TSV", help=f"path of {spec.tsv_file}")
    p.add_argument("--out", help=f"output folder of the shards (default: datasets/{name})")
    p.add_argument("--processes", type=int, default=cpus, help="img2dataset processes (default: the CPUs, %(default)s)")
    p.add_argument("--threads", type=int, default=THREADS, help="download threads per process (default: %(default)s)")
    p.add_argument(
        "--samples_per_shard",
        type=int,
        default=SAMPLES_PER_SHARD,
        help="rows per shard, a power of ten so that keys are TSV rows (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=10, help="seconds per image download (default: %(default)s)")
    p.set_defaults(run=prepare_web)
