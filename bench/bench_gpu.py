"""P7 (TARGETS.md), on a GPU: the CC3M set-up's training step against the encoders alone.

ResNet-50 + DistilBERT (the architectures of the paper's set-up, random weights, built from their
configs: nothing is downloaded), 256 px images, 30 tokens, embedding 256, batch 256 per GPU, bf16
autocast, on one batch held in memory. Baseline: the encoders' forward, a plain InfoNCE loss,
backward and the fused AdamW step. Ours: the project's Trainer step with the isogclr loss (N =
3,318,333 samples of state, as for CC3M). Reported: samples/s of both and their ratio (target
>= 0.95), peak memory, and the encoders' model FLOP utilisation (FLOPs counted by torch's
FlopCounterMode on one step, over the step time, against the GPU's dense bf16 peak, --peak_tflops).

    python bench/bench_gpu.py                  # writes bench/results/gpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DistilBertConfig, DistilBertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, seconds, write_results
from engine.checkpoint import CheckpointDir
from engine.optim import build_optimizer, build_scheduler
from engine.run_log import RunLog
from engine.stop import StopRequest
from engine.trainer import Trainer
from models.losses import build_loss
from models.model_clip import CLIPModel

RES, TOKENS, EMBED, DATA_SIZE = 256, 30, 256, 3_318_333


def cc3m_model(device: torch.device) -> CLIPModel:
    torch.manual_seed(0)
    image = timm.create_model("resnet50", pretrained=False, num_classes=0)
    text = DistilBertModel(DistilBertConfig())  # distilbert-base-uncased's architecture
    return (
        CLIPModel(image, text, EMBED).to(device).configure(channels_last=True, grad_checkpointing=False, compile=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    batch = {
        "image": torch.randint(0, 256, (b, 3, RES, RES), dtype=torch.uint8, generator=gen),
        "input_ids": torch.randint(1000, 30000, (b, TOKENS), generator=gen),
        "attention_mask": torch.ones(b, TOKENS, dtype=torch.long),
        "image_idx": torch.randperm(DATA_SIZE, generator=gen)[:b],
    }
    batch["attention_mask"][b // 2 :, 20:] = 0  # some padding, as captions have
    batch["text_idx"] = batch["image_idx"]
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = (batch["image"], batch["input_ids"], batch["attention_mask"])
    sync = torch.cuda.synchronize

    model = cc3m_model(device)
    clip_loss = build_loss("clip", data_size=DATA_SIZE, temp=0.01).to(device)
    optimizer = build_optimizer("adamw", model, clip_loss, 2e-4, 0.02)

    def bare_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image, text = model(*inputs)
        loss, _ = clip_loss(image.float(), text.float(), batch["image_idx"], batch["text_idx"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        bare_step()
    with FlopCounterMode(display=False) as flops:
        bare_step()
    model_flops = flops.get_total_flops()
    torch.cuda.reset_peak_memory_stats()
    bare = [seconds(bare_step, sync) for _ in range(args.repeats)]
    bare_peak = torch.cuda.max_memory_allocated()
    del optimizer, model

    with tempfile.TemporaryDirectory() as tmp:
        model = cc3m_model(device)
        loss_fn = build_loss("isogclr", data_size=DATA_SIZE, epochs=30, tau_init=0.01).to(device)
        optimizer = build_optimizer("adamw", model, loss_fn, 2e-4, 0.02)
        trainer = Trainer(
            model=model,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, "cosine", 2e-4, 1e-6, 0, 10**6),
            scaler=torch.amp.GradScaler("cuda", enabled=False),
            amp_dtype=torch.bfloat16,
            device=device,
            run_log=RunLog(tmp, enabled=True),
            checkpoints=CheckpointDir(tmp),
            stop=StopRequest(),
            log_every=10**9,
        )
        for _ in range(3):
            trainer._step([batch])
        torch.cuda.reset_peak_memory_stats()
        ours = [seconds(lambda: trainer._step([batch]), sync) for _ in range(args.repeats)]
        ours_peak = torch.cuda.max_memory_allocated()

    bare_s, ours_s = statistics.median(bare), statistics.median(ours)
    result = {
        "batch": b,
        "bare_step_s": bare_s,
        "trainer_step_s": ours_s,
        "bare_samples_per_s": b / bare_s,
        "trainer_samples_per_s": b / ours_s,
        "ratio": bare_s / ours_s,
        "bare_peak_gib": bare_peak / 2**30,
        "trainer_peak_gib": ours_peak / 2**30,
        "model_tflop_per_step": model_flops / 1e12,
        "mfu_bare": model_flops / bare_s / (args.peak_tflops * 1e12),
        "mfu_trainer": model_flops / ours_s / (args.peak_tflops * 1e12),
        "machine": machine(),
    }
    lines = [
        "# P7: the CC3M set-up on a GPU (`bench/bench_gpu.py`)",
        "",
        f"Machine: {machine_line(result['machine'])}. ResNet-50 + DistilBERT (random weights), {RES} px, "
        f"{TOKENS} tokens, batch {b}, bf16 autocast, channels-last images, one in-memory batch.",
        "",
        "| step | ms | samples/s | peak memory (GiB) | MFU of the encoders |",
        "|---|---|---|---|---|",
        f"| encoders + InfoNCE + fused AdamW (baseline) | {1000 * bare_s:.1f} | {b / bare_s:.0f} | "
        f"{result['bare_peak_gib']:.1f} | {100 * result['mfu_bare']:.1f}% |",
        f"| Trainer step, isogclr, state of {DATA_SIZE:,} samples | {1000 * ours_s:.1f} | {b / ours_s:.0f} | "
        f"{result['trainer_peak_gib']:.1f} | {100 * result['mfu_trainer']:.1f}% |",
        "",
        f"Trainer / encoders alone: **{result['ratio']:.3f}** (target >= 0.95). Model FLOPs "
        f"{result['model_tflop_per_step']:.2f} TFLOP per step (FlopCounterMode), peak {args.peak_tflops:.0f} TFLOP/s.",
    ]
    print("\n".join(lines))
    write_results("gpu", result, lines)


if __name__ == "__main__":
    main()
