"""S1 (TARGETS.md): ``--accum_freq K``, memory and time of one step of K micro-batches.

The Trainer's own ``_step`` (clip.build_trainer: the default isogclr loss, fused AdamW, the
synthetic default's model from ``bimodal_exps/configs/synthetic.yaml``) on random in-memory
batches, a fixed micro-batch ``b`` and K = 1, 4, 16, one process, against one plain step on the
whole ``K x b`` batch (the same ``_step`` given one batch). Per K:

- peak memory of one step above what the model, its gradients' absence and the optimiser state
  hold before it: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the profiler's allocator
  events (``profile_memory=True``: the running total of tensor bytes allocated since the step
  began, whose maximum is the peak), measured in a separate, untimed step;
- seconds per sample of both steps (median over paired repeats), and the accumulated step's
  extra time in units of a no-grad forward of the same K micro-batches (the first of its phases,
  engine/accumulate.py): S1 asks for at most one.

K = 1 is the plain path (``_step`` with one batch) in both columns.

    python bench/bench_accum.py                    # results/accum.{json,md} (accum_cuda on a GPU)
    python bench/bench_accum.py --repeats 2        # quicker, prints only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import clip
from common import machine, machine_line, seconds, write_results
from config import parse_config
from data.synthetic import SyntheticConfig, write_text_encoder
from data.synthetic_scenes import caption_vocabulary
from engine.run_log import RunLog
from engine.stop import StopRequest
from engine.trainer import Trainer
from models.model_clip import build_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def make_batch(n: int, image_res: int, words: int, vocab: int, data_size: int, g: torch.Generator) -> dict:
    """``n`` random samples in the loader's form: uint8 images, token ids with a padded tail."""
    lengths = torch.randint(words // 3, words + 1, (n, 1), generator=g)
    idx = torch.randperm(data_size, generator=g)[:n]
    return {
        "image": torch.randint(0, 256, (n, 3, image_res, image_res), generator=g, dtype=torch.uint8),
        "input_ids": torch.randint(1, vocab, (n, words), generator=g),
        "attention_mask": (torch.arange(words) < lengths).long(),
        "image_idx": idx,
        "text_idx": idx,
    }


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of allocated tensor bytes during ``fn()`` above those allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The CPU allocator reports to the profiler, with each allocation and free while it records,
    # a running total of allocated bytes (kept across sessions: its value before the first
    # event is the baseline; frees of tensors allocated while it did not record are not counted).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    memory.sort(key=lambda a: a["Ev Idx"])
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, *(a["Total Allocated"] - base for a in memory))


