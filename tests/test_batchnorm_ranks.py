"""BatchNorm encoders evaluate identically on every rank (TARGETS R12).

Each rank's BatchNorm running statistics follow its own batches after DDP's last broadcast;
evaluation and checkpoints use rank 0's on every rank. A run with timm's tiny ResNet
(``test_resnet``, BatchNorm layers) on 2 gloo ranks logs its per-epoch evaluations, computed
across both ranks; one process evaluating the saved checkpoints must get exactly those metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.checkpoint import load_checkpoint
from tiny_run import tiny_run_args

CLIP = Path(__file__).resolve().parents[1] / "bimodal_exps" / "clip.py"
METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_rank_evaluation_equals_one_process_on_the_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    bn = {"image_encoder": "test_resnet", "image_encoder_kwargs": "{}", "eval_test_every_epoch": True}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, str(CLIP), *tiny_run_args(tiny_dataset, out, epochs=2, batch_size_train=8, **bn)])
    state = load_checkpoint(out / "checkpoint_1.pth")
    running_means = [v for k, v in state["model"].items() if k.endswith("running_mean")]
    assert running_means and any(v.abs().sum() > 0 for v in running_means), "the encoder should have BatchNorm"

    logged = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        args = tiny_run_args(tiny_dataset, out, evaluate=True, checkpoint=out / f"checkpoint_{epoch}.pth", **bn)
        run([sys.executable, str(CLIP), *args])
        evaluated = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-2:]
        for split in ("synthetic_val", "synthetic_test"):
            two_ranks = next(e for e in logged if e["tag"] == "epoch" and e["epoch"] == epoch and e["dataset"] == split)
            one = next(e for e in evaluated if e["dataset"] == split)
            assert [one[m] for m in METRICS] == [two_ranks[m] for m in METRICS], (epoch, split)
