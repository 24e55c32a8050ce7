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
from collections.abc import Callable
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
    loss_name: str,
    hp: dict,
    steps: list[dict],
    rows: slice,
    sharded: bool = False,
    start: dict | Callable | None = None,
    after: Callable | None = None,
) -> list[dict]:
    """Feed ``rows`` of every step to one loss module (``sharded``: its per-sample state
    owner-sharded over the ranks; ``start``: a state_dict to begin from, or a function that
    loads the module; ``after``: a function given the module at the end); per step: loss,
    gradients, whole state."""
    torch.manual_seed(0)  # the same initial temperature networks on every rank and in the reference
    loss_fn = build_loss(loss_name, data_size=N, embed_dim=DIM, **hp)
    if sharded:
        loss_fn.shard_state(dist.get_rank(), dist.get_world_size())
    if callable(start):
        start(loss_fn)
    elif start is not None:
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
    if after is not None:
        after(loss_fn)
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


def _parts_main(rank: int, world: int, port: int, out_dir: str, steps: list[dict], resume: bool) -> None:
    """As ``_resume_main``, through the checkpoint's own path: every rank saves its
    ``checkpoint_parts`` shard to a file of its own (rank 0 the rest of the state); resuming,
    ``load_checkpoint_parts`` reads the saved shards one at a time."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = BATCH // world
        rows = slice(rank * local, (rank + 1) * local)
        out = Path(out_dir)
        for case, (name, hp) in CASES.items():
            if resume:
                state, saved_world = torch.load(out / f"parts-{case}.pt", weights_only=True)

                def load(loss_fn, state=state, saved_world=saved_world, case=case):
                    if saved_world is None:
                        loss_fn.load_state_dict(state)
                    else:
                        shard = lambda r: torch.load(out / f"parts-{case}-shard{r}.pt", weights_only=True)  # noqa: E731
                        loss_fn.load_checkpoint_parts(state, shard, saved_world)

                results = run_steps(name, hp, steps[2:], rows, sharded=True, start=load)
                torch.save(results, out / f"parts-{case}-W{world}-rank{rank}.pt")
            else:

                def save(loss_fn, case=case):
                    state, shard = loss_fn.checkpoint_parts()
                    if shard is not None:
                        assert state.keys().isdisjoint(loss_fn.sample_state), "the arrays stay in the shards"
                        torch.save(shard, out / f"parts-{case}-shard{rank}.pt")
                    if rank == 0:
                        torch.save((state, None if shard is None else world), out / f"parts-{case}.pt")

                run_steps(name, hp, steps[:2], rows, sharded=True, after=save)
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


def check_resumed(folder: Path, prefix: str, world: int, want: dict, what: str) -> None:
    """The resumed step of ``world`` ranks (files ``<prefix>-rank<r>.pt``) against one process's."""
    got = [torch.load(folder / f"{prefix}-rank{r}.pt")[0] for r in range(world)]
    mean_loss = torch.stack([g["loss"] for g in got]).mean()
    assert_matches(mean_loss, want["loss"], RTOL, f"{what}: mean loss", scale_floor=1.0)
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
        for world in (1, 3):
            check_resumed(tmp_path, f"{case}-W{world}", world, single[2], f"{case} resumed on {world} rank(s)")


def test_shard_files_resume_on_another_number_of_ranks(tmp_path):
    """TARGETS S3 through the checkpoint's format: shards saved by 2 ranks, each in its own
    file, loaded by 1 rank (whole arrays) and by 3 (their own shards), continue exactly as one
    process that never stopped."""
    steps = make_steps()
    spawn_ranks(2, tmp_path, steps, 180.0, _parts_main, False)
    shard = torch.load(tmp_path / "parts-isogclr-shard1.pt", weights_only=True)
    assert {k: len(v) for k, v in shard.items()} == {k: N // 2 for k in build_loss("isogclr", N).sample_state}
    for world in (1, 3):
        spawn_ranks(world, tmp_path, steps, 180.0, _parts_main, True)
    for case, (name, hp) in CASES.items():
        want = run_steps(name, hp, steps, slice(None))[2]
        for world in (1, 3):
            what = f"{case} resumed from shard files on {world} rank(s)"
            check_resumed(tmp_path, f"parts-{case}-W{world}", world, want, what)


def test_shard_files_load_in_chunks_into_any_layout(monkeypatch):
    """``load_checkpoint_parts`` in chunks of 3 positions: shards of 11 indices saved by 2 or 3
    ranks land at the right place whole (1 rank) and in every rank's shard of 2 and 4."""
    import models.losses

    monkeypatch.setattr(models.losses, "LOAD_CHUNK", 3)
    n = 11
    saved = build_loss("isogclr", n)
    whole = {
        name: (torch.arange(n) % 3 == 0) if buf.dtype == torch.bool else torch.arange(n, dtype=buf.dtype) + 0.5
        for name, buf in ((name, getattr(saved, name)) for name in saved.sample_state)
    }
    rest = {k: v for k, v in saved.state_dict().items() if k not in whole}
    for saved_world in (2, 3):
        files = {r: {k: v[r::saved_world].clone() for k, v in whole.items()} for r in range(saved_world)}
        for world in (1, 2, 4):
            for rank in range(world):
                loaded = build_loss("isogclr", n)
                loaded.shard_state(rank, world)
                loaded.load_checkpoint_parts(rest, files.__getitem__, saved_world)
                for name, values in whole.items():
                    want = values[rank::world]
                    got = getattr(loaded, name)[: len(want)]
                    assert torch.equal(got, want), f"{name}: saved by {saved_world}, rank {rank} of {world}"
