"""Process-group helpers shared by the losses, the evaluator and the training loop.

Everything here degrades to the identity in a single process, so library code can
call it unconditionally.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def describe() -> str:
    """The process group in words, for the log: "1 process" or "4 ranks (nccl)"."""
    return f"{world_size()} ranks ({dist.get_backend()})" if is_distributed() else "1 process"


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm on rank 0 only; redrawn once a minute when the output is a file (a Slurm log)."""
    return tqdm(
        iterable,
        disable=not is_main_process(),
        mininterval=1 if sys.stderr.isatty() else 60,
        dynamic_ncols=True,
        **kwargs,
    )


class _AllGatherSumGrad(torch.autograd.Function):
    """Concatenate ``x`` [b, ...] from every rank along dim 0 -> [W*b, ...].

    Backward sums the incoming gradient over ranks and returns this rank's slice (one
    reduce-scatter), so the gradient that reaches ``x`` is d(sum over ranks of their losses)/dx.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        mine = grad.new_empty((ctx.batch, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, grad.contiguous(), op=dist.ReduceOp.SUM)
        return mine


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [W*b, ...] in rank order; gradients summed across ranks.

    Every rank must pass the same ``b``.
    """
    if world_size() == 1:
        return x
    return _AllGatherSumGrad.apply(x)


@torch.no_grad()
def all_gather_equal(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on every rank (the same ``b``) -> [W*b, ...] in rank order, no gradient.

    One fixed-size collective: no size negotiation, nothing read on the host.
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """[b_r, ...] on rank r -> [sum_r b_r, ...] in rank order, no gradient.

    Ranks may hold different ``b_r`` (padding is handled here).
    """
    if world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


@torch.no_grad()
def gather_to_main(x: torch.Tensor) -> list[torch.Tensor] | None:
    """``x`` of every rank (the same shape everywhere), in rank order, on rank 0; None on the
    others (one collective; only rank 0 ever holds the W parts)."""
    if world_size() == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(world_size())] if is_main_process() else None
    dist.gather(x.contiguous(), parts, dst=0)
    return parts


@torch.no_grad()
def _all_reduce(x: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    x = x.clone()
    if world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``x`` over ranks (one all-reduce; a new tensor)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


@torch.no_grad()
def sum_scatter(x: torch.Tensor) -> torch.Tensor:
    """[W*b, ...] on every rank -> [b, ...]: rank r's rows ``r*b:(r+1)*b`` of the sum of ``x``
    over ranks (one reduce-scatter: each rank receives its own rows only, half an all-reduce)."""
    if world_size() == 1:
        return x.clone()
    mine = x.new_empty((x.shape[0] // world_size(), *x.shape[1:]))
    dist.reduce_scatter_tensor(mine, x.contiguous(), op=dist.ReduceOp.SUM)
    return mine


def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``x`` over ranks (one all-reduce; a new tensor)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], bucket_elements: int = 2**24) -> None:
    """Average ``p.grad`` over ranks in place, as DDP does: all-reduces of flat buckets of at
    most ``bucket_elements`` values per dtype. Every rank must hold the same parameters with
    gradients; those without one are skipped."""
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        buckets, size = [[]], 0
        for grad in grads:
            if size + grad.numel() > bucket_elements and buckets[-1]:
                buckets.append([])
                size = 0
            buckets[-1].append(grad)
            size += grad.numel()
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world_size()
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))


def mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device | str = "cpu") -> dict[str, float]:
    """Means over ranks of scalars (floats or 0-dim tensors): one all-reduce, one device sync."""
    if not values:
        return {}
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    if world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


def gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (a collective call; picklable objects)."""
    if world_size() == 1:
        return [obj]
    parts = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (a collective call)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """For each flag, whether it holds on at least one rank (one all-reduce for all of them).

    The training loop uses it so that all ranks stop an epoch, or the run, at the same step.
    """
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def _slurm_master_addr() -> str:
    """First host of the job's node list (what `scontrol show hostnames` prints first)."""
    import subprocess

    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def detect_launch() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) set by torchrun or by an `srun` step; None for a plain process.

    For srun, MASTER_ADDR / MASTER_PORT are taken from the environment or derived from the
    job's first node and job id, so every task of the job agrees on the rendezvous.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or a manual launch)
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env  # inside srun, not the batch script
    if in_step and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return None


def init_distributed(requested: bool | None, device: str) -> torch.device:
    """Join the process group when launched by torchrun / srun (or when ``requested``).

    Returns this process's device: ``cuda:<local_rank>`` on CUDA, else the CPU. NCCL is used
    on CUDA, gloo on the CPU. ``requested=False`` forces a single process.
    """
    launch = detect_launch() if requested is not False else None
    if requested and launch is None:
        raise RuntimeError(
            "--distributed was given but no launcher was detected: start with torchrun "
            "(RANK/WORLD_SIZE) or srun with several tasks"
        )
    if launch is None:
        return torch.device(device)
    rank_, local_rank, world = launch
    if device.startswith("cuda"):
        # a task sees all the node's GPUs (--gres) or only its own (--gpus-per-task=1)
        dev, backend = torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"
        torch.cuda.set_device(dev)
    else:
        dev, backend = torch.device("cpu"), "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend, rank=rank_, world_size=world, init_method="env://")
    return dev


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()
