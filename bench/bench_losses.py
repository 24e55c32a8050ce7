"""Q2-Q4 (spec/TARGETS.md): every loss on the built-in synthetic benchmark, under one trainer.

The protocol, fixed before any run and the same for every loss:

- the default run's config (``bimodal_exps/configs/synthetic.yaml``: optimiser, learning rate
  and schedule, augmentation, temperatures ``temp`` = ``tau_init`` = 0.03, ``rho_init`` 2.5,
  gamma 0.8) with the default run's image tower (``IMAGE_TOWER``) and length (``EPOCHS`` = 5)
  as they were when the protocol was fixed (passed explicitly: the recorded results stay valid
  when the default changes), so every loss sees the same samples with the same model;
- Q2: global batch 64 (one process), seeds 0, 1, 2 (``--seeds``); the cosine gamma schedules
  (fastclip_v0..v3) decay over the run's own epochs instead of the paper's 18;
- Q3: ``clip`` at batch 512, the same epochs (so the same samples seen, 8x fewer steps), against
  ``sogclr`` and ``isogclr`` at 64, in two arms: the default learning rate (2e-3, 50 warm-up
  steps) and, fixed before those runs, the learning rate scaled with the square root of the batch
  from the default's 128 (Adam's rule: 4e-3) with the warm-up of the default's samples (6,400:
  12 steps);
- Q4: the learned temperature of each training sample (``isogclr``: its table; the tempnet: its
  last prediction) against how rare its attributes are: the mean over its objects of
  ``-log p(shape) - log p(colour)``, frequencies counted over the training split; Spearman's
  rank correlation per side, and a box plot per rarity quintile.

Each loss keeps its own hyperparameters' defaults otherwise (``python bimodal_exps/clip.py
--help``). Writes ``bench/results/losses.md``, ``losses.json`` and ``temperatures_q4.png``; the
runs go to ``output/bench_losses/``. A full run (3 seeds) takes about 2.5 hours on 2 cores.

    python bench/bench_losses.py [--seeds 0 1 2] [--losses clip sogclr ...] [--skip_q3 | --q3_seeds 0]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
from common import RESULTS, machine, machine_line
from engine.temperatures import read_temperatures, snapshot_epochs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bimodal_exps" / "configs" / "synthetic.yaml"
RUNS = ROOT / "output" / "bench_losses"
LOSSES = [
    "clip",
    "sogclr",
    "isogclr",
    "isogclr_tempnet",
    "fastclip_v0",
    "fastclip_v1",
    "fastclip_v2",
    "fastclip_v3",
    "siglip",
    "cyclip",
    "vicreg",
]
SMALL_BATCH, LARGE_BATCH = 64, 512
DEFAULT_BATCH = 128  # the batch of the default config, for which its lr and warm-up are set
EPOCHS = 5  # fixed with the protocol, whatever the default config's epochs
IMAGE_TOWER = "{img_size: 40, patch_size: 8, embed_dim: 128, depth: 4, num_heads: 4}"  # likewise
Q4_PLOT = RESULTS / "temperatures_q4.png"


def scaled_lr_arm(config: dict) -> list[str]:
    """Q3's second arm: lr x sqrt(LARGE_BATCH / DEFAULT_BATCH), warm-up of the same samples."""
    lr = config["lr"] * math.sqrt(LARGE_BATCH / DEFAULT_BATCH)
    warmup = round(config["warmup_steps"] * DEFAULT_BATCH / LARGE_BATCH)
    return ["--lr", f"{lr:g}", "--warmup_steps", str(warmup)]


def recorded() -> tuple[dict[tuple, dict], list[dict]]:
    """From the last losses.json: (loss, batch, seed, arm) -> result, and Q4's rows."""
    path = RESULTS / "losses.json"
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    rows = data["small"] + data["large"] + data.get("large_scaled", [])
    return {(r["loss"], r["batch"], r["seed"], r.get("arm", "")): r for r in rows}, data.get("q4", [])


