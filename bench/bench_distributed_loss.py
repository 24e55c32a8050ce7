"""P5: loss work per rank at world size W, global batch fixed (TARGETS.md P5).

For W in {1, 2, 4}, W gloo processes (one thread each) run the loss's forward and backward on
random unit features of a fixed global batch:

- ``local``: the library's form (models.losses): each rank computes only its own anchors
  against the gathered features, [B/W, B] similarity blocks;
- ``redundant``: every rank gathers the features and computes the whole B x B loss, as the
  original code does (the same GCL core applied to all B anchors).

Reported per rank: CPU seconds of the calling thread per step (the work, insensitive to
processes sharing cores) and wall seconds per step. The target is local work ~ 1/W of the
W = 1 work. Writes bench/results/distributed_loss.{json,md}.

    python bench/bench_distributed_loss.py [--batch 4096] [--dim 256] [--steps 5] [--loss isogclr]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallel
from common import free_port
from models.losses import _gcl_anchor_terms, build_loss

RESULTS = Path(__file__).resolve().parent / "results"


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


def redundant_gcl(image: torch.Tensor, text: torch.Tensor, tau: float, individual_tau: bool) -> torch.Tensor:
    """Every rank: gather everything, then all B anchors of both directions (the original layout)."""
    all_image, all_text = parallel.all_gather_with_grad(image), parallel.all_gather_with_grad(text)
    sim = all_image @ all_text.T
    n = sim.shape[0]
    pos = torch.arange(n)
    zeros, seen, taus = torch.zeros(n), torch.zeros(n, dtype=torch.bool), torch.full((n,), tau)
    loss = sim.new_zeros(())
    for rows in (sim, sim.T):
        anchors = _gcl_anchor_terms(rows, pos, taus, zeros, seen, 0.8)
        if individual_tau:
            anchors.tau_gradient(6.0)  # the isogclr temperature gradient, as the local form computes it
        loss = loss + anchors.terms.mean()
    # each rank holds the whole loss; divide by W so DDP's averaging is not distorted further
    return loss / parallel.world_size()


def measure(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    b = args.batch // world
    image = unit(args.batch, args.dim, 0)[rank * b : (rank + 1) * b].requires_grad_()
    text = unit(args.batch, args.dim, 1)[rank * b : (rank + 1) * b].requires_grad_()
    idx = torch.arange(rank * b, (rank + 1) * b)
    loss_fn = build_loss(args.loss, data_size=args.batch, temp=0.05, tau_init=0.05, rho_init=6.0)
    forms = {
        "local": lambda: loss_fn(image, text, idx, idx)[0],
        "redundant": lambda: redundant_gcl(image, text, 0.05, args.loss == "isogclr"),
    }
    result = {}
    for name, step in forms.items():
        cpu, wall = [], []
        for i in range(args.steps + 1):
            dist.barrier()
            c0, w0 = time.thread_time(), time.perf_counter()
            step().backward()
            c1, w1 = time.thread_time(), time.perf_counter()
            if i:  # the first step warms up allocations
                cpu.append(c1 - c0)
                wall.append(w1 - w0)
        result[name] = {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}
    with open(os.path.join(out, f"w{world}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096, help="global batch B")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss", default="isogclr", choices=["sogclr", "isogclr"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".distributed_loss_tmp"
    tmp.mkdir(exist_ok=True)
    rows = []
    for world in args.worlds:
        mp.spawn(measure, args=(world, free_port(), args, str(tmp)), nprocs=world, join=True)
        ranks = [json.loads((tmp / f"w{world}_rank{r}.json").read_text()) for r in range(world)]
        row = {"world_size": world}
        for form in ("local", "redundant"):
            row[f"{form}_cpu_s"] = max(r[form]["cpu_s"] for r in ranks)  # the slowest rank sets the pace
            row[f"{form}_wall_s"] = max(r[form]["wall_s"] for r in ranks)
        rows.append(row)
        for f in tmp.iterdir():
            f.unlink()
    tmp.rmdir()
    base = rows[0]["local_cpu_s"]
    for row in rows:
        row["local_work_vs_w1"] = row["local_cpu_s"] / base
        row["redundant_over_local"] = row["redundant_cpu_s"] / row["local_cpu_s"]

    header = (
        f"P5, {args.loss} loss forward+backward per rank, global batch {args.batch}, d={args.dim}, "
        f"CPU, 1 thread per rank, median of {args.steps} steps"
    )
    lines = [
        header,
        "",
        "| W | local: CPU s/step per rank | x of W=1 (ideal 1/W) | redundant: CPU s/step per rank | "
        "redundant / local | local wall s | redundant wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['local_cpu_s']:.3f} | {r['local_work_vs_w1']:.2f} (1/W = "
            f"{1 / r['world_size']:.2f}) | {r['redundant_cpu_s']:.3f} | {r['redundant_over_local']:.2f} | "
            f"{r['local_wall_s']:.3f} | {r['redundant_wall_s']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    (RESULTS / "distributed_loss.md").write_text(table + "\n")
    (RESULTS / "distributed_loss.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
