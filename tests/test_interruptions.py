"""Interrupted runs lose nothing (TARGETS R1-R3, R6): exact resume after SIGKILL, clean stop on
SIGTERM/SIGUSR1, atomic checkpoint files, skipped non-finite steps, incompatible resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import clip
from engine.checkpoint import CheckpointDir, load_checkpoint, save_checkpoint
from tiny_run import tiny_run_args

CLIP = Path(__file__).resolve().parents[1] / "bimodal_exps" / "clip.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CLIP), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def log_steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def run_args(root, out, **overrides) -> list[str]:
    # 2 loader workers: the data position of each worker is part of what must resume exactly
    return tiny_run_args(
        root,
        out,
        **{"workers": 2, "log_every": 1, "save_every_steps": 5, "epochs": 2, "ita_type": "isogclr", **overrides},
    )


def test_killed_run_resumes_exactly(tiny_dataset, tmp_path):
    """SIGKILL mid-epoch, then --resume auto: the same weights, loss state and samples seen as a
    run that was never interrupted (deterministic CPU set-up)."""
    whole = subprocess.run(
        [sys.executable, str(CLIP), *run_args(tiny_dataset, tmp_path / "whole")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stdout[-3000:]

    out = tmp_path / "killed"
    proc = start(run_args(tiny_dataset, out))
    wait_for(lambda: (out / "checkpoint_step5.pth").exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "checkpoint_1.pth").exists()

    resumed = subprocess.run(
        [sys.executable, str(CLIP), *run_args(tiny_dataset, out, resume="auto")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout

    want = load_checkpoint(tmp_path / "whole" / "checkpoint_latest.pth")
    got = load_checkpoint(out / "checkpoint_latest.pth")
    assert got["progress"] == want["progress"]  # same steps and samples seen
    for part in ("model", "loss"):
        for key, value in want[part].items():
            assert torch.allclose(got[part][key].double(), value.double(), atol=1e-6, rtol=0), f"{part}.{key}"
    # one continuous log: every step once, in order, with the uninterrupted run's losses
    assert log_steps(out) == log_steps(tmp_path / "whole")
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    want_lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(lines, want_lines, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_and_exits(tiny_dataset, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(run_args(tiny_dataset, out, save_every_steps=0, epochs=3))
    wait_for(lambda: len(log_steps(out)) >= 3 or proc.poll() is not None)
    sent = time.monotonic()
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 60
    assert proc.returncode == clip.EXIT_STOPPED, output[-3000:]
    state = load_checkpoint(out / "checkpoint_latest.pth")
    assert state["progress"]["step"] >= 3
    assert signal.Signals(sig).name in output

    resumed = subprocess.run(
        [sys.executable, str(CLIP), *run_args(tiny_dataset, out, epochs=3, resume="auto")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert load_checkpoint(out / "checkpoint_latest.pth")["progress"]["epoch"] == 3
    steps = log_steps(out)
    assert steps == list(range(1, steps[-1] + 1))


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A process killed while writing leaves the previous checkpoint loadable; the next run
    clears the partial temporary file."""
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"step": 1, "weights": torch.ones(10)}, path)
    writer = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(CLIP.parent)!r})
        from engine.checkpoint import save_checkpoint
        save_checkpoint({{"step": 2, "weights": torch.zeros(400_000_000, dtype=torch.uint8)}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    wait_for(lambda: any(tmp_path.glob(".checkpoint_latest.pth.*.tmp")) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the write finished before the kill"
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(10))
    CheckpointDir(tmp_path).remove_stale_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]


def test_step_checkpoints_are_pruned(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert clip.main(run_args(tiny_dataset, out, workers=0, save_every_steps=2, keep_step_checkpoints=2, epochs=1)) == 0
    steps = sorted(int(p.stem.removeprefix("checkpoint_step")) for p in out.glob("checkpoint_step*.pth"))
    assert len(steps) == 2 and steps[-1] >= 8
    assert (out / "checkpoint_0.pth").samefile(out / "checkpoint_latest.pth")


def test_resume_from_another_model_or_loss_is_refused(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert clip.main(run_args(tiny_dataset, out, workers=0, epochs=1)) == 0
    capsys.readouterr()
    assert clip.main(run_args(tiny_dataset, out, workers=0, epochs=2, resume="auto", ita_type="sogclr")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "ita_type" in err and "'isogclr' there, 'sogclr' here" in err
    assert clip.main(run_args(tiny_dataset, out, workers=0, epochs=2, resume="auto", embed_dim=8)) == 2
    assert "embed_dim: 16 there, 8 here" in capsys.readouterr().err


def test_torn_last_log_lines_are_dropped_at_resume(tiny_dataset, tmp_path, capsys):
    """A kill in the middle of writing log.jsonl or eval.jsonl leaves a torn last line: the resume
    drops it with a warning (TARGETS R13) and the files read as one run again."""
    out = tmp_path / "run"
    assert clip.main(run_args(tiny_dataset, out, workers=0, epochs=1)) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 13, "epoch": 1, "lo')
    with open(out / "eval.jsonl", "a") as f:
        f.write('{"dataset": "synthetic_val", "spl')
    capsys.readouterr()
    assert clip.main(run_args(tiny_dataset, out, workers=0, epochs=2, resume="auto")) == 0
    torn = [line for line in capsys.readouterr().out.splitlines() if "torn by an interrupted write" in line]
    assert len(torn) == 2 and any("log.jsonl" in m for m in torn) and any("eval.jsonl" in m for m in torn)
    for name in ("log.jsonl", "eval.jsonl"):
        records = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert records and all("step" in r for r in records)
    assert log_steps(out) == list(range(1, log_steps(out)[-1] + 1))
