"""Training steps on W gloo ranks equal one process on the global batch (ALGORITHMS.md 7, TARGETS R8).

Each child process first computes the single-process reference (before it joins the process
group), then runs the same steps with DistributedDataParallel on its slice of every global
batch, through the real training loop (engine.trainer.Trainer). Plain SGD with lr 1
makes each step's parameter change equal to minus the gradient, so comparing the changes
compares the parameter gradients; the loss state and the logged loss are compared too.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.losses import build_loss
from tiny_training import GLOBAL_BATCH, ListData, global_batches, make_trainer, tiny_model

DATA_SIZE = 30
LOSS_SETUPS = {
    "clip": {"temp": 0.05},
    "clip_learnable": {"temp": 0.05, "learnable_temp": True},
    "sogclr": {"temp": 0.05},
    "isogclr": {"tau_init": 0.03, "eta_init": 0.5, "rho_I": 2.0, "rho_T": 2.5},
}


def run_steps(model, loss_fn, batches, tmp_dir) -> tuple[list[dict], list[float]]:
    """One Trainer.train_epoch per batch; returns each step's parameter changes and logged loss.

    The Trainer wraps the model in DistributedDataParallel when a process group is up.
    """
    trainer = make_trainer(
        model, loss_fn, torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=1.0), tmp_dir
    )
    deltas, losses = [], []
    for batch in batches:
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        before.update({f"loss.{k}": v.detach().clone() for k, v in loss_fn.named_parameters()})
        assert trainer.train_epoch(ListData([batch]))
        after = dict(model.named_parameters()) | {f"loss.{k}": v for k, v in loss_fn.named_parameters()}
        deltas.append({k: (after[k].detach() - before[k]) for k in before})
        losses.append(trainer.last_log["loss"])
    return deltas, losses


def slice_batch(batch: dict, rank: int, world: int) -> dict:
    b = GLOBAL_BATCH // world
    return {k: v[rank * b : (rank + 1) * b] for k, v in batch.items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def child(rank: int, world: int, port: int, tmp_dir: str) -> None:
    """Single-process references for every set-up first (no process group yet), then the ranks."""
    torch.set_num_threads(1)
    problems = []
    try:
        runs = {}
        for setup, hp in LOSS_SETUPS.items():
            model, loss_fn = tiny_model(), build_loss(setup.split("_")[0], DATA_SIZE, **hp)
            fresh = copy.deepcopy(model), copy.deepcopy(loss_fn)  # before the reference steps change them
            runs[setup] = (*fresh, run_steps(model, loss_fn, global_batches(), tmp_dir), loss_fn)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for setup, (model, loss_fn, (want_deltas, want_losses), ref_loss) in runs.items():
            batches = [slice_batch(b, rank, world) for b in global_batches()]
            deltas, losses = run_steps(model, loss_fn, batches, tmp_dir)
            for step, (got, want) in enumerate(zip(deltas, want_deltas, strict=True)):
                problems += [f"{setup} step {step}: gradient of {k}" for k in want if not close(got[k], want[k])]
            problems += [
                f"{setup}: loss {g} != {w}"
                for g, w in zip(losses, want_losses, strict=True)
                if abs(g - w) > 1e-5 * max(1.0, abs(w))
            ]
            got_state, want_state = loss_fn.state_dict(), ref_loss.state_dict()
            problems += [
                f"{setup}: loss state {k}"
                for k in want_state
                if not close(got_state[k].double(), want_state[k].double())
            ]
    except Exception:
        problems.append(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # a process leaving gloo's threads running aborts at exit
    with open(os.path.join(tmp_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"problems": problems}, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_single_process(tmp_path, world):
    """Every loss set-up, 3 steps: parameter gradients, loss values and loss state."""
    mp.spawn(child, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        problems = json.loads((tmp_path / f"rank{rank}.json").read_text())["problems"]
        assert not problems, f"rank {rank}: {problems}"
