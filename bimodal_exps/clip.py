"""Train and/or evaluate a CLIP-style model with a (global) contrastive loss.

    python bimodal_exps/clip.py --config bimodal_exps/configs/synthetic.yaml
    python bimodal_exps/clip.py --evaluate --checkpoint output/run/checkpoint_best.pth ...
    torchrun --nproc_per_node 4 bimodal_exps/clip.py ...   (or srun, see README)

This file wires the parts together: configuration, process group, model, data, loss and
evaluation; the run itself is ``engine.run``. Exit status: 0 done, 1 training failed
(non-finite steps, bad data), 2 bad input or settings, 3 stopped by SIGTERM, SIGUSR1 or Ctrl-C
after saving a checkpoint (rerun with --resume auto to continue), 130 aborted by a second Ctrl-C.
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
from engine import run as engine_run
from engine.checkpoint import CheckpointDir
from engine.optim import build_optimizer, build_scheduler
from engine.resume import CheckpointError, architecture_of, check_resumable
from engine.run_log import RunLog, setup_logging
from engine.stop import StopRequest
from engine.trainer import Trainer, TrainingError
from evaluation.suite import EvalSuite, load_eval_splits
from models.losses import build_loss
from models.model_clip import (
    PretrainedUnavailableError,
    build_model,
    load_tokenizer,
    save_text_encoder,
    text_encoder_source,
)

log = logging.getLogger("clip")

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NOTES = {"fp32": "float32", "fp16": "autocast float16, grad scaler", "bf16": "autocast bfloat16"}
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_ABORTED = 0, 1, 2, 3, 130


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
        amp_dtype=AMP_DTYPES[cfg.precision],
    )


def build_trainer(cfg: Namespace, model, steps_per_epoch: int, device: torch.device, run_log, stop) -> Trainer:
    loss_fn = build_loss(
        cfg.ita_type, data_size=cfg.data_size, epochs=cfg.epochs, embed_dim=cfg.embed_dim, **loss_hparams(cfg)
    ).to(device)
    if cfg.state_sharding == "owner":
        loss_fn.shard_state(parallel.rank(), parallel.world_size())
    optimizer = build_optimizer(cfg.opt, model, loss_fn, cfg.lr, cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    return Trainer(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.sched, cfg.lr, cfg.min_lr, warmup, cfg.epochs * steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
        amp_dtype=AMP_DTYPES[cfg.precision],
        device=device,
        run_log=run_log,
        checkpoints=CheckpointDir(cfg.output_dir, cfg.keep_step_checkpoints),
        stop=stop,
        log_every=cfg.log_every,
        grad_clip=cfg.grad_clip,
        save_every_steps=cfg.save_every_steps,
        max_bad_fraction=cfg.max_bad_fraction,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        accum_freq=cfg.accum_freq,
        config=vars(cfg).copy(),
    )


def train(cfg: Namespace, model, tokenizer, suite, start, device, run_log, stop) -> int:
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
    steps_per_epoch = data.steps_per_epoch // cfg.accum_freq  # optimiser steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"an epoch of {data.num_samples} samples holds no full global batch of {cfg.batch_size_train} x "
            f"{world} ranks x {cfg.accum_freq} micro-batches; lower --batch_size_train or --accum_freq, or raise "
            "--train_num_samples"
        )
    trainer = build_trainer(cfg, model, steps_per_epoch, device, run_log, stop)
    micro = f" x {cfg.accum_freq} micro-batches" if cfg.accum_freq > 1 else ""
    log.info(
        "training %s: %d epochs x %d steps, global batch %d (%d per rank x %d ranks%s), %d samples per epoch",
        cfg.ita_type,
        cfg.epochs,
        steps_per_epoch,
        cfg.batch_size_train * world * cfg.accum_freq,
        cfg.batch_size_train,
        world,
        micro,
        data.num_samples,
    )
    done = engine_run.train(
        trainer,
        data,
        suite,
        epochs=cfg.epochs,
        eval_test_every_epoch=cfg.eval_test_every_epoch,
        output_dir=cfg.output_dir,
        start=start,
    )
    return EXIT_OK if done else EXIT_STOPPED


def run(cfg: Namespace) -> int:
    stop = StopRequest()  # before any loader forks workers
    device = parallel.init_distributed(cfg.distributed, cfg.device)
    if device.type == "cuda":  # the losses keep full float32 for their own products
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True
    is_main = parallel.is_main_process()
    try:
        if is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            CheckpointDir(cfg.output_dir).remove_stale_temporaries()
        setup_logging(cfg.output_dir if is_main else None, is_main)
        start = engine_run.starting_point(
            evaluate=cfg.evaluate, resume=cfg.resume, checkpoint=cfg.checkpoint, output_dir=cfg.output_dir
        )
        if cfg.evaluate and start.state is not None:
            for key, value in architecture_of(start.state).items():
                if value != getattr(cfg, key):
                    log.info("using the checkpoint's %s=%r (not %r)", key, value, getattr(cfg, key))
                    setattr(cfg, key, value)
        if start.resume and (differ := check_resumable(vars(cfg), start.state, start.path)):
            raise ConfigError(
                f"--resume {start.path} was written by a run with other settings ({'; '.join(differ)}); resume "
                "with the same settings, or start a new run in another --output_dir"
            )
        if is_main:
            save_config(cfg, Path(cfg.output_dir) / ("eval_config.yaml" if cfg.evaluate else "config.yaml"))
        log.info(
            "%s on %s with %s; precision %s (%s); sync_bn %s",
            "evaluating" if cfg.evaluate else "training",
            device,
            parallel.describe(),
            cfg.precision,
            PRECISION_NOTES[cfg.precision],
            "on" if cfg.sync_bn else "off",
        )
        run_log = RunLog(cfg.output_dir, enabled=is_main)
        # weights from a checkpoint: the architecture alone, and the text encoder's files the run stored
        text_encoder = text_encoder_source(cfg.text_encoder, start.run_dir) if start.state else cfg.text_encoder
        seed_everything(cfg.seed)  # the same initial model on every rank
        tokenizer = load_tokenizer(text_encoder)
        model = build_model(
            cfg.image_encoder,
            text_encoder,
            cfg.embed_dim,
            pretrained=cfg.init_model and start.state is None,
            image_encoder_kwargs=cfg.image_encoder_kwargs,
        )
        if cfg.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device).configure(
            channels_last=cfg.channels_last, grad_checkpointing=cfg.grad_checkpointing, compile=cfg.torch_compile
        )
        seed_everything(cfg.seed + parallel.rank())  # independent randomness per rank from here on
        suite = build_eval_suite(cfg, tokenizer, device, run_log)
        if cfg.evaluate:
            engine_run.evaluate(model, suite, start)
            status = EXIT_OK
        else:
            if is_main:
                save_text_encoder(cfg.output_dir, tokenizer, model)
            status = train(cfg, model, tokenizer, suite, start, device, run_log, stop)
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
        stop.close()


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
    except (
        ConfigError,
        FileNotFoundError,
        PretrainedUnavailableError,
        ValueError,
        TrainingError,
        CheckpointError,
    ) as err:
        if os.environ.get("CLIP_DEBUG"):
            raise
        if getattr(err, "rank", 0) == 0:  # an error every rank raised alike is printed once
            print(f"error: {_user_message(err)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(err, TrainingError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("aborted by a second Ctrl-C: the steps since the last checkpoint are lost", file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())
