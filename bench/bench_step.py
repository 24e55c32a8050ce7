"""P4 (TARGETS.md): the whole training step of clip.py against the encoders alone.

Ours: clip.py's training samples/s (its log.jsonl), with the isogclr loss, the real input pipeline
(webdataset shards, loader workers, tokenisation) and everything the trainer does per step. Baseline:
the same model and batch size, the encoders' own forward, a plain InfoNCE loss (the clip loss),
backward and the same fused AdamW step, on one batch held in memory. Both in one process, the
baseline measured before and after the clip.py run (the machine's speed drifts). The breakdown:
the Trainer's own step (isogclr loss, state update, skip logic) on the in-memory batch, and the
rest (waiting for data, the loader workers' share of the CPU, logging).

    python bench/bench_step.py                     # the synthetic default's model; results/step.{json,md}
    python bench/bench_step.py --steps 40          # quicker, prints only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import clip
from common import machine, machine_line, seconds, write_results
from config import parse_config
from data.loaders import build_train_data
from data.synthetic import ensure_synthetic_dataset
from engine.optim import build_optimizer
from engine.run_log import RunLog
from engine.stop import StopRequest
from models.losses import build_loss
from models.model_clip import build_model, load_tokenizer
from tiny_training import ListData

REPO = Path(__file__).resolve().parents[1]


def config_args(root: Path, out: Path, steps: int, batch: int, extra: list[str]) -> list[str]:
    return [
        "--config", str(REPO / "bimodal_exps" / "configs" / "synthetic.yaml"),
        "--data_path", str(root),
        "--text_encoder", str(root / "text_encoder"),
        "--output_dir", str(out),
        "--val_coco_file", "", "--test_coco_file", "", "--zs_dataset", "",
        "--epochs", "1", "--train_num_samples", str(steps * batch), "--log_every", "10",
        "--save_every_steps", "0", "--no-distributed", *extra,
    ]  # fmt: skip


def loader_seconds(data, batches: int) -> float:
    """Seconds per batch of the input pipeline in this process (after one batch of warm-up)."""
    data.set_epoch(1)
    iterator = iter(data.loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="steps of the clip.py run (the first 10 are warm-up)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of the in-memory loops")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of baseline, trainer, clip.py run, baseline")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_synthetic_dataset(Path(tmp) / "synthetic", train_size=6000, eval_size=100, zeroshot_per_class=2)
        cfg = parse_config(config_args(root, Path(tmp) / "run", args.steps, 128, extra))
        batch_size = cfg.batch_size_train
        tokenizer = load_tokenizer(cfg.text_encoder)
        data = build_train_data(
            train_data=cfg.train_data, train_file=None, train_image_root=None, train_num_samples=None,
            data_size=cfg.data_size, tokenizer=tokenizer, image_res=cfg.image_res, max_words=cfg.max_words,
            batch_size=batch_size, workers=0, seed=0, rank=0, world_size=1, crop_scale=cfg.crop_scale,
            hflip=cfg.hflip, shuffle_buffer=cfg.shuffle_buffer,
        )  # fmt: skip
        data.set_epoch(0)
        batch = next(iter(data.loader))
        loader_s = loader_seconds(data, batches=10)

        device = torch.device(cfg.device)
        amp = clip.AMP_DTYPES[cfg.precision]
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        inputs = (batch["image"], batch["input_ids"], batch["attention_mask"])

        def fresh_model():
            torch.manual_seed(0)
            model = build_model(cfg.image_encoder, cfg.text_encoder, cfg.embed_dim, False, cfg.image_encoder_kwargs)
            return model.to(device)

        def bare_steps() -> list[float]:
            """Encoders + InfoNCE + backward + fused AdamW, in-memory batch: seconds per step."""
            model = fresh_model()
            loss_fn = build_loss("clip", data_size=cfg.data_size, temp=cfg.temp).to(device)
            optimizer = build_optimizer("adamw", model, loss_fn, cfg.lr, cfg.weight_decay)
            scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

            def step():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    image, text = model(*inputs)
                loss, _ = loss_fn(image.float(), text.float(), batch["image_idx"], batch["text_idx"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

            step()
            return [seconds(step, sync) for _ in range(args.repeats)]

        def trainer_steps() -> list[float]:
            """The Trainer's own step (isogclr, state update, skip logic) on the same batch."""
            (Path(tmp) / "trainer").mkdir(exist_ok=True)
            trainer = clip.build_trainer(
                cfg, fresh_model(), 1, device, RunLog(Path(tmp) / "trainer", True), StopRequest()
            )
            trainer.log_every = 10**9
            trainer.train_epoch(ListData([batch]))
            return [seconds(lambda: trainer._step([batch]), sync) for _ in range(args.repeats)]

        rounds = []
        for r in range(args.rounds):
            before = bare_steps()
            trainer = trainer_steps()
            out = Path(tmp) / f"run{r}"
            assert clip.main(config_args(root, out, args.steps, batch_size, extra)) == 0
            after = bare_steps()
            lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            windows = [line for line in lines[1:] if line["epoch_step"] % 10 == 0]  # full windows after warm-up
            bare = statistics.median(before + after)
            rounds.append(
                {
                    "bare_step_s": bare,
                    "bare_before_after_s": [statistics.median(before), statistics.median(after)],
                    "trainer_step_s": statistics.median(trainer),
                    "run_samples_per_s": statistics.median(line["samples_per_s"] for line in windows),
                    "data_wait_s": statistics.median(line["data_wait_s"] for line in windows),
                }
            )
            rounds[-1]["ratio"] = rounds[-1]["run_samples_per_s"] * bare / batch_size
            rounds[-1]["trainer_ratio"] = bare / rounds[-1]["trainer_step_s"]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def spread(key: str) -> str:
        return f"[{min(r[key] for r in rounds):.2f}-{max(r[key] for r in rounds):.2f}]"

    bare_s, trainer_s, run_sps, data_wait = (
        med("bare_step_s"),
        med("trainer_step_s"),
        med("run_samples_per_s"),
        med("data_wait_s"),
    )
    run_s = batch_size / run_sps
    result = {
        "batch": batch_size,
        "bare_step_s": bare_s,
        "bare_samples_per_s": batch_size / bare_s,
        "trainer_step_s": trainer_s,
        "run_samples_per_s": run_sps,
        "run_step_s": run_s,
        "ratio": med("ratio"),
        "trainer_ratio": med("trainer_ratio"),
        "data_wait_s": data_wait,
        "loader_s_per_batch": loader_s,
        "rounds": rounds,
        "workers": cfg.workers,
        "machine": machine(),
        "config": "bimodal_exps/configs/synthetic.yaml",
    }
    rest = run_s - trainer_s - data_wait
    md = [
        "# P4: clip.py's training step against the encoders alone (`bench/bench_step.py`)",
        "",
        f"Machine: {machine_line(result['machine'])}. Model and batch of the synthetic default "
        f"(`bimodal_exps/configs/synthetic.yaml`: batch {batch_size}, {cfg.workers} loader worker(s)), "
        f"{cfg.precision} on {device}.",
        "",
        "| what | s per step | samples/s | x the encoders alone |",
        "|---|---|---|---|",
        f"| encoders + InfoNCE + AdamW, in-memory batch (baseline) | {bare_s:.3f} | {batch_size / bare_s:.0f} | 1.00 |",
        f"| Trainer step (isogclr, state, skip logic), in-memory batch | {trainer_s:.3f} | "
        f"{batch_size / trainer_s:.0f} | {result['trainer_ratio']:.2f} {spread('trainer_ratio')} |",
        f"| clip.py (shards, loader, trainer, logging) | {run_s:.3f} | {run_sps:.0f} | **{result['ratio']:.2f}** "
        f"{spread('ratio')} |",
        "",
        f"Medians over {args.rounds} rounds (each: the baseline, the Trainer step, a clip.py run of {args.steps} "
        "steps, the baseline again; a round's ratios use the median of its own baseline steps), [min-max] of the "
        "rounds' ratios.",
        "",
        f"Where clip.py's extra {1000 * (run_s - bare_s):.0f} ms per step go: the trainer and the isogclr loss "
        f"{1000 * (trainer_s - bare_s):.0f} ms, waiting for data {1000 * data_wait:.0f} ms, the rest (the loader "
        f"workers' share of the CPU, logging, host work between steps) {1000 * rest:.0f} ms. One process: no "
        "state exchange. Target: clip.py at least 0.90 of the encoders alone.",
        "",
        f"The input pipeline alone (shards, decode, crop, tokenise; one process, no workers) takes "
        f"{1000 * loader_s:.0f} ms of one core per batch of {batch_size}: "
        f"{100 * loader_s / (torch.get_num_threads() * bare_s):.0f}% of the {torch.get_num_threads()} compute "
        "threads' time in a baseline step, which a loader worker on the same cores takes from them.",
    ]
    print("\n".join(md))
    if args.steps >= 80:
        write_results("step" if device.type == "cpu" else f"step_{device.type}", result, md)


if __name__ == "__main__":
    main()
