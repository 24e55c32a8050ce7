"""run.slurm and eval.slurm under a real Slurm started on this machine, and under plain bash.

The Slurm tests submit the scripts as users do (sbatch options, environment variables and
clip.py flags after the script name) with a tiny run: 2 tasks on the node, so 2 gloo ranks
on the CPU, on the tiny synthetic dataset. Interrupted jobs (the signal Slurm sends before
the time limit, a requeue as on preemption) must resume and end as the uninterrupted run
does. The Slurm tests skip when Slurm cannot run here (see
slurm_harness.unavailable_reason); with SLURM_TESTS=required (set by tests/run.sh as root)
they fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from engine.checkpoint import load_checkpoint
from slurm_harness import ENDED, NODE, Job, LocalSlurm, env_without_slurm, unavailable_reason
from tiny_run import tiny_run_args

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
# the test node has no GPUs and 2 CPUs; the time limit (minutes) ends a hung job
NO_GPUS = ("--gres=none", "--cpus-per-task=1", "--time=10")
RUN_JOB = "test-run-slurm"
STEPS_PER_EPOCH = 12  # 396 readable samples // global batch 32 (16 per rank x 2 ranks)


def write_tiny_config(data_root: Path, path: Path, workers: int = 0) -> Path:
    """The tiny run's settings as a YAML config; output folder, epochs and batch size are left to the scripts."""
    flags = tiny_run_args(data_root, "unused", workers=workers)
    # values stay strings: clip.py converts them as it converts command-line values
    values = {k.removeprefix("--"): v for k, v in zip(flags[::2], flags[1::2], strict=True)}
    for key in ("output_dir", "epochs", "batch_size_train"):
        del values[key]
    path.write_text(yaml.safe_dump(values))
    return path


def evals(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "eval.jsonl").read_text().splitlines()]