def run(
    loss: str,
    batch: int,
    seed: int,
    arm: str = "",
    extra: tuple[str, ...] = (),
    *,
    epochs: int,
    known_results: dict[tuple, dict],
    report_only: bool,
) -> dict | None:
    """One training run (resumed if it was interrupted, skipped if ``known_results``, from
    ``recorded()``, has it); its final test metrics and wall time. None when not done and
    ``report_only``."""
    out = RUNS / f"{loss}_b{batch}{arm and '_' + arm}_s{seed}"
    done = out / "eval.jsonl"
    final = _final(done)
    known = known_results.get((loss, batch, seed, arm))
    if final is None and known is not None and not out.exists():
        return known
    if final is None and report_only:
        return None
    if final is None:
        cmd = [sys.executable, str(ROOT / "bimodal_exps" / "clip.py"), "--config", str(CONFIG)]
        cmd += ["--ita_type", loss, "--batch_size_train", str(batch), "--seed", str(seed), *extra]
        cmd += ["--image_encoder_kwargs", IMAGE_TOWER]
        cmd += ["--epochs", str(epochs), "--gamma_decay_epochs", str(epochs), "--output_dir", str(out)]
        cmd += ["--resume", "auto", "--no-distributed"]
        start = time.monotonic()
        with open(RUNS / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        (out / "wall_s.txt").write_text(f"{time.monotonic() - start:.0f}\n")
        final = _final(done)
    wall = (out / "wall_s.txt").read_text().strip() if (out / "wall_s.txt").exists() else "?"
    return {
        "loss": loss, "batch": batch, "seed": seed, "arm": arm, "r_mean": final["r_mean"], "wall_s": wall,
        "dir": str(out),
    }  # fmt: skip


def _final(eval_file: Path) -> dict | None:
    if not eval_file.exists():
        return None
    rows = [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]
    return next((r for r in rows if r["tag"] == "final" and r["dataset"] == "synthetic_test"), None)


def rarity_by_index(data_path: Path) -> dict[int, float]:
    """Sample index -> mean over its objects of -log p(shape) - log p(colour) (training split)."""
    import pyarrow.parquet as pq

    rows = []
    for parquet in sorted((data_path / "train").glob("*.parquet")):
        table = pq.read_table(parquet, columns=["key", "status", "attributes"]).to_pylist()
        rows += [(int(r["key"]), json.loads(r["attributes"])["objects"]) for r in table if r["status"] == "success"]
    pairs = (("shape", o["shape"]) for _, objects in rows for o in objects)
    counts = Counter(pairs) + Counter(("colour", o["colour"]) for _, objects in rows for o in objects)
    total = {kind: sum(c for (k, _), c in counts.items() if k == kind) for kind in ("shape", "colour")}

    def surprise(kind: str, value: str) -> float:
        return -math.log(counts[(kind, value)] / total[kind])

    return {
        key: float(np.mean([surprise("shape", o["shape"]) + surprise("colour", o["colour"]) for o in objects]))
        for key, objects in rows
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation, ties given their average rank."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def temperatures_vs_rarity(runs: list[dict], rarity: dict[int, float], epochs: int) -> tuple[list[dict], Path | None]:
    from matplotlib.figure import Figure

    results, panels = [], []
    for r in runs:
        folder = Path(r["dir"]) / "temperatures"
        if epochs - 1 not in snapshot_epochs(folder):
            continue
        snapshot = read_temperatures(folder, epochs - 1)
        for side in ("image", "text"):
            idx, tau = snapshot[side]
            keep = np.array([int(i) in rarity for i in idx])
            x, y = np.array([rarity[int(i)] for i in idx[keep]]), tau[keep]
            row = {"loss": r["loss"], "seed": r["seed"], "side": side, "n": len(x), "spearman": spearman(x, y)}
            results.append(row)
            panels.append((f"{r['loss']} seed {r['seed']}, {side}", x, y))
    if not panels:
        return results, None
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for ax, (title, x, y) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        edges = np.quantile(x, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
        groups = [y[(x >= lo) & (x <= hi)] for lo, hi in itertools.pairwise(edges)]
        ax.boxplot(groups, showfliers=False)
        ax.set_xlabel("attribute rarity quintile (1: most frequent)")
        ax.set_ylabel("learned tau")
        ax.set_title(f"{title}\nSpearman {spearman(x, y):+.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(Q4_PLOT, dpi=110)
    return results, Q4_PLOT


def summarise(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--skip_q3", action="store_true", help="no clip run at batch 512")
    parser.add_argument("--q3_seeds", type=int, nargs="+", help="Q3's seeds (default: --seeds)")
    parser.add_argument("--report_only", action="store_true", help="start no run; report the finished ones")
    args = parser.parse_args()
    q3_seeds = args.q3_seeds or args.seeds
    config = yaml.safe_load(CONFIG.read_text())
    known_results, known_q4 = recorded()
    go = functools.partial(run, epochs=EPOCHS, known_results=known_results, report_only=args.report_only)
    RUNS.mkdir(parents=True, exist_ok=True)
    generator = ROOT / "bimodal_exps" / "data" / "synthetic.py"
    subprocess.run([sys.executable, str(generator), "--out", str(ROOT / config["data_path"])], check=True, cwd=ROOT)
    scaled = ("sqrtlr", tuple(scaled_lr_arm(config)))
    large_scaled = [] if args.skip_q3 else [go("clip", LARGE_BATCH, seed, *scaled) for seed in q3_seeds]
    small = [go(loss, SMALL_BATCH, seed) for seed in args.seeds for loss in args.losses]
    large = [] if args.skip_q3 else [go("clip", LARGE_BATCH, seed) for seed in q3_seeds]
    large_scaled, small, large = ([r for r in rs if r] for rs in (large_scaled, small, large))
    # Q4 from the first seed whose runs are on disk (a recorded run has no temperatures here)
    tempered = [r for r in small if r["loss"] in ("isogclr", "isogclr_tempnet") and Path(r["dir"]).exists()]
    tempered = [r for r in tempered if r["seed"] == min((t["seed"] for t in tempered), default=None)]
    q4, plot = temperatures_vs_rarity(tempered, rarity_by_index(ROOT / config["data_path"]), EPOCHS)
    if not q4:  # the temperature runs are no longer on disk: the recorded Q4 and its plot
        q4, plot = known_q4, Q4_PLOT if known_q4 and Q4_PLOT.exists() else None

    m = machine()
    by_loss = {loss: [r["r_mean"] for r in small if r["loss"] == loss] for loss in args.losses}
    lines = [
        "# Q2-Q4: the losses on the synthetic benchmark",
        "",
        f"Machine: {machine_line(m)}.",
        f"Command: `python bench/bench_losses.py --seeds {' '.join(map(str, args.seeds))}`.",
        f"Protocol (bench/bench_losses.py docstring): the default config with the image tower {IMAGE_TOWER}, "
        f"{EPOCHS} epochs, global batch "
        f"{SMALL_BATCH}, seeds {args.seeds}; test r_mean of the final model (mean ± sd [min-max] over seeds).",
        "",
        "## Q2: every loss at batch 64",
        "",
        "| loss | test r_mean | runs |",
        "|---|---|---|",
    ]
    for loss, values in sorted(by_loss.items(), key=lambda kv: -np.mean(kv[1])):
        lines.append(f"| {loss} | {summarise(values)} | {len(values)} |")
    if large:
        lines += ["", "## Q3: small-batch GCL against large-batch CLIP (same samples seen)", ""]
        lines.append(f"- clip at batch {LARGE_BATCH}, default lr: {summarise([r['r_mean'] for r in large])}")
        lines.append(
            f"- clip at batch {LARGE_BATCH}, lr and warm-up scaled ({' '.join(scaled_lr_arm(config))}): "
            f"{summarise([r['r_mean'] for r in large_scaled])}"
        )
        for loss in ("sogclr", "isogclr", "clip"):
            if by_loss.get(loss):
                lines.append(f"- {loss} at batch {SMALL_BATCH}: {summarise(by_loss[loss])}")
    if q4:
        lines += ["", "## Q4: learned temperature against attribute rarity", ""]
        lines += ["| loss | seed | side | samples | Spearman |", "|---|---|---|---|---|"]
        lines += [f"| {q['loss']} | {q['seed']} | {q['side']} | {q['n']} | {q['spearman']:+.3f} |" for q in q4]
        if plot:
            lines += ["", f"Box plot: `bench/results/{plot.name}`."]
    (RESULTS / "losses.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "losses.json").write_text(
        json.dumps({"machine": m, "small": small, "large": large, "large_scaled": large_scaled, "q4": q4}, indent=2)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