def held_bytes(trainer: Trainer) -> tuple[int, int, int]:
    """Bytes of the parameters and buffers (model and loss, with its per-sample state), of the
    trainable parameters' gradients, and of the optimiser state."""
    params = sum(t.numel() * t.element_size() for t in trainer.step_module.state_dict().values())
    grads = sum(p.numel() * p.element_size() for p in trainer.step_module.parameters() if p.requires_grad)
    opt = sum(
        v.numel() * v.element_size()
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    return params, grads, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", type=int, default=32, help="micro-batch b")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16], help="micro-batches per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per K (after one warm-up)")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        text_encoder = Path(tmp) / "text_encoder"
        write_text_encoder(text_encoder, [" ".join(caption_vocabulary())], SyntheticConfig())
        cfg = parse_config([
            "--config", str(REPO / "bimodal_exps" / "configs" / "synthetic.yaml"),
            "--text_encoder", str(text_encoder), "--output_dir", str(Path(tmp) / "run"),
            "--val_coco_file", "", "--test_coco_file", "", "--zs_dataset", "",
            "--batch_size_train", str(args.micro), "--no-distributed", *extra,
        ])  # fmt: skip
        device = torch.device(cfg.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        vocab = len(load_tokenizer(cfg.text_encoder))
        torch.manual_seed(0)
        model = build_model(cfg.image_encoder, cfg.text_encoder, cfg.embed_dim, False, cfg.image_encoder_kwargs)
        (Path(tmp) / "run").mkdir()
        trainer = clip.build_trainer(
            cfg, model.to(device), 10**6, device, RunLog(Path(tmp) / "run", False), StopRequest()
        )
        trainer.step_module.train()
        g = torch.Generator().manual_seed(0)

        def on_device(batch: dict) -> dict:
            return {k: v.to(device) for k, v in batch.items()}

        rows = []
        for k in args.ks:
            micro = [
                on_device(make_batch(args.micro, cfg.image_res, cfg.max_words, vocab, cfg.data_size, g))
                for _ in range(k)
            ]
            whole = [{name: torch.cat([m[name] for m in micro]) for name in micro[0]}]

            def accum(micro=micro) -> None:
                trainer._step(micro)

            def plain(whole=whole) -> None:
                trainer._step(whole)

            def forward(micro=micro) -> None:
                with torch.no_grad():
                    for m in micro:
                        trainer.step_module.embed(m["image"], m["input_ids"], m["attention_mask"])

            for fn in (plain, accum, forward):  # warm-up; the optimiser state exists after it
                fn()
            memory = {}
            for name, fn in (("accum", accum), ("plain", plain)):
                trainer.optimizer.zero_grad(set_to_none=True)
                memory[name] = peak_bytes(fn, device)
            times: dict[str, list[float]] = {"plain": [], "accum": [], "forward": []}
            for _ in range(args.repeats):
                for name, fn in (("plain", plain), ("accum", accum), ("forward", forward)):
                    times[name].append(seconds(fn, sync))
            extra_fwd = [(a - p) / f for a, p, f in zip(times["accum"], times["plain"], times["forward"], strict=True)]
            ratio = [a / p for a, p in zip(times["accum"], times["plain"], strict=True)]
            n = k * args.micro
            rows.append({
                "k": k, "samples": n,
                "peak_accum_mb": memory["accum"] / MB, "peak_plain_mb": memory["plain"] / MB,
                "plain_ms_per_sample": 1000 * statistics.median(times["plain"]) / n,
                "accum_ms_per_sample": 1000 * statistics.median(times["accum"]) / n,
                "forward_ms_per_sample": 1000 * statistics.median(times["forward"]) / n,
                "accum_over_plain": statistics.median(ratio),
                "accum_over_plain_range": [min(ratio), max(ratio)],
                "extra_in_forwards": statistics.median(extra_fwd),
                "extra_in_forwards_range": [min(extra_fwd), max(extra_fwd)],
                "times_s": times,
            })  # fmt: skip
            print(f"K={k}: {json.dumps({key: v for key, v in rows[-1].items() if key != 'times_s'})}", flush=True)
        params, grads, opt = held_bytes(trainer)

    result = {
        "micro_batch": args.micro,
        "repeats": args.repeats,
        "loss": cfg.ita_type,
        "precision": cfg.precision,
        "device": str(device),
        "params_mb": params / MB,
        "grads_mb": grads / MB,
        "optimizer_state_mb": opt / MB,
        "rows": rows,
        "machine": machine(),
        "config": "bimodal_exps/configs/synthetic.yaml",
    }
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the profiler's CPU allocator events"
    md = [
        "# S1: `--accum_freq K`, memory and time of one step (`bench/bench_accum.py`)",
        "",
        f"Machine: {machine_line(result['machine'])}. The synthetic default's model "
        f"(`bimodal_exps/configs/synthetic.yaml`), the Trainer's step ({cfg.ita_type}, {cfg.opt}, {cfg.precision} on "
        f"{device}), random in-memory batches, micro-batch b = {args.micro}. Held before every step: parameters and "
        f"buffers {params / MB:.1f} MB, optimiser state {opt / MB:.1f} MB (the step adds the gradients, "
        f"{grads / MB:.1f} MB).",
        "",
        "| K | samples | peak above held, K micro-batches (MB) | peak above held, one plain step on K x b (MB) "
        "| plain ms/sample | accumulated ms/sample | x plain | no-grad forward ms/sample "
        "| extra time, in no-grad forwards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["accum_over_plain_range"]
        flo, fhi = r["extra_in_forwards_range"]
        md.append(
            f"| {r['k']} | {r['samples']} | {r['peak_accum_mb']:.1f} | {r['peak_plain_mb']:.1f} | "
            f"{r['plain_ms_per_sample']:.2f} | {r['accum_ms_per_sample']:.2f} | {r['accum_over_plain']:.2f} "
            f"[{lo:.2f}-{hi:.2f}] | {r['forward_ms_per_sample']:.2f} | "
            + ("- (plain path)" if r["k"] == 1 else f"{r['extra_in_forwards']:.2f} [{flo:.2f}-{fhi:.2f}]")
            + " |"
        )
    md += [
        "",
        f"Peak memory: the maximum of allocated tensor bytes during one step ({how}) above those allocated "
        "before it (parameters, loss state, optimiser state; gradients freed), in a separate untimed step. "
        "Times: median over "
        f"{args.repeats} paired repeats, [min-max] of the per-repeat ratios. Extra time in no-grad forwards: "
        "(accumulated - plain) / (no-grad forward of the same K micro-batches). Target (TARGETS.md S1): "
        "memory flat in K, extra time at most one forward. K = 1 runs the plain path.",
    ]
    single = next((r for r in rows if r["k"] == 1), None)
    if single:
        md += [
            "",
            "Against K plain steps' worth of micro-batch work instead (the K = 1 row's plain ms/sample, which "
            "has no large-batch speed-up), the extra time in no-grad forwards is "
            + ", ".join(
                f"{(r['accum_ms_per_sample'] - single['plain_ms_per_sample']) / r['forward_ms_per_sample']:.2f} "
                f"at K = {r['k']}"
                for r in rows
                if r["k"] > 1
            )
            + ".",
        ]
    print("\n".join(md))
    if args.repeats >= 5:
        write_results("accum" if device.type == "cpu" else f"accum_{device.type}", result, md)


if __name__ == "__main__":
    main()
