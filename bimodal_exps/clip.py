"""Train and/or evaluate a CLIP-style model with a (global) contrastive loss.

    python bimodal_exps/clip.py --config bimodal_exps/configs/synthetic.yaml
    python bimodal_exps/clip.py --evaluate --checkpoint output/run/checkpoint_best.pth ...
    torchrun --nproc_per_node 4 bimodal_exps/clip.py ...   (or srun, see README)

This file wires the parts together; each part lives in its own module (config, data,
models, engine, evaluation). Exit status: 0 done, 1 training failed (non-finite steps, bad
data), 2 bad input or settings, 3 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(rerun with --resume auto to continue).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel
from config import ConfigError, loss_hparams, parse_config, save_config
from data.loaders import build_train_data
from engine.checkpoint import BEST, CheckpointDir, load_checkpoint
from engine.optim import build_optimizer, build_scheduler
from engine.preemption import StopRequest
from engine.run_log import RunLog, setup_logging
from engine.temperatures import save_temperatures
from engine.trainer import Trainer, TrainingError
from evaluation.retrieval import format_recall_table
from evaluation.suite import EvalSuite, load_eval_splits
from models.losses import build_loss
from models.model_clip import PretrainedUnavailableError, build_model, load_tokenizer

log = logging.getLogger("clip")

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3

# settings a checkpoint must be evaluated (and resumed) with: its architecture and input processing
ARCHITECTURE_KEYS = ("image_encoder", "image_encoder_kwargs", "text_encoder", "embed_dim", "image_res", "max_words")
# ... and what else a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = (*ARCHITECTURE_KEYS, "ita_type", "data_size")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_eval_suite(cfg: Namespace, tokenizer, device: torch.device, run_log: RunLog) -> EvalSuite:
    splits = load_eval_splits(
        [
            ("val", cfg.val_coco_file, cfg.coco_image_root),
            ("val", cfg.val_flickr_file, cfg.flickr_image_root),
            ("test", cfg.test_coco_file, cfg.coco_image_root),
            ("test", cfg.test_flickr_file, cfg.flickr_image_root),
        ]
    )
    return EvalSuite(
        splits,
        (cfg.zs_dataset, cfg.zs_datafolder) if cfg.zs_dataset else None,
        tokenizer,
        run_log.eval,
        image_res=cfg.image_res,
        max_words=cfg.max_words,
        batch_size=cfg.batch_size_test,
        workers=cfg.workers,
        device=device,
        amp_dtype=AMP_DTYPES[cfg.precision] if device.type == "cuda" else None,
    )


def print_results(rows: list[tuple[str, dict[str, float]]]) -> None:
    """The recall table, then other metrics (zero-shot) one line each; rank 0 only."""
    if not parallel.is_main_process():
        return
    print("\n" + format_recall_table([(name, m) for name, m in rows if "r_mean" in m]))
    for name, m in rows:
        if "r_mean" not in m:
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))


def adopt_architecture(cfg: Namespace, state: dict) -> None:
    """Take the model settings stored in a checkpoint, so any config can evaluate it."""
    saved = state.get("config", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            log.info("using the checkpoint's %s=%r (not %r)", key, saved[key], getattr(cfg, key))
            setattr(cfg, key, saved[key])


def check_resumable(cfg: Namespace, state: dict, path: str | Path) -> None:
    """A checkpoint of another model or loss cannot continue this run."""
    saved = state.get("config", {})
    differ = [
        f"{k}: {saved[k]!r} there, {getattr(cfg, k)!r} here"
        for k in RESUME_KEYS
        if k in saved and saved[k] != getattr(cfg, k)
    ]
    if differ:
        raise ConfigError(
            f"--resume {path} was written by a run with other settings ({'; '.join(differ)}); resume with the "
            "same settings, or start a new run in another --output_dir"
        )


def evaluate(cfg: Namespace, model, suite: EvalSuite, state: dict | None) -> None:
    epoch = step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        epoch, step = state["progress"]["epoch"], state["progress"]["step"]
        log.info("evaluating %s (epoch %d, step %d)", cfg.checkpoint, epoch, step)
    print_results(list(suite(model, ("val", "test"), "evaluate", epoch, step).items()))


def train(
    cfg: Namespace, model, tokenizer, suite: EvalSuite, device: torch.device, run_log: RunLog, stop: StopRequest
) -> int:
    """Train (or continue) the run; returns the exit status."""
    checkpoints = CheckpointDir(cfg.output_dir, cfg.keep_step_checkpoints)
    resume = str(checkpoints.latest() or "") if cfg.resume == "auto" else cfg.resume
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        check_resumable(cfg, state, resume)
    elif cfg.checkpoint:
        model.load_state_dict(load_checkpoint(cfg.checkpoint)["model"])
        log.info("initialised the model from %s", cfg.checkpoint)

    world = parallel.world_size()
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
        rank=parallel.rank(),
        world_size=world,
        crop_scale=cfg.crop_scale,
        hflip=cfg.hflip,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    if data.steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch of {data.num_samples} samples holds no full global batch of {cfg.batch_size_train} x "
            f"{world}; lower --batch_size_train or raise --train_num_samples"
        )
    loss_fn = build_loss(cfg.ita_type, data_size=cfg.data_size, **loss_hparams(cfg)).to(device)
    optimizer = build_optimizer(model, loss_fn, cfg.lr, cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * data.steps_per_epoch)
    trainer = Trainer(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.sched, cfg.lr, cfg.min_lr, warmup, cfg.epochs * data.steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
        amp_dtype=AMP_DTYPES[cfg.precision],
        device=device,
        run_log=run_log,
        checkpoints=checkpoints,
        stop=stop,
        log_every=cfg.log_every,
        grad_clip=cfg.grad_clip,
        save_every_steps=cfg.save_every_steps,
        max_bad_fraction=cfg.max_bad_fraction,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        config=vars(cfg).copy(),
    )
    progress = trainer.progress
    if state is not None:
        trainer.load_state_dict(state)
        run_log.resume_at(progress.step)
        log.info(
            "resumed from %s: epoch %d, step %d (%d into the epoch), %d samples seen",
            resume,
            progress.epoch,
            progress.step,
            progress.epoch_step,
            progress.samples_seen,
        )
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
    if state is None:
        untrained = suite(model, ("test",), "untrained", 0, 0)
        table += [(f"untrained {name}", m) for name, m in untrained.items()]

    while progress.epoch < cfg.epochs:
        epoch = progress.epoch
        if not trainer.train_epoch(data, data.steps_per_epoch):
            return EXIT_STOPPED
        kinds = ("val", "test") if cfg.eval_test_every_epoch else ("val",)
        results = suite(model, kinds, "epoch", progress.epoch, progress.step, zeroshot=False)
        for name, m in results.items():
            log.info("epoch %d %s: r_mean %.2f", epoch, name, m["r_mean"])
        val = [results[s.name]["r_mean"] for s in suite.splits if s.kind == "val"]
        is_best = not val or val[0] > trainer.best["r_mean"]  # every rank holds the same metrics
        if is_best:
            trainer.best = {"r_mean": val[0] if val else -1.0, "epoch": epoch}
        trainer.save_epoch_checkpoint(epoch, is_best)
        if parallel.is_main_process() and hasattr(loss_fn, "temperatures"):
            save_temperatures(loss_fn.temperatures(), cfg.output_dir, epoch)
        if parallel.any_rank(stop.requested, device=device)[0]:
            log.warning("stopping after epoch %d (checkpoint saved)", epoch)
            return EXIT_STOPPED

    final = suite(model, ("test",), "final", progress.epoch, progress.step)
    print_results(table + [(f"final {name}", m) for name, m in final.items()])
    if parallel.is_main_process() and trainer.best["epoch"] >= 0 and suite.has("val"):
        print(f"best validation r_mean {trainer.best['r_mean']:.2f} at epoch {trainer.best['epoch']} ({BEST})")
    return EXIT_OK


def run(cfg: Namespace) -> int:
    stop = StopRequest()  # before any loader forks workers, which then inherit the handlers
    device = parallel.init_distributed(cfg.distributed, cfg.device)
    is_main = parallel.is_main_process()
    try:
        if is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            CheckpointDir(cfg.output_dir).remove_stale_temporaries()
        setup_logging(cfg.output_dir if is_main else None, is_main)
        state = load_checkpoint(cfg.checkpoint) if cfg.evaluate and cfg.checkpoint else None
        if state is not None:
            adopt_architecture(cfg, state)
        if is_main:
            save_config(cfg, Path(cfg.output_dir) / ("eval_config.yaml" if cfg.evaluate else "config.yaml"))
        run_log = RunLog(cfg.output_dir, enabled=is_main)
        seed_everything(cfg.seed)  # the same initial model on every rank
        tokenizer = load_tokenizer(cfg.text_encoder)
        model = build_model(
            cfg.image_encoder, cfg.text_encoder, cfg.embed_dim, cfg.init_model, cfg.image_encoder_kwargs
        ).to(device)
        seed_everything(cfg.seed + parallel.rank())  # independent randomness per rank from here on
        suite = build_eval_suite(cfg, tokenizer, device, run_log)
        if cfg.evaluate:
            evaluate(cfg, model, suite, state)
            status = EXIT_OK
        else:
            status = train(cfg, model, tokenizer, suite, device, run_log, stop)
        run_log.close()
        return status
    except Exception:
        if is_main and os.path.isdir(cfg.output_dir):
            # the traceback goes to the run's log, so the console can show one clear message
            with open(os.path.join(cfg.output_dir, "train.log"), "a") as f:
                f.write("fatal error (CLIP_DEBUG=1 shows it on the console):\n" + traceback.format_exc())
        raise
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
    try:
        return run(parse_config(argv))
    except (ConfigError, FileNotFoundError, PretrainedUnavailableError, ValueError, TrainingError) as err:
        if os.environ.get("CLIP_DEBUG"):
            raise
        print(f"error: {_user_message(err)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(err, TrainingError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
