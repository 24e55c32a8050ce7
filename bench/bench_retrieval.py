"""P2 (TARGETS.md): retrieval metrics at MSCOCO 5k test size against one score product, and
against a per-query argsort loop.

All start from the same embeddings (5,000 images x 25,010 captions, d=256). The floor is one
``image_emb @ text_emb.T``, which every method has to compute (target: the metrics within 1.3x of
it on a CPU). The loop is written the way the original code base computes recall: the score
matrix, then one argsort per query in a Python loop (numpy) and the position of the positives in
the sorted order (target on a GPU: at least 50x faster). The metrics must be identical.

    python bench/bench_retrieval.py            # full size, writes bench/results/retrieval.{json,md}
    python bench/bench_retrieval.py --quick    # 1,000 x 5,002, prints only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
from evaluation.retrieval import recall_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

RESULTS = Path(__file__).resolve().parent / "results"


def make_embeddings(
    n_images: int, dim: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit image embeddings [Ni, d], captions as noisy copies of their image [Nt, d], txt2img [Nt].

    Five captions per image, except 6 images with 6 and 2 with 7 (MSCOCO: 5,000 -> 25,010).
    The noise puts recall in the middle of its range, so that the metric comparison means something.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = torch.full((n_images,), 5)
    counts[torch.randperm(n_images, generator=gen)[:8]] = torch.tensor([6] * 6 + [7] * 2)
    txt2img = torch.repeat_interleave(torch.arange(n_images), counts)
    image_emb = F.normalize(torch.randn(n_images, dim, generator=gen), dim=1)
    noise_vectors = noise * torch.randn(len(txt2img), dim, generator=gen) / dim**0.5
    text_emb = F.normalize(image_emb[txt2img] + noise_vectors, dim=1)
    return image_emb, text_emb, txt2img


def baseline_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor) -> dict[str, float]:
    """The original code's style: score matrix to numpy, then one argsort per query in Python."""
    img2txt: list[list[int]] = [[] for _ in range(len(image_emb))]
    for t, i in enumerate(txt2img.tolist()):
        img2txt[i].append(t)
    scores_i2t = (image_emb @ text_emb.T).cpu().numpy()
    scores_t2i = scores_i2t.T

    txt_rank = np.zeros(len(scores_i2t))
    for i, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        txt_rank[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    img_rank = np.zeros(len(scores_t2i))
    target = txt2img.tolist()
    for t, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        img_rank[t] = np.where(order == target[t])[0][0]

    metrics = {}
    for prefix, rank in (("txt", txt_rank), ("img", img_rank)):
        for k in (1, 5, 10):
            metrics[f"{prefix}_r{k}"] = 100.0 * int((rank < k).sum()) / len(rank)
        metrics[f"{prefix}_r_mean"] = sum(metrics[f"{prefix}_r{k}"] for k in (1, 5, 10)) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Fastest of ``repeats`` runs in seconds (the machine is shared), and the last result."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 images x 5,002 captions; print only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block", type=int, nargs=2, help="images x captions per score block (default: the code's)")
    parser.add_argument("--repeats", type=int, default=9, help="paired runs of recall_metrics and the product")
    parser.add_argument("--noise", type=float, default=5.0, help="norm of the caption noise (images have norm 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    n_images = 1000 if args.quick else 5000
    image_emb, text_emb, txt2img = make_embeddings(n_images, args.dim, args.noise, args.seed)
    image_emb, text_emb, txt2img = image_emb.to(device), text_emb.to(device), txt2img.to(device)

    def recall():
        return recall_metrics(image_emb, text_emb, txt2img, block_size=args.block and tuple(args.block))

    fast = recall()
    base_s, base = best_time(lambda: baseline_recall(image_emb, text_emb, txt2img), max(1, args.repeats // 3), device)
    # The one score product every method needs: paired with recall_metrics, repeat by repeat,
    # since the machine's speed drifts; the median of the per-repeat ratios is the figure.
    ratios, fast_times, product_times = [], [], []
    for _ in range(args.repeats):
        product_times.append(best_time(lambda: image_emb @ text_emb.T, 1, device)[0])
        fast_times.append(best_time(recall, 1, device)[0])
        ratios.append(fast_times[-1] / product_times[-1])
    fast_s, product_s = statistics.median(fast_times), statistics.median(product_times)
    identical = fast == base
    result = {
        "images": n_images,
        "captions": len(txt2img),
        "dim": args.dim,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu": machine()["cpu"],
        "block": args.block,
        "repeats": args.repeats,
        "baseline_s": round(base_s, 4),
        "vectorised_s": round(fast_s, 4),
        "score_product_s": round(product_s, 4),
        "speedup": round(base_s / fast_s, 1),
        "vs_score_product": round(statistics.median(ratios), 2),
        "vs_score_product_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "metrics_identical": identical,
        "metrics": fast,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

    print(f"retrieval metrics, {n_images} images x {len(txt2img)} captions, d={args.dim}, {result['device']}")
    print(f"{'method':<28} {'seconds':>9}")
    print(f"{'per-query argsort (numpy)':<28} {base_s:>9.3f}")
    print(f"{'vectorised recall_metrics':<28} {fast_s:>9.3f}")
    print(f"{'score product alone':<28} {product_s:>9.3f}")
    print(
        f"speed-up {base_s / fast_s:.1f}x, {result['vs_score_product']:.2f}x one score product "
        f"{result['vs_score_product_range']}, metrics identical: {identical}"
    )
    print("  ".join(f"{k}={v:.2f}" for k, v in fast.items()))
    if not identical:
        print("baseline metrics:", base)
    if not args.quick:
        write_results(result, device.type)


def write_results(result: dict, device_type: str) -> None:
    """Merge this run into results/retrieval.json (one entry per device type) and rewrite the .md table."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "retrieval.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[device_type] = result
    path.write_text(json.dumps(runs, indent=2) + "\n")
    lines = [
        "# P2: retrieval metrics, MSCOCO 5k test size (`bench/bench_retrieval.py`)",
        "",
        "| device | images x captions | d | one score product (s) | recall_metrics (s) | x score product "
        "| argsort loop (s) | speed-up over the loop | same metrics |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        device = f"{r['cpu']} ({r['cpu_threads']} threads)" if r["device"] == "cpu" else r["device"]
        lines.append(
            f"| {device} | {r['images']} x {r['captions']} | {r['dim']} | {r['score_product_s']:.3f} | "
            f"{r['vectorised_s']:.3f} | {r['vs_score_product']:.2f}x [{r['vs_score_product_range'][0]:.2f}-"
            f"{r['vs_score_product_range'][1]:.2f}] | {r['baseline_s']:.3f} | {r['speedup']}x | "
            f"{r['metrics_identical']} |"
        )
    lines += [
        "",
        "Median times; x score product is the median [min-max] of the per-repeat ratio (the two alternate).",
        "The loop's time is the fastest of its runs. Targets: at most 1.3x one score product on a CPU; at least",
        "50x faster than the loop on a GPU (on a CPU the loop costs only a few score products, so no method",
        "can be 50x faster there).",
    ]
    (RESULTS / "retrieval.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
