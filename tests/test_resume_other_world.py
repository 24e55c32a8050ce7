"""Owner-sharded loss state in checkpoints (ALGORITHMS.md 11, TARGETS S3): with
``--state_sharding owner`` every rank writes its shard of the per-sample arrays to a file of its
own beside the checkpoint, which names them; a run resumed on another number of ranks (1: the
whole arrays; 3: its own shards) reads them one at a time and continues as the run that never
stopped, mid-epoch too.

The caption-JSON source gives every number of ranks the same global batches (see
test_torchrun.py), so a resumed run must log the losses and mean temperatures of the
uninterrupted 2-rank run's remaining steps, to float rounding. The epoch's temperature
snapshot is written the same way: each rank its own indices, read back whole.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.temperatures import read_temperatures
from tiny_run import tiny_run_args

CLIP = Path(__file__).resolve().parents[1] / "bimodal_exps" / "clip.py"
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks
COMMON = {
    "train_data": None,
    "train_file": "synthetic_train.json",
    "train_image_root": "images",
    "log_every": 1,
    "epochs": 2,
    "state_sharding": "owner",
}


def run(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    done = subprocess.run([*launcher, str(CLIP), *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def steps_after(out: Path, step: int) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["step"] > step]


def test_sharded_checkpoint_resumes_mid_epoch_on_one_and_three_ranks(tiny_dataset, tmp_path):
    """The 2-rank run saves every 10 steps (33 per epoch); resumed from step 50 (17 steps into
    epoch 1) on 1 and on 3 ranks, the rest of the run logs what the 2-rank run logged."""
    two = tmp_path / "two"
    run(2, tiny_run_args(tiny_dataset, two, **COMMON, batch_size_train=GLOBAL_BATCH // 2, save_every_steps=10))

    state = load_checkpoint(two / "checkpoint_step50.pth")
    assert (state["progress"]["epoch"], state["progress"]["epoch_step"]) == (1, 17)
    files = ["checkpoint_step50.state-0-of-2.pth", "checkpoint_step50.state-1-of-2.pth"]
    assert state["loss_shards"] == {"world": 2, "files": files}
    assert "tau_I" not in state["loss"]  # no rank gathered the arrays
    shards = [load_checkpoint(two / name) for name in files]
    assert [s["step"] for s in shards] == [50, 50]
    assert {k: len(v) for k, v in shards[1]["arrays"].items()} == {
        f"{k}_{side}": 200 for k in ("tau", "log_u", "m", "seen") for side in "IT"
    }  # data_size 400 over 2 ranks
    kept = sorted(p.name for p in two.glob("checkpoint_step*.state-*"))  # the pruned steps took theirs along
    assert kept == [*files, *(n.replace("step50", "step60") for n in files)]
    assert sorted(p.name for p in two.glob("checkpoint_1.state-*")) == [n.replace("_step50", "_1") for n in files]

    # the temperature snapshots: each rank wrote the indices it owns, nobody gathered them
    assert sorted(p.name for p in (two / "temperatures").iterdir()) == [
        f"epoch_{e}{suffix}" for e in (0, 1) for suffix in (".part-0-of-2.npz", ".part-1-of-2.npz", ".png")
    ]
    for r in (0, 1):
        with np.load(two / "temperatures" / f"epoch_1.part-{r}-of-2.npz") as part:
            assert len(part["image_index"]) > 150 and (part["image_index"] % 2 == r).all()
    snapshot = read_temperatures(two / "temperatures", 1)
    assert (np.diff(snapshot["text"][0]) > 0).all() and len(snapshot["text"][0]) > 300

    want = steps_after(two, 50)
    for nproc in (1, 3):
        out = tmp_path / f"resumed-on-{nproc}"
        out.mkdir()
        for name in ("checkpoint_step50.pth", *files):
            shutil.copy(two / name, out / name)
        shutil.copytree(two / "temperatures", out / "temperatures")  # epoch 1's is replaced, in its form
        args = tiny_run_args(tiny_dataset, out, **COMMON, batch_size_train=GLOBAL_BATCH // nproc)
        done = run(nproc, [*args, "--resume", str(out / "checkpoint_step50.pth")])
        assert "epoch 1 continues after its 17 finished steps with the same global batches" in done.stdout + done.stderr
        got = steps_after(out, 0)
        assert [s["step"] for s in got] == [s["step"] for s in want]
        assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], rel=2e-2)
        assert [s["tau_I"] for s in got] == pytest.approx([s["tau_I"] for s in want], rel=1e-4)
        assert [s["tau_T"] for s in got] == pytest.approx([s["tau_T"] for s in want], rel=1e-4)
        left = sorted(p.name for p in (out / "temperatures").glob("epoch_1.*npz"))
        assert left == (["epoch_1.npz"] if nproc == 1 else [f"epoch_1.part-{r}-of-3.npz" for r in range(3)])
        for side, (idx, tau) in read_temperatures(out / "temperatures", 1).items():
            np.testing.assert_array_equal(idx, snapshot[side][0])
            np.testing.assert_allclose(tau, snapshot[side][1], rtol=1e-3)
        final = load_checkpoint(out / "checkpoint_1.pth")
        if nproc == 1:  # one process holds whole arrays and writes them into the checkpoint
            assert "loss_shards" not in final and final["loss"]["tau_I"].shape == (400,)
        else:
            assert final["loss_shards"]["world"] == 3
            assert len(load_checkpoint(out / final["loss_shards"]["files"][2])["arrays"]["tau_I"]) == 134


def test_a_missing_shard_file_is_named_on_every_rank(tiny_dataset, tmp_path):
    """A checkpoint whose shard file is not beside it (copied alone, node-local storage) is
    refused before training, naming the file."""
    out = tmp_path / "run"
    run(2, tiny_run_args(tiny_dataset, out, **{**COMMON, "epochs": 1}, batch_size_train=GLOBAL_BATCH // 2))
    (out / "checkpoint_0.state-1-of-2.pth").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_run_args(tiny_dataset, out, **COMMON, batch_size_train=GLOBAL_BATCH)
    done = subprocess.run(
        [sys.executable, str(CLIP), *args, "--resume", str(out / "checkpoint_0.pth")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode != 0
    assert "checkpoint_0.state-1-of-2.pth are missing beside it" in done.stderr
    assert "Traceback" not in done.stderr
    assert torch.load(out / "checkpoint_0.pth", weights_only=False)["progress"]["epoch"] == 1  # nothing lost