def table_row(log: str, name: str) -> list[float]:
    """The recall columns of the printed table's row ``name``."""
    rows = [line.split() for line in log.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, f"expected one table row {name!r} in:\n{log[-3000:]}"
    return [float(v) for v in rows[0][-len(COLUMNS) :]]


def metrics(entry: dict) -> list[float]:
    return [entry[c] for c in COLUMNS]


def train_log(output_dir: Path) -> list[dict]:
    path = output_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def remove_job_logs(name: str) -> None:
    """job_output/ belongs to the user: the tests remove their own logs, before they run too, as
    job ids restart at 1 in every test cluster and run.slurm appends to a log of the same name."""
    for path in (REPO / "job_output").glob(f"{name}-*.out"):
        path.unlink()


def finished(job: Job) -> str:
    log = job.output()
    assert (job.state, job.exit_code) == ("COMPLETED", 0), f"job {job.job_id}: {job.state}\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("SLURM_TESTS") == "required":
            pytest.fail(f"SLURM_TESTS=required, but {reason}")
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm") / "cluster") as cluster:
        yield cluster


def run_env(config: Path, output_dir: Path) -> dict[str, str]:
    """run.slurm's variables for the tiny run: isogclr, 2 epochs, 16 samples per rank."""
    return {
        "config": str(config),
        "ita_type": "isogclr",
        "epochs": "2",
        "batch_size": "16",
        "output_dir": str(output_dir),
    }


@pytest.fixture(scope="module")
def slurm_run(slurm, tiny_dataset, tmp_path_factory):
    """``sbatch run.slurm`` from the repository root: 2 tasks, 2 epochs; (job, config, output folder)."""
    folder = tmp_path_factory.mktemp("slurm_run")
    # loader workers: Slurm signals every process of the job, workers included
    config = write_tiny_config(tiny_dataset, folder / "tiny.yaml", workers=2)
    out = folder / "run"
    remove_job_logs(RUN_JOB)
    try:
        job = slurm.submit(
            REPO / "run.slurm",
            args=["--log_every", "1"],
            options=[f"--job-name={RUN_JOB}", "--ntasks-per-node=2", *NO_GPUS],
            env=run_env(config, out),
            cwd=REPO,
        )
        yield job, config, out
    finally:
        remove_job_logs(RUN_JOB)


@pytest.mark.slurm
def test_run_slurm_trains_one_rank_per_task(slurm_run):
    job, _, out = slurm_run
    log = finished(job)
    assert job.log == REPO / "job_output" / f"{RUN_JOB}-{job.job_id}.out"
    # the rendezvous comes from the allocation: its first node, a port derived from the job id
    assert f"2 tasks on 1 node(s) ({NODE}), rendezvous {NODE}:{10000 + job.job_id % 20000}" in log
    assert "global batch 32 (16 per rank x 2 ranks)" in log
    assert "training isogclr: 2 epochs" in log
    assert "Falling back" not in log
    for name in ("checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        assert (out / name).is_file(), name
    entries = evals(out)
    assert [e["tag"] for e in entries if e["dataset"] == "synthetic_test"] == ["untrained", "final"]
    final = entries[-1]
    assert (final["epoch"], final["step"]) == (1, 2 * STEPS_PER_EPOCH)  # after epoch 1, counted from 0
    # rank 0 alone prints the table, and it shows what eval.jsonl holds
    assert log.count("final synthetic_test") == 1
    assert table_row(log, "final synthetic_test") == pytest.approx(metrics(final), abs=0.006)


@pytest.mark.slurm
def test_eval_slurm_reproduces_the_final_evaluation(slurm, slurm_run, tmp_path):
    run_job, config, out = slurm_run
    finished(run_job)
    # submitted by path from another folder: the script finds the repository through Slurm
    (tmp_path / "job_output").mkdir()
    job = slurm.submit(
        REPO / "eval.slurm",
        options=["--job-name=test-eval-slurm", *NO_GPUS],
        env={"config": str(config), "checkpoint": str(out / "checkpoint_latest.pth")},
        cwd=tmp_path,
    )
    log = finished(job)
    assert job.log == tmp_path / "job_output" / f"test-eval-slurm-{job.job_id}.out"
    final = next(e for e in evals(out) if e["tag"] == "final")
    evaluated = next(e for e in evals(out) if e["tag"] == "evaluate" and e["dataset"] == "synthetic_test")
    # the same model on the same split: the same recalls, whether 2 ranks or 1 embed it
    assert metrics(evaluated) == pytest.approx(metrics(final), abs=1e-6)
    assert (evaluated["epoch"], evaluated["step"]) == (final["epoch"], final["step"])
    assert table_row(log, "synthetic_test") == pytest.approx(metrics(final), abs=0.006)


def start_run(slurm: LocalSlurm, name: str, config: Path, output_dir: Path, epochs: int, *options: str) -> int:
    """Submit the tiny run from the repository root as job ``name``; its job id."""
    return slurm.start_job(
        REPO / "run.slurm",
        args=["--log_every", "1"],
        options=[f"--job-name={name}", "--ntasks-per-node=2", *NO_GPUS, *options],
        env={**run_env(config, output_dir), "epochs": str(epochs)},
        cwd=REPO,
    )


@pytest.fixture
def job_name(request):
    """A job name for this test; its logs are removed from job_output/ before and after."""
    name = "test-" + request.node.name.removeprefix("test_").replace("[", "-").removesuffix("]")
    remove_job_logs(name)
    yield name
    remove_job_logs(name)


@pytest.mark.slurm
@pytest.mark.parametrize(
    "interrupt",
    [
        # SIGUSR1 to the batch script alone (as --signal=B:USR1@... does): run.slurm passes it
        # on to srun, srun to the tasks; run.slurm requeues the job after the checkpoint
        ["scancel", "--batch", "--signal=USR1"],
        # what preemption with requeueing does: SIGTERM to every process of the job, the batch
        # script and srun included; Slurm requeues the job itself
        ["scontrol", "requeue"],
        # SIGTERM to every process of the job's steps (the ranks and their loader workers)
        # without ending the job: the ranks checkpoint, and the job, still running, requeues itself
        ["scancel", "--signal=TERM"],
        # SIGUSR1 to every process of the job, the batch script, srun and the loader workers included
        ["scancel", "--full", "--signal=USR1"],
    ],
    ids=["usr1", "requeue", "term-steps", "usr1-full"],
)
def test_interrupted_job_resumes_where_it_stopped(slurm, slurm_run, interrupt, job_name, tmp_path):
    """The job checkpoints, is requeued and resumes; it ends as the uninterrupted job did, in one log."""
    _, config, uninterrupted = slurm_run
    out = tmp_path / "run"
    job_id = start_run(slurm, job_name, config, out, 2)
    # mid-epoch: the data position within the epoch has to be resumed too
    wait_for(lambda: len(train_log(out)) >= 3 or slurm.job_state(job_id) in ENDED, 300, "3 steps")
    assert slurm.job_state(job_id) == "RUNNING", slurm.wait_for_job(job_id).output()[-4000:]
    slurm.command(*interrupt, str(job_id))
    job = slurm.wait_for_job(job_id)
    log = finished(job)

    assert job.restarts == 1, log[-4000:]
    # one log for both runs (--open-mode=append): the stop, the requeue, the resumed run
    assert log.count(f">>> Slurm job {job_id}:") == 2
    stopped_by = "SIGTERM" if interrupt[-1] in ("requeue", "--signal=TERM") else "SIGUSR1"
    assert f"{stopped_by}: saving a checkpoint at step" in log or "stopping after epoch" in log
    assert ">>> training stopped by a signal after saving a checkpoint" in log
    assert "exited unexpectedly" not in log
    if interrupt[0] == "scancel":
        assert f">>> requeueing job {job_id}" in log
    else:
        assert f">>> job {job_id} is not requeued by this script" in log
    assert "resumed from" in log
    assert log.count("final synthetic_test") == 1

    # the same end as the uninterrupted run: steps, samples, and (deterministic CPU ranks) losses
    total = 2 * STEPS_PER_EPOCH
    progress = load_checkpoint(out / "checkpoint_latest.pth")["progress"]
    assert (progress["epoch"], progress["step"], progress["samples_seen"]) == (2, total, 32 * total)
    steps = train_log(out)
    assert [s["step"] for s in steps] == list(range(1, total + 1))  # one continuous log.jsonl
    want = train_log(uninterrupted)
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in want], abs=1e-5)
    final = next(e for e in evals(out) if e["tag"] == "final")
    want_final = next(e for e in evals(uninterrupted) if e["tag"] == "final")
    assert metrics(final) == pytest.approx(metrics(want_final), abs=1e-6)


