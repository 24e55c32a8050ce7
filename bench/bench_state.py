"""S2: per-rank memory of the per-sample loss state, replicated vs owner-sharded, and the cost of
the sharded exchange per step (TARGETS.md S2, ALGORITHMS.md 11).

For W in {1, 2, 4}, W gloo processes (one thread each) build the loss for ``--data_size``
indices in both layouts and report per rank: the bytes of its per-sample state buffers, its
resident memory (VmRSS) before and after building the loss, and for a local batch ``b`` of
random unit features [b, d]: the wall time of one step's state fetch (the sharded form's two
collectives, ``OwnerShards.fetch``; an index read when replicated) against the whole loss step
(forward, backward, state commit); and the peak memory of writing the state to checkpoint files,
of gathering it onto rank 0 instead, and of loading it back. Writes bench/results/state.{json,md}.

    python bench/bench_state.py [--data_size 10000000] [--batch 256] [--dim 512] [--loss isogclr]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, machine, machine_line, write_results
from models.losses import build_loss

LAYOUTS = ("replicated", "owner")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_growth_mb(fn) -> float:
    """The growth of peak resident memory (VmHWM, reset first) while ``fn`` runs, in MB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_mb()
    fn()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 - before
    return float("nan")


def checkpoint_memory(loss_fn, rank: int, world: int, folder: Path) -> dict[str, float]:
    """Peak memory growth of this rank while writing the loss state as a checkpoint does
    (``checkpoint_parts``: a shard file per rank when owner-sharded, rank 0 the whole state when
    replicated), while gathering the whole state onto rank 0 instead (``state_dict``, the former
    design; owner-sharded only), and while loading it back (``load_checkpoint_parts``)."""
    files = [folder / f"shard{r}-of-{world}.pt" for r in range(world)]
    kept = {}

    def save():
        state, shard = loss_fn.checkpoint_parts()
        kept["state"] = {k: v for k, v in state.items() if k not in loss_fn.sample_state}
        if shard is not None:
            torch.save(shard, files[rank])
        elif rank == 0:
            torch.save(state, files[0])

    out = {"save_peak_mb": peak_growth_mb(save)}
    dist.barrier()
    if loss_fn.shards is not None:
        out["gather_peak_mb"] = peak_growth_mb(loss_fn.state_dict)
        out["load_peak_mb"] = peak_growth_mb(
            lambda: loss_fn.load_checkpoint_parts(kept["state"], lambda r: torch.load(files[r]), world)
        )
    else:
        out["gather_peak_mb"] = float("nan")
        out["load_peak_mb"] = peak_growth_mb(lambda: loss_fn.load_state_dict(torch.load(files[0])))
    dist.barrier()
    if rank == 0:
        for f in files:
            f.unlink(missing_ok=True)
    return out


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    g = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
    for layout in LAYOUTS:
        gc.collect()
        before = rss_mb()
        loss_fn = build_loss(args.loss, data_size=args.data_size, embed_dim=args.dim)
        if layout == "owner":
            loss_fn.shard_state(rank, world)
        gc.collect()
        after = rss_mb()
        state_bytes = sum(
            getattr(loss_fn, n).numel() * getattr(loss_fn, n).element_size() for n in loss_fn.sample_state
        )
        idx = torch.randint(0, args.data_size, (args.batch,), generator=g)

        def fetch(loss_fn=loss_fn, idx=idx):
            loss_fn._fetch(idx, idx)

        def step(loss_fn=loss_fn, idx=idx):
            img, txt = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
            out = loss_fn.compute(img, txt, idx, idx)
            out.loss.backward()
            out.update.commit()

        step()  # warm-up
        results[layout] = {
            "state_mb": state_bytes / 2**20,
            "rss_growth_mb": after - before,
            "fetch_s": timed(fetch, args.repeats),
            "step_s": timed(step, args.repeats),
            **checkpoint_memory(loss_fn, rank, world, Path(out)),
        }
        del loss_fn
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_size", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch b")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--loss", default="isogclr")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    out = Path("output/bench_state")
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for world in args.worlds:
        mp.spawn(child, args=(world, free_port(), args, str(out)), nprocs=world, join=True)
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        rows[world] = {
            layout: {k: max(r[layout][k] for r in per_rank) for k in per_rank[0][layout]} for layout in LAYOUTS
        }
        print(world, rows[world], flush=True)
    m = machine()
    lines = [
        f"# S2: per-sample state per rank, replicated vs owner-sharded ({args.loss}, N = {args.data_size:,})",
        "",
        f"`python bench/bench_state.py --data_size {args.data_size} --batch {args.batch} --dim {args.dim}`; "
        f"{machine_line(m)}; W gloo processes of one thread each on this machine's cores. Per rank (the "
        "largest over ranks): the state buffers' size, the growth of resident memory when the loss is built, "
        f"and the median wall time of one step's state fetch and of the whole loss step at b = {args.batch}, "
        f"d = {args.dim}. Checkpoint columns: the growth of peak resident memory (VmHWM) while "
        "writing the loss state as the trainer does (owner: every rank its shard file; replicated: rank 0 "
        "the whole state), while gathering the whole state onto rank 0 instead (the former design), and "
        "while loading it back into the same layout.",
        "",
        "| W | layout | state per rank (MB) | RSS growth (MB) | fetch per step (ms) | loss step (ms) | fetch / step "
        "| save peak (MB) | gather-to-rank-0 peak (MB) | load peak (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world, by_layout in rows.items():
        for layout, r in by_layout.items():
            lines.append(
                f"| {world} | {layout} | {r['state_mb']:.1f} | {r['rss_growth_mb']:.1f} | {1e3 * r['fetch_s']:.2f} | "
                f"{1e3 * r['step_s']:.2f} | {r['fetch_s'] / r['step_s']:.3f} | {r['save_peak_mb']:.1f} | "
                f"{r['gather_peak_mb']:.1f} | {r['load_peak_mb']:.1f} |"
            )
    write_results("state", {"machine": m, "args": vars(args), "rows": rows}, lines)


if __name__ == "__main__":
    main()
