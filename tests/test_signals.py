"""A stop signal sent to a whole process group (Ctrl-C in a terminal, ``kill -- -PGID``, systemd,
container runtimes; Slurm signals every process of a job step): loader workers receive it too.
They ignore it and leave the decision to the training, which checkpoints on every rank and
exits with status 3; ``--resume auto`` then continues exactly (TARGETS R2).

Each launcher (one process, torchrun with two gloo ranks, ``bash run.slurm`` with one and with
two processes) trains the tiny run with 2 loader workers per rank in its own session, as a
terminal would start it; the signal goes to the session's process group once some steps are
logged. The resumed run must end with the weights, loss state, progress and per-step losses of
the same run left uninterrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.checkpoint import load_checkpoint
from slurm_harness import env_without_slurm
from tiny_run import tiny_run_args

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "bimodal_exps" / "clip.py"
EPOCHS, BATCH, WORKERS = 2, 16, 2
EXIT_STOPPED = 3


def train_args(root: Path, out: Path, per_rank_batch: int, **extra) -> list[str]:
    return tiny_run_args(
        root, out, workers=WORKERS, log_every=1, epochs=EPOCHS, batch_size_train=per_rank_batch, **extra
    )


def command(launcher: str, root: Path, out: Path, config: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``launcher``, training the tiny run into ``out``."""
    env = env_without_slurm({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if launcher == "python":
        return [sys.executable, str(CLIP), *train_args(root, out, BATCH), "--resume", "auto"], env
    if launcher == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        return [*torchrun, str(CLIP), *train_args(root, out, BATCH // 2), "--resume", "auto"], env
    nproc = launcher.removeprefix("run.slurm-")  # run.slurm-1, run.slurm-2
    env.update(config=str(config), epochs=str(EPOCHS), output_dir=str(out), nproc=nproc)
    env["batch_size"] = str(BATCH // int(nproc))
    return ["bash", str(REPO / "run.slurm"), "--log_every", "1"], env


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session and process group, as a terminal starts a command
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # bash cannot trap an ignored SIGINT
    )


def finish(proc: subprocess.Popen, status: int) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == status, output[-4000:]
    return output


def logged(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (ranks, loader workers)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for child, parent in (map(int, line.split()) for line in out.splitlines()):
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.fixture(scope="module")
def tiny_config(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny run as a YAML config for run.slurm (output folder, epochs, batch size from run.slurm)."""
    flags = tiny_run_args(tiny_dataset, "unused", workers=WORKERS)
    values = {k.removeprefix("--"): v for k, v in zip(flags[::2], flags[1::2], strict=True)}
    for key in ("output_dir", "epochs", "batch_size_train"):
        del values[key]
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tiny_config, tmp_path_factory):
    """The runs to compare with, once per number of ranks: {ranks: output folder}."""
    runs = {}
    for ranks, launcher in ((1, "python"), (2, "torchrun")):
        out = tmp_path_factory.mktemp("uninterrupted") / str(ranks)
        finish(start(*command(launcher, tiny_dataset, out, tiny_config)), 0)
        runs[ranks] = out
    return runs


CASES = [
    ("python", signal.SIGTERM),
    ("python", signal.SIGUSR1),
    ("python", signal.SIGINT),
    ("torchrun", signal.SIGTERM),
    ("torchrun", signal.SIGINT),
    ("run.slurm-1", signal.SIGINT),
    ("run.slurm-2", signal.SIGTERM),
]


@pytest.mark.parametrize(("launcher", "sig"), CASES, ids=[f"{launcher}-{sig.name}" for launcher, sig in CASES])
def test_group_signal_checkpoints_every_rank_and_resumes_exactly(
    tiny_dataset, tiny_config, uninterrupted, tmp_path, launcher, sig
):
    ranks = 2 if launcher in ("torchrun", "run.slurm-2") else 1
    out = tmp_path / "run"
    cmd, env = command(launcher, tiny_dataset, out, tiny_config)
    proc = start(cmd, env)
    deadline = time.monotonic() + 300
    while len(logged(out)) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline, "no training steps within 300 s"
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert len(descendants(proc.pid)) >= WORKERS * ranks, "the loader workers should be running"
    # every process of the group: the launcher, and the ranks with their loader workers (torchrun
    # starts each rank in a session of its own and passes the signal on to its whole group)
    os.killpg(proc.pid, sig)
    sent = time.monotonic()
    # torchrun itself reports the workers that stopped as failed; the workers' own status is 3
    output = finish(proc, 1 if launcher == "torchrun" else EXIT_STOPPED)
    assert time.monotonic() - sent < 60
    assert "exited unexpectedly" not in output and "KeyboardInterrupt" not in output
    assert output.count(f"{sig.name}: saving a checkpoint at step") == ranks, output[-4000:]
    state = load_checkpoint(out / "checkpoint_latest.pth")
    stopped_at = state["progress"]["step"]
    assert 3 <= stopped_at < EPOCHS * len(logged(uninterrupted[ranks])) and state["progress"]["epoch_step"] > 0
    assert len(state["per_rank"]) == ranks and all(p["data_position"] for p in state["per_rank"])
    if launcher.startswith("run.slurm"):
        assert ">>> training stopped by a signal after saving a checkpoint" in output

    finish(start(cmd, env), 0)  # the same command again continues the run
    want = load_checkpoint(uninterrupted[ranks] / "checkpoint_latest.pth")
    got = load_checkpoint(out / "checkpoint_latest.pth")
    assert got["progress"] == want["progress"]
    for part in ("model", "loss"):
        for key, value in want[part].items():
            assert torch.allclose(got[part][key].double(), value.double(), atol=1e-6, rtol=0), f"{part}.{key}"
    steps, want_steps = logged(out), logged(uninterrupted[ranks])
    assert [s["step"] for s in steps] == [s["step"] for s in want_steps]  # one continuous log
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in want_steps], abs=1e-6)


def test_second_ctrl_c_aborts_at_once():
    """The first SIGINT asks for a checkpoint; copies within a second (the group's delivery and a
    launcher passing it on) are the same request; a later one raises KeyboardInterrupt."""
    from engine.stop import SAME_REQUEST_S, StopRequest

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequest()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        time.sleep(SAME_REQUEST_S + 0.2)
        with pytest.raises(KeyboardInterrupt, match="a second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs at the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM never aborts
        assert stop.signal_name == "SIGINT"
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_second_ctrl_c_exits_130_without_a_traceback(tiny_dataset, tmp_path):
    """A second Ctrl-C more than a second after the first, while the step that the first one
    waits for is still running, aborts at once: one line, exit status 130.

    The step is slow on any CPU: a wide image tower on 100 samples with one thread (about 6 s
    on a 2-core AVX-512 Xeon). Both signals come inside the third of four steps: the first
    0.3 s after the second log line, once the work that follows a log line is done (the first
    one also opens the TensorBoard writer, which can take longer than a step's start)."""
    out = tmp_path / "run"
    slow = {"image_encoder_kwargs": "{img_size: 32, patch_size: 4, embed_dim: 256, depth: 12, num_heads: 4}"}
    args = tiny_run_args(tiny_dataset, out, workers=0, log_every=1, epochs=50, batch_size_train=100, **slow)
    env = env_without_slurm({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc = start([sys.executable, str(CLIP), *args], env)
    deadline = time.monotonic() + 300
    while len(logged(out)) < 2 and proc.poll() is None:  # the third step has begun
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.3)
    proc.send_signal(signal.SIGINT)
    output = finish(proc, 130)
    assert "aborted by a second Ctrl-C" in output and "Traceback" not in output
    assert not (out / "checkpoint_latest.pth").exists()
    assert len(logged(out)) == 2, "the third step ended before the second Ctrl-C"


def test_a_finished_run_gives_back_the_signal_handlers(tiny_dataset, tmp_path):
    """clip.main run inside another program (a notebook, a test) leaves its signal handling as
    it was: a multiprocessing pool forked afterwards still dies of SIGTERM."""
    import clip

    stop_signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in stop_signals}
    assert clip.main(tiny_run_args(tiny_dataset, tmp_path / "run", workers=0, epochs=1)) == 0
    assert {s: signal.getsignal(s) for s in stop_signals} == before