@pytest.mark.slurm
def test_time_limit_warning_requeues_the_job(slurm, slurm_run, job_name, tmp_path):
    """Slurm's own warning before the time limit stops the training, the job requeues itself and
    resumes; a later scancel stops it for good, after a checkpoint too.

    Slurm checks time limits about every 30 s (PERIODIC_TIMEOUT), and sends the warning at the
    first check less than the warning time plus 30 s before the end: with a two-minute limit and
    the warning 50 s before it, SIGUSR1 comes 40 to 70 s after the start, once the training has
    started (a signal to a step that has not started yet is lost), and 50 s or more before the
    end, which leaves the warning a check of its own even when a loaded machine delays one
    (with the warning 5 s before a one-minute limit, a late check sent it together with the
    kill). The run is far too long to finish, so the test ends it once the requeued job trains."""
    _, config, _ = slurm_run
    out = tmp_path / "run"
    job_id = start_run(slurm, job_name, config, out, 1000, "--time=2", "--signal=USR1@50")
    log_path = REPO / "job_output" / f"{job_name}-{job_id}.out"

    def job_log() -> str:
        return log_path.read_text() if log_path.is_file() else ""

    wait_for(lambda: "resumed from" in job_log() or slurm.job_state(job_id) in ENDED, 300, "the requeued job")
    assert "resumed from" in job_log(), job_log()[-4000:] + slurm.daemon_logs()
    resumed_at = len(train_log(out))
    wait_for(lambda: len(train_log(out)) > resumed_at + 2 or slurm.job_state(job_id) in ENDED, 120, "more steps")
    assert slurm.job_state(job_id) == "RUNNING", job_log()[-4000:]
    slurm.command("scancel", str(job_id))
    job = slurm.wait_for_job(job_id)
    log = job.output()

    assert (job.state, job.restarts) == ("CANCELLED", 1), log[-4000:]
    assert log.count(f">>> Slurm job {job_id}:") == 2
    assert "SIGUSR1: saving a checkpoint at step" in log or "stopping after epoch" in log
    assert f">>> requeueing job {job_id}" in log
    # scancel: the tasks checkpoint on SIGTERM, and the job is not requeued
    assert "SIGTERM: saving a checkpoint at step" in log or "stopping after epoch" in log
    assert f">>> job {job_id} is not requeued by this script" in log
    steps = [s["step"] for s in train_log(out)]
    assert steps == list(range(1, len(steps) + 1))
    assert load_checkpoint(out / "checkpoint_latest.pth")["progress"]["step"] == steps[-1]


