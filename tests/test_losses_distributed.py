"""Distributed contract of models.losses (ALGORITHMS.md section 7) with 2 and 3 real gloo processes.

Each rank feeds its consecutive slice of a global batch for three steps; the same test process
runs the loss single-process on the whole batch, and the two must agree: mean over ranks of the
returned losses, feature gradients (W times the single-process rows, which DDP's averaging undoes),
loss-parameter gradients (mean over ranks) and every rank's full state after every step.
"""

from __future__ import annotations

import itertools
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loss_reference import assert_matches
from models.losses import OwnerShards, build_loss

N = 20
BATCH = 12  # divisible by 2 and 3
DIM = 8
RTOL = 1e-5
HP = {
    "temp": 0.01,
    "learnable_temp": False,
    "sogclr_gamma": 0.8,
    "gamma_schedule": "constant",
    "gamma_decay_epochs": 2,
    "tau_init": 0.05,
    "tau_min": 0.005,
    "tau_max": 1.0,
    "rho_I": 5.0,
    "rho_T": 7.0,
    "eta_init": 0.5,
    "eta_sched": "exp",
    "eta_min": 1e-4,
    "eta_exp_base": 0.8,
    "beta_u": 0.9,
    "epochs": 3,
    "tempnet_hidden": 6,
    "lr_tau": 0.02,
    "rho": 6.5,
}
LAYOUTS = ("replicated", "owner")  # of the per-sample state (ALGORITHMS.md 11)
CASES = {
    "clip": ("clip", {**HP, "temp": 0.05}),
    "clip-learnable": ("clip", {**HP, "temp": 0.02, "learnable_temp": True}),
    "sogclr": ("sogclr", {**HP, "temp": 0.03, "gamma_schedule": "cosine", "sogclr_gamma": 0.2}),
    "isogclr": ("isogclr", HP),
    "isogclr_tempnet": ("isogclr_tempnet", {**HP, "gamma_schedule": "cosine"}),
    "fastclip_v0": ("fastclip_v0", {**HP, "temp": 0.03, "gamma_schedule": "cosine", "sogclr_gamma": 0.3}),
    "fastclip_v2": ("fastclip_v2", {**HP, "tau_min": 0.01, "gamma_schedule": "cosine", "sogclr_gamma": 0.3}),
    "fastclip_v3": ("fastclip_v3", {**HP, "temp": 0.02, "gamma_schedule": "cosine", "sogclr_gamma": 0.3}),
    "siglip": ("siglip", HP),
    "cyclip": ("cyclip", {**HP, "temp": 0.02}),
    "vicreg": ("vicreg", HP),
}
# Global batch order; with W = 2 rank 0 holds positions 0-5, with W = 3 positions 0-3. Index 5 (image)
# and 1 (text) repeat across ranks, first-seen in step 0 and already seen in step 1.
IMAGE_IDX = [
    [0, 5, 1, 2, 3, 4, 6, 7, 8, 5, 9, 10],
    [5, 11, 12, 0, 13, 14, 0, 15, 16, 17, 5, 18],
    [19, 3, 3, 4, 7, 8, 9, 10, 19, 2, 1, 0],
]
TEXT_IDX = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    [12, 13, 1, 14, 15, 16, 1, 17, 18, 19, 1, 2],
    [0, 19, 3, 5, 7, 9, 11, 13, 15, 17, 19, 0],
]


def make_steps() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    steps = []
    for epoch, (image_idx, text_idx) in enumerate(zip(IMAGE_IDX, TEXT_IDX, strict=True)):
        image = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=gen), dim=1)
        text = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=gen), dim=1)
        steps.append(
            {
                "image": image,
                "text": text,
                "image_idx": torch.tensor(image_idx),
                "text_idx": torch.tensor(text_idx),
                "epoch": epoch,
            }
        )
    return steps


def run_steps(
    loss_name: str, hp: dict, steps: list[dict], rows: slice, sharded: bool = False, start: dict | None = None
) -> list[dict]:
    """Feed ``rows`` of every step to one loss module (``sharded``: its per-sample state
    owner-sharded over the ranks; ``start``: a state_dict to begin from); per step: loss,
    gradients, whole state."""
    torch.manual_seed(0)  # the same initial temperature networks on every rank and in the reference
    loss_fn = build_loss(loss_name, data_size=N, embed_dim=DIM, **hp)
    if sharded:
        loss_fn.shard_state(dist.get_rank(), dist.get_world_size())
    if start is not None:
        loss_fn.load_state_dict(start)
    results = []
    for step in steps:
        loss_fn.set_epoch(step["epoch"])
        image = step["image"][rows].clone().requires_grad_(True)
        text = step["text"][rows].clone().requires_grad_(True)
        loss, _ = loss_fn(image, text, step["image_idx"][rows], step["text_idx"][rows])
        loss.backward()
        results.append(
            {
                "loss": loss.detach(),
                "grad_image": image.grad,
                "grad_text": text.grad,
                "param_grads": {k: p.grad.clone() for k, p in loss_fn.named_parameters()},
                "state": {k: v.detach().clone() for k, v in loss_fn.state_dict().items()},
                "shards": {k: getattr(loss_fn, k).detach().clone() for k in loss_fn.sample_state} if sharded else {},
            }
        )
        loss_fn.zero_grad()
    return results


