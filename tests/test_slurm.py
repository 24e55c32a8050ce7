"""run.slurm and eval.slurm under a real Slurm started on this machine, and under plain bash.

The Slurm tests submit the scripts as users do (sbatch options, environment variables and
clip.py flags after the script name) with a tiny run: 2 tasks on the node, so 2 gloo ranks
on the CPU, on the tiny synthetic dataset. They skip when Slurm cannot run here (see
slurm_harness.unavailable_reason); with SLURM_TESTS=required (set by tests/run.sh as root)
they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from slurm_harness import NODE, Job, LocalSlurm, env_without_slurm, unavailable_reason
from tiny_run import tiny_run_args

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
# the test node has no GPUs and 2 CPUs; the time limit (minutes) ends a hung job
NO_GPUS = ("--gres=none", "--cpus-per-task=1", "--time=10")
RUN_JOB = "test-run-slurm"


def write_tiny_config(data_root: Path, path: Path) -> Path:
    """The tiny run's settings as a YAML config; output folder, epochs and batch size are left to the scripts."""
    flags = tiny_run_args(data_root, "unused")
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


@pytest.fixture(scope="module")
def slurm_run(slurm, tiny_dataset, tmp_path_factory):
    """``sbatch run.slurm`` from the repository root: 2 tasks, 2 epochs; (job, config, output folder)."""
    folder = tmp_path_factory.mktemp("slurm_run")
    config = write_tiny_config(tiny_dataset, folder / "tiny.yaml")
    out = folder / "run"
    env = {"config": str(config), "ita_type": "isogclr", "epochs": "2", "batch_size": "16", "output_dir": str(out)}
    try:
        job = slurm.submit(
            REPO / "run.slurm",
            args=["--log_every", "1"],
            options=[f"--job-name={RUN_JOB}", "--ntasks-per-node=2", *NO_GPUS],
            env=env,
            cwd=REPO,
        )
        yield job, config, out
    finally:  # job_output/ belongs to the user (job ids restart at 1 in every test cluster)
        for log in (REPO / "job_output").glob(f"{RUN_JOB}-*.out"):
            log.unlink()


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
    assert (final["epoch"], final["step"]) == (2, 24)  # 396 readable samples // global batch 32 = 12 steps
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


def test_scripts_run_under_bash_without_slurm(tiny_dataset, tmp_path):
    """bash run.slurm / bash eval.slurm from another folder: one process, no Slurm anywhere."""
    config = write_tiny_config(tiny_dataset, tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    env = env_without_slurm({"config": str(config), "epochs": "1", "batch_size": "32", "output_dir": str(out)})

    def bash(script: str, **extra: str) -> str:
        done = subprocess.run(
            ["bash", str(REPO / script)],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    trained = bash("run.slurm")
    final = next(e for e in evals(out) if e["tag"] == "final")
    assert table_row(trained, "final synthetic_test") == pytest.approx(metrics(final), abs=0.006)
    evaluated = bash("eval.slurm", checkpoint=str(out / "checkpoint_latest.pth"))
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
