"""Train and/or evaluate a CLIP-style model with a (global) contrastive loss.

    python bimodal_exps/clip.py --config bimodal_exps/configs/synthetic.yaml
    python bimodal_exps/clip.py --evaluate --checkpoint output/run/checkpoint_best.pth ...
    torchrun --nproc_per_node 4 bimodal_exps/clip.py ...   (or srun, see README)

This file wires the parts together; each part lives in its own module (config, data,
models, engine, evaluation).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel
from config import ConfigError, loss_hparams, parse_config, save_config
from data.loaders import build_train_data
from data.retrieval_split import RetrievalSplit, load_retrieval_split
from engine.checkpoint import (
    BEST,
    LATEST,
    copy_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from engine.optim import build_optimizer, build_scheduler
from engine.run_log import RunLog, setup_logging
from engine.temperatures import save_temperatures
from engine.trainer import Progress, train_one_epoch
from evaluation.retrieval import evaluate_retrieval, format_recall_table
from evaluation.zeroshot import evaluate_zeroshot
from models.losses import build_loss
from models.model_clip import PretrainedUnavailableError, build_model, load_tokenizer

log = logging.getLogger("clip")

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EvalSplit:
    name: str  # the JSON file's stem, e.g. "coco_test"
    kind: str  # "val" or "test"
    split: RetrievalSplit


def load_eval_splits(cfg: Namespace) -> list[EvalSplit]:
    """The configured retrieval splits (validation ones first); images are checked up front."""
    splits = []
    for kind, flag, root in (
        ("val", "val_coco_file", cfg.coco_image_root),
        ("val", "val_flickr_file", cfg.flickr_image_root),
        ("test", "test_coco_file", cfg.coco_image_root),
        ("test", "test_flickr_file", cfg.flickr_image_root),
    ):
        path = getattr(cfg, flag)
        if path:
            splits.append(EvalSplit(Path(path).stem, kind, load_retrieval_split(path, root)))
    return splits


class Evaluator:
    """Evaluates on the configured retrieval splits (and zero-shot set) and logs every result."""

    def __init__(self, cfg: Namespace, splits: list[EvalSplit], tokenizer, device, run_log: RunLog):
        self.splits, self.tokenizer, self.run_log = splits, tokenizer, run_log
        self.zeroshot = (cfg.zs_dataset, cfg.zs_datafolder) if cfg.zs_dataset else None
        self.kwargs = dict(
            image_res=cfg.image_res,
            max_words=cfg.max_words,
            batch_size=cfg.batch_size_test,
            workers=cfg.workers,
            device=device,
            amp_dtype=AMP_DTYPES[cfg.precision] if device.type == "cuda" else None,
        )

    def __call__(self, model, kinds: tuple[str, ...], tag: str, progress: Progress) -> dict[str, dict[str, float]]:
        """Metrics by split name for the splits of ``kinds``; zero-shot too unless per-epoch."""
        results = {}
        for s in self.splits:
            if s.kind in kinds:
                results[s.name] = evaluate_retrieval(model, s.split, self.tokenizer, **self.kwargs)
                self._log(s.name, s.kind, tag, progress, results[s.name])
        if self.zeroshot and tag != "epoch":
            name, folder = self.zeroshot
            results[f"zeroshot_{name}"] = evaluate_zeroshot(model, name, folder, self.tokenizer, **self.kwargs)
            self._log(name, "zeroshot", tag, progress, results[f"zeroshot_{name}"])
        return results

    def _log(self, dataset: str, split: str, tag: str, progress: Progress, metrics: dict) -> None:
        record = {"dataset": dataset, "split": split, "tag": tag, "epoch": progress.epoch, "step": progress.step}
        self.run_log.eval({**record, **metrics}, progress.step)


def checkpoint_state(model, loss_fn, optimizer, scheduler, scaler, progress: Progress, cfg, best: dict) -> dict:
    return {
        "model": model.state_dict(),
        "loss": loss_fn.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": vars(progress).copy(),
        "best": best,
        "config": vars(cfg).copy(),
    }


# settings a checkpoint must be evaluated with: its architecture and its input processing
ARCHITECTURE_KEYS = (
    "image_encoder",
    "image_encoder_kwargs",
    "text_encoder",
    "embed_dim",
    "image_res",
    "max_words",
)


def adopt_architecture(cfg: Namespace, state: dict) -> None:
    """Take the model settings stored in a checkpoint, so any config can evaluate it."""
    saved = state.get("config", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            log.info("using the checkpoint's %s=%r (not %r)", key, saved[key], getattr(cfg, key))
            setattr(cfg, key, saved[key])


def evaluate_only(cfg: Namespace, model, evaluator: Evaluator, state: dict | None, progress: Progress) -> None:
    if state is not None:
        model.load_state_dict(state["model"])
        progress.epoch, progress.step = state["progress"]["epoch"], state["progress"]["step"]
        log.info("evaluating %s (epoch %d, step %d)", cfg.checkpoint, progress.epoch, progress.step)
    results = evaluator(model, ("val", "test"), "evaluate", progress)
    if parallel.is_main_process():
        print(format_recall_table([(name, m) for name, m in results.items() if "r_mean" in m]))
        for name, m in results.items():
            if "r_mean" not in m:
                print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))


def train(cfg: Namespace, model, tokenizer, evaluator: Evaluator, device: torch.device, run_log: RunLog) -> None:
    rank, world = parallel.rank(), parallel.world_size()
    data = build_train_data(
        train_data=cfg.train_data,
        train_file=cfg.train_file,
        train_image_root=cfg.train_image_root,
        train_num_samples=cfg.train_num_samples,
        data_size=cfg.data_size,
        tokenizer=tokenizer,
        image_res=cfg.image_res,
        max_words=cfg.max_words,
        batch_size=cfg.batch_size_train,
        workers=cfg.workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        crop_scale=cfg.crop_scale,
        hflip=cfg.hflip,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    if data.steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch of {data.num_samples} samples holds no full global batch of "
            f"{cfg.batch_size_train} x {world}; lower --batch_size_train or raise --train_num_samples"
        )
    loss_fn = build_loss(cfg.ita_type, data_size=cfg.data_size, **loss_hparams(cfg)).to(device)
    optimizer = build_optimizer(model, loss_fn, cfg.lr, cfg.weight_decay)
    total_steps = cfg.epochs * data.steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * data.steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.lr, cfg.min_lr, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    amp_dtype = AMP_DTYPES[cfg.precision]
    progress, best = Progress(), {"r_mean": -1.0, "epoch": -1}

    resume = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
    if resume:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        best = state["best"]
        log.info("resumed from %s at epoch %d, step %d", resume, progress.epoch, progress.step)
    elif cfg.checkpoint:
        model.load_state_dict(load_checkpoint(cfg.checkpoint)["model"])
        log.info("initialised the model from %s", cfg.checkpoint)

    log.info(
        "training %s: %d epochs x %d steps, global batch %d (%d per rank x %d ranks), %d samples per epoch",
        cfg.ita_type,
        cfg.epochs,
        data.steps_per_epoch,
        cfg.batch_size_train * world,
        cfg.batch_size_train,
        world,
        data.num_samples,
    )
    table = []
    if progress.epoch == 0 and progress.step == 0:
        untrained = evaluator(model, ("test",), "untrained", progress)
        table += [(f"untrained {name}", m) for name, m in untrained.items() if "r_mean" in m]
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    for epoch in range(progress.epoch, cfg.epochs):
        progress.epoch = epoch
        data.set_epoch(epoch)
        loss_fn.set_epoch(epoch)
        summary = train_one_epoch(
            model=ddp_model,
            loss_fn=loss_fn,
            loader=data.loader,
            steps=data.steps_per_epoch,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            amp_dtype=amp_dtype,
            device=device,
            progress=progress,
            run_log=run_log,
            log_every=cfg.log_every,
            grad_clip=cfg.grad_clip,
        )
        progress.epoch = epoch + 1  # epochs completed
        log.info("epoch %d: loss %.4f, %.1f samples/s", epoch, summary["loss"], summary["samples_per_s"])
        kinds = ("val", "test") if cfg.eval_test_every_epoch else ("val",)
        results = evaluator(model, kinds, "epoch", progress)
        val = [results[s.name]["r_mean"] for s in evaluator.splits if s.kind == "val"]
        for name, m in results.items():
            log.info("epoch %d %s: r_mean %.2f", epoch, name, m["r_mean"])
        is_best = bool(val) and val[0] > best["r_mean"]  # every rank holds the same metrics
        if is_best:
            best = {"r_mean": val[0], "epoch": epoch}
        if parallel.is_main_process():
            epoch_path = Path(cfg.output_dir) / f"checkpoint_{epoch}.pth"
            save_checkpoint(
                checkpoint_state(model, loss_fn, optimizer, scheduler, scaler, progress, cfg, best), epoch_path
            )
            copy_checkpoint(epoch_path, Path(cfg.output_dir) / LATEST)
            if is_best or not val:
                copy_checkpoint(epoch_path, Path(cfg.output_dir) / BEST)
            if hasattr(loss_fn, "temperatures"):
                save_temperatures(loss_fn.temperatures(), cfg.output_dir, epoch)

    final = evaluator(model, ("test",), "final", progress)
    table += [(f"final {name}", m) for name, m in final.items() if "r_mean" in m]
    if parallel.is_main_process():
        print("\n" + format_recall_table(table))
        for name, m in final.items():
            if "r_mean" not in m:
                print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
        if best["epoch"] >= 0:
            print(f"best validation r_mean {best['r_mean']:.2f} at epoch {best['epoch']} ({BEST})")


def run(cfg: Namespace) -> None:
    device = parallel.init_distributed(cfg.distributed, cfg.device)
    try:
        is_main = parallel.is_main_process()
        if is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
        setup_logging(cfg.output_dir if is_main else None, is_main)
        state = load_checkpoint(cfg.checkpoint) if cfg.evaluate and cfg.checkpoint else None
        if state is not None:
            adopt_architecture(cfg, state)
        if is_main:
            save_config(cfg, Path(cfg.output_dir) / ("eval_config.yaml" if cfg.evaluate else "config.yaml"))
        seed_everything(cfg.seed)  # the same initial model on every rank
        run_log = RunLog(cfg.output_dir, enabled=is_main)
        tokenizer = load_tokenizer(cfg.text_encoder)
        model = build_model(
            cfg.image_encoder, cfg.text_encoder, cfg.embed_dim, cfg.init_model, cfg.image_encoder_kwargs
        ).to(device)
        seed_everything(cfg.seed + parallel.rank())  # independent randomness per rank from here on
        evaluator = Evaluator(cfg, load_eval_splits(cfg), tokenizer, device, run_log)
        if cfg.evaluate:
            evaluate_only(cfg, model, evaluator, state, Progress())
        else:
            train(cfg, model, tokenizer, evaluator, device, run_log)
        run_log.close()
    finally:
        parallel.cleanup_distributed()


def _user_message(err: Exception) -> str:
    """The message alone; errors raised in loader workers carry the worker's traceback."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = None
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, FileNotFoundError, PretrainedUnavailableError, ValueError) as err:
        if os.environ.get("CLIP_DEBUG"):
            raise
        print(f"error: {_user_message(err)}", file=sys.stderr)
        if cfg is not None and parallel.is_main_process() and os.path.isdir(cfg.output_dir):
            # the traceback goes to the run's log only, so the console shows one clear message
            with open(os.path.join(cfg.output_dir, "train.log"), "a") as f:
                f.write("fatal error (CLIP_DEBUG=1 re-raises it):\n" + traceback.format_exc())
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