def test_scripts_run_under_bash_without_slurm(tiny_dataset, tmp_path):
    """bash run.slurm / bash eval.slurm from another folder: one process, no Slurm anywhere.
    Ctrl-C stops the training after a checkpoint; the same command again continues it."""
    config = write_tiny_config(tiny_dataset, tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    epochs = 3
    # one torch thread: with more than the free cores, OpenMP threads that wait for each other
    # make CPU training many times slower
    env = env_without_slurm(
        {
            "config": str(config),
            "epochs": str(epochs),
            "batch_size": "32",
            "output_dir": str(out),
            "OMP_NUM_THREADS": "1",
        }
    )

    def bash(script: str, *args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(REPO / script), *args],
            cwd=tmp_path,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a command started in a terminal
            # as in a terminal: this test may run where SIGINT is ignored, which bash could not trap
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def output(proc: subprocess.Popen, status: int = 0) -> str:
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == status, text[-3000:]
        return text

    interrupted = bash("run.slurm", "--log_every", "1")
    wait_for(lambda: len(train_log(out)) >= 2 or interrupted.poll() is not None, 300, "2 steps")
    os.killpg(interrupted.pid, signal.SIGINT)  # Ctrl-C: every process of the terminal's foreground group
    stopped = output(interrupted, status=3)
    assert "SIGINT: saving a checkpoint at step" in stopped or "stopping after epoch" in stopped
    assert f">>> training stopped by a signal after saving a checkpoint in {out}" in stopped
    assert ">>> to continue, run the same command again" in stopped

    trained = output(bash("run.slurm", "--log_every", "1"))
    assert "resumed from" in trained
    assert [s["step"] for s in train_log(out)] == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    final = next(e for e in evals(out) if e["tag"] == "final")
    assert table_row(trained, "final synthetic_test") == pytest.approx(metrics(final), abs=0.006)
    evaluated = output(bash("eval.slurm", checkpoint=str(out / "checkpoint_latest.pth")))
    assert table_row(evaluated, "synthetic_test") == pytest.approx(metrics(final), abs=0.006)


@pytest.mark.parametrize("script", ["run.slurm", "eval.slurm"])
def test_scripts_reject_a_wrong_repo_root(script, tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / script)],
        cwd=tmp_path,
        env=env_without_slurm({"REPO_ROOT": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"REPO_ROOT={tmp_path} holds no bimodal_exps/clip.py" in done.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--output_dir", "elsewhere"], "set output_dir=DIR instead of --output_dir"),
        (["--resume=output/x/checkpoint_3.pth"], "run.slurm always resumes from output_dir"),
    ],
    ids=["output_dir", "resume"],
)
def test_run_slurm_rejects_its_own_resume_flags(flag, message, tiny_dataset, tmp_path):
    """run.slurm resumes from output_dir, also after a requeue: it refuses flags that would change that."""
    config = write_tiny_config(tiny_dataset, tmp_path / "tiny.yaml")
    done = subprocess.run(
        ["bash", str(REPO / "run.slurm"), "--lr", "1e-4", *flag],
        cwd=tmp_path,
        env=env_without_slurm({"config": str(config), "output_dir": str(tmp_path / "run")}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "run").exists()