def _rank_main(rank: int, world: int, port: int, out_dir: str, steps: list[dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        local = BATCH // world
        rows = slice(rank * local, (rank + 1) * local)
        results = {
            (case, layout): run_steps(name, hp, steps, rows, sharded=layout == "owner")
            for case, (name, hp) in CASES.items()
            for layout in LAYOUTS
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _resume_main(rank: int, world: int, port: int, out_dir: str, steps: list[dict], resume: bool) -> None:
    """Two steps with sharded state, saving the whole state (rank 0); or, ``resume``: load it
    and take the last step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = BATCH // world
        rows = slice(rank * local, (rank + 1) * local)
        saved = Path(out_dir) / "state.pt"
        for case, (name, hp) in CASES.items():
            if resume:
                start = torch.load(saved, weights_only=True)[case]
                results = run_steps(name, hp, steps[2:], rows, sharded=True, start=start)
                torch.save(results, Path(out_dir) / f"{case}-W{world}-rank{rank}.pt")
            else:
                state = run_steps(name, hp, steps[:2], rows, sharded=True)[-1]["state"]
                if rank == 0:
                    whole = torch.load(saved, weights_only=True) if saved.exists() else {}
                    torch.save({**whole, case: state}, saved)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, out_dir: Path, steps: list[dict], timeout_s: float = 180.0, main=None, *extra) -> None:
    """Run ``main`` (default ``_rank_main``) on ``world`` processes; a child's exception (with
    its traceback) or a hang fails the test."""
    context = mp.start_processes(
        main or _rank_main,
        args=(world, free_port(), str(out_dir), steps, *extra),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout_s:.0f} s (collective mismatch?)")


def check_state(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: state keys {sorted(got)} != {sorted(want)}"
    for key, value in want.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), f"{what}: {key} differs"
            continue
        seen = want.get(f"seen_{key[-1]}")
        if key.startswith("log_u") and seen is not None:  # log u of unseen samples is meaningless
            assert_matches(got[key][seen], value[seen], RTOL, f"{what} {key}", scale_floor=1.0)
        else:
            assert_matches(got[key], value, RTOL, f"{what} {key}", scale_floor=1.0)


def check_rank_state(got: dict, want: dict, rank: int, world: int, what: str) -> None:
    """A rank's state after a step against one process's: whole, or, owner-sharded on a rank
    other than 0 (whose state_dict leaves the per-sample arrays out), the rest of the state and
    the rank's own shard of every per-sample array."""
    if not got["shards"] or rank == 0:
        check_state(got["state"], want, what)
        return
    names = set(got["shards"])
    check_state(got["state"], {k: v for k, v in want.items() if k not in names}, what)
    owner = OwnerShards(N, rank, world)  # the scratch slot, owner.slots, takes others' writes
    check_state(
        {k: v[: owner.slots] for k, v in got["shards"].items()},
        {k: owner.shard(want[k])[: owner.slots] for k in names},
        f"{what} own shard",
    )


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_single_process(world, tmp_path):
    steps = make_steps()
    spawn_ranks(world, tmp_path, steps)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for (case, (name, hp)), layout in itertools.product(CASES.items(), LAYOUTS):
        single = run_steps(name, hp, steps, slice(None))
        for step, want in enumerate(single):
            what = f"{case} W={world} {layout} state step {step}"
            got = [ranks[case, layout][step] for ranks in per_rank]
            mean_loss = torch.stack([g["loss"] for g in got]).mean()
            assert_matches(mean_loss, want["loss"], RTOL, f"{what} mean loss over ranks", scale_floor=1.0)
            for key in ("grad_image", "grad_text"):
                # Rank r's rows receive W times the single-process gradient; DDP divides by W.
                gathered = torch.cat([g[key] for g in got])
                assert_matches(gathered, world * want[key], RTOL, f"{what} {key} (x W)")
            for param, grad in want["param_grads"].items():
                mean_grad = torch.stack([g["param_grads"][param] for g in got]).mean(0)
                assert_matches(mean_grad, grad, RTOL, f"{what} mean d loss/d {param} over ranks")
            for r, g in enumerate(got):
                check_rank_state(g, want["state"], r, world, f"{what} rank {r}")


def test_state_resumes_on_another_number_of_ranks(tmp_path):
    """TARGETS S3: the whole state saved by 2 ranks with owner-sharded state, loaded by 1 and by 3
    ranks (their own shards), continues exactly as one process that never stopped."""
    steps = make_steps()
    spawn_ranks(2, tmp_path, steps, 180.0, _resume_main, False)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    for world in (1, 3):
        spawn_ranks(world, tmp_path, steps, 180.0, _resume_main, True)
    for case, (name, hp) in CASES.items():
        single = run_steps(name, hp, steps, slice(None))
        if single[1]["state"]:
            check_state(saved[case], single[1]["state"], f"{case} saved by 2 ranks")
        want = single[2]
        for world in (1, 3):
            got = [torch.load(tmp_path / f"{case}-W{world}-rank{r}.pt")[0] for r in range(world)]
            what = f"{case} resumed on {world} rank(s)"
            mean_loss = torch.stack([g["loss"] for g in got]).mean()
            assert_matches(mean_loss, want["loss"], RTOL, f"{what}: mean loss", scale_floor=1.0)
            for r, g in enumerate(got):
                check_rank_state(g, want["state"], r, world, f"{what} rank {r}")
