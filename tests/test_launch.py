"""Launcher detection: torchrun, srun steps, plain processes (parallel.detect_launch)."""

from __future__ import annotations

import os

import pytest

import parallel

LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_plain_process(clean_env):
    assert parallel.detect_launch() is None


def test_torchrun(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "8")
    assert parallel.detect_launch() == (5, 1, 8)


def test_srun_step(clean_env):
    for name, value in {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "localhost",
    }.items():
        clean_env.setenv(name, value)
    assert parallel.detect_launch() == (3, 1, 4)
    assert os.environ["MASTER_PORT"] == str(10000 + 123456 % 20000)
    assert os.environ["MASTER_ADDR"]


def test_srun_keeps_given_rendezvous(clean_env):
    for name, value in {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "1",
        "SLURM_JOB_ID": "7",
        "MASTER_ADDR": "node17",
        "MASTER_PORT": "4242",
    }.items():
        clean_env.setenv(name, value)
    assert parallel.detect_launch() == (0, 0, 2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("node17", "4242")


def test_sbatch_script_itself_is_not_a_rank(clean_env):
    """The batch script sees SLURM_NTASKS of the whole allocation but is one process, not a step."""
    for name, value in {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}.items():
        clean_env.setenv(name, value)
    assert parallel.detect_launch() is None


def test_single_task_step_is_a_plain_process(clean_env):
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}.items():
        clean_env.setenv(name, value)
    assert parallel.detect_launch() is None


def test_forced_distributed_without_launcher(clean_env):
    with pytest.raises(RuntimeError, match="no launcher was detected"):
        parallel.init_distributed(True, "cpu")


def test_no_distributed_overrides_detection(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    assert str(parallel.init_distributed(False, "cpu")) == "cpu"
    assert not parallel.is_distributed()
