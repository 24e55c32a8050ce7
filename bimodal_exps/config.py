"""Command-line flags, YAML config files and validation: the one place the run is configured.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line.
Defaults reproduce the iSogCLR paper set-up on CC3M (ALGORITHMS.md section 9); the
flag names are the original code base's, so existing run scripts keep working.
Relative data paths are resolved against ``--data_path``; every other relative path
against the working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path

import yaml

from data.shards import is_url
from models.losses import LOSS_ALIASES, LOSS_PRESETS, LOSSES, loss_hparam_fields

PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


def _dict_arg(text: str) -> dict:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{depth: 4}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clip.py",
        description="Train and/or evaluate CLIP-style image-text models with global contrastive losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of flag values; command-line flags override it")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default="./datasets", help="root that relative data paths are resolved against")
    g.add_argument("--ann_path", default="clip_train", help="folder of the annotation JSON files")
    g.add_argument(
        "--train_data",
        help="webdataset shards: brace spec ('cc3m/{00000..00331}.tar'), a folder, 'pipe:COMMAND' or "
        "http(s):// URLs (braces expanded; epoch length from --train_num_samples), or specs joined by '::'",
    )
    g.add_argument("--train_file", help="caption JSON training file (under --ann_path), instead of --train_data")
    g.add_argument("--train_image_root", help="image folder of --train_file")
    g.add_argument(
        "--train_num_samples",
        type=int,
        help="samples per epoch (default: counted from the shards' _stats.json)",
    )
    g.add_argument(
        "--data_size",
        type=int,
        default=3318333,
        help="size N of the sample index space (CC3M: 3,318,333 rows)",
    )
    g.add_argument(
        "--val_coco_file",
        default="coco_val.json",
        help="retrieval JSON for validation (under --ann_path); '' to skip",
    )
    g.add_argument(
        "--test_coco_file",
        default="coco_test.json",
        help="retrieval JSON for testing (under --ann_path); '' to skip",
    )
    g.add_argument("--coco_image_root", default="coco", help="image folder of the MSCOCO files")
    g.add_argument("--val_flickr_file", default="", help="Flickr30k validation JSON (under --ann_path)")
    g.add_argument("--test_flickr_file", default="", help="Flickr30k test JSON (under --ann_path)")
    g.add_argument("--flickr_image_root", default="flickr30k", help="image folder of the Flickr30k files")
    g.add_argument(
        "--zs_dataset",
        default="",
        help="zero-shot dataset: cifar10, cifar100, imagenet or imagefolder; '' to skip",
    )
    g.add_argument("--zs_datafolder", default="", help="folder of the zero-shot dataset")
    g.add_argument("--workers", type=int, default=8, help="data loader worker processes per rank")
    g.add_argument("--max_words", type=int, default=30, help="caption length cap, in words and in tokens")
    g.add_argument("--crop_scale", type=float, nargs=2, default=(0.5, 1.0), help="RandomResizedCrop area range")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    g.add_argument("--shuffle_buffer", type=int, default=2000, help="samples in each worker's shuffle buffer")

    g = p.add_argument_group("model")
    g.add_argument("--image_encoder", default="resnet50", help="any timm model name")
    g.add_argument(
        "--image_encoder_kwargs",
        type=_dict_arg,
        default={},
        help="extra timm.create_model arguments, e.g. '{img_size: 64}'",
    )
    g.add_argument(
        "--text_encoder",
        default="distilbert-base-uncased",
        help="HF hub name or local folder (config + tokenizer)",
    )
    g.add_argument("--image_res", type=int, default=256, help="input image side, pixels")
    g.add_argument("--embed_dim", type=int, default=256, help="shared embedding dimension")
    g.add_argument(
        "--init_model",
        action="store_true",
        help="start both encoders from pretrained weights (library caches)",
    )
    g.add_argument(
        "--sync_bn",
        action="store_true",
        help="BatchNorm statistics over all ranks (torch's SyncBatchNorm; CUDA only)",
    )

    g = p.add_argument_group("speed", "TF32 matrix products (outside the losses) and cuDNN autotuning are on on CUDA")
    g.add_argument("--channels_last", action="store_true", help="images and image encoder in channels-last layout")
    g.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute the encoders' activations in the backward instead of storing them (less memory)",
    )
    g.add_argument("--torch_compile", action="store_true", help="compile the two encoders with torch.compile")

    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="adamw", type=str.lower, choices=["adamw"], help="optimiser (AdamW)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--min_lr", type=float, default=1e-6, help="final learning rate of the cosine schedule")
    g.add_argument(
        "--weight_decay",
        type=float,
        default=0.02,
        help="AdamW weight decay (never on norms, biases, temperatures)",
    )
    g.add_argument(
        "--sched", default="cosine", choices=["cosine", "constant"], help="learning-rate schedule (per step)"
    )
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up length in epochs")
    g.add_argument("--warmup_steps", type=int, help="linear warm-up length in steps (overrides --warmup_epochs)")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument(
        "--batch_size_train",
        type=int,
        default=128,
        help="per-rank training (micro-)batch; global batch = this x world size x --accum_freq",
    )
    g.add_argument(
        "--accum_freq",
        type=int,
        default=1,
        help="micro-batches per optimiser step: exactly one step on the whole global batch, with the "
        "encoders' memory of one micro-batch (ALGORITHMS.md 10)",
    )
    g.add_argument("--batch_size_test", type=int, default=256, help="per-rank evaluation batch")
    g.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm to this value (0: off)")

    g = p.add_argument_group("loss", "each loss's hyperparameters, declared once beside it (models/losses.py)")
    names = sorted([*LOSSES, *LOSS_ALIASES])
    g.add_argument("--ita_type", default="isogclr", help=f"loss: one of {', '.join(names)}")
    g.add_argument(
        "--state_sharding",
        default="owner",
        choices=["owner", "replicated"],
        help="per-sample loss state with several ranks: 'owner' (default) index a on rank a mod W only (1/W of "
        "the memory, exact, ALGORITHMS.md 11), 'replicated' the whole state on every rank, as the original code; "
        "a checkpoint of either resumes in either on any number of ranks",
    )
    for field in loss_hparam_fields().values():
        _add_hparam_flag(g, field)

    g = p.add_argument_group("run")
    g.add_argument(
        "--output_dir",
        help="where configs, logs and checkpoints go (default: output/run; when evaluating a checkpoint: its folder)",
    )
    g.add_argument("--evaluate", action="store_true", help="evaluate only (with --checkpoint, or the initial model)")
    g.add_argument("--checkpoint", help="checkpoint to evaluate (or to initialise training from, weights only)")
    g.add_argument("--resume", help="checkpoint to resume training from, or 'auto' (latest in --output_dir)")
    g.add_argument("--use_amp", action="store_true", help="mixed precision: --precision fp16")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32; fp16 (autocast with a grad scaler); bf16 (autocast). Default: fp16 with --use_amp, else fp32",
    )
    g.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: detected from the launcher's environment",
    )
    g.add_argument(
        "--k_test", type=int, default=256, help="accepted for compatibility with the original scripts; unused"
    )
    g.add_argument("--log_every", type=int, default=50, help="steps between log.jsonl lines")
    g.add_argument(
        "--save_every_steps", type=int, default=1000, help="also checkpoint every this many steps (0: epoch ends only)"
    )
    g.add_argument("--keep_step_checkpoints", type=int, default=2, help="step checkpoints kept (the newest)")
    g.add_argument(
        "--max_bad_fraction",
        type=float,
        default=0.1,
        help="stop when more than this fraction of the samples read could not be used",
    )
    g.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=20,
        help="stop after more than this many steps in a row with a non-finite loss or gradient",
    )
    g.add_argument(
        "--eval_test_every_epoch", action="store_true", help="also evaluate the test split after every epoch"
    )
    return p


def _add_hparam_flag(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    """One command-line flag from a loss hyperparameter's declaration (type, default, help, choices)."""
    kind = typing.get_type_hints(_owner(field))[field.name]
    kind = next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
    if kind is bool:
        group.add_argument(f"--{field.name}", action="store_true", help=field.metadata["help"])
        return
    group.add_argument(
        f"--{field.name}",
        type=kind,
        default=field.default,
        choices=field.metadata["choices"],
        help=field.metadata["help"],
    )


def _owner(field: dataclasses.Field) -> type:
    """The hyperparameter class that declares ``field`` (for its resolved type annotations)."""
    return next(
        cls
        for loss in LOSSES.values()
        for cls in loss.HParams.__mro__
        if field.name in getattr(cls, "__annotations__", {})
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve(root: str, path: str | None) -> str | None:
    if not path:
        return path
    return os.path.abspath(os.path.join(root, path))


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags (and ``--config``), resolve derived values and validate; raises ConfigError."""
    cfg = load_config(argv)
    validate(cfg)
    return cfg


def load_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Built-in defaults < a loss name's presets < ``--config`` YAML < flags, derived values
    resolved (paths against --data_path); not validated."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    from_yaml = load_yaml(first.config, parser) if first.config else {}
    parser.set_defaults(**from_yaml)
    # the defaults a loss name brings (the FastCLIP variants' schedules), below the YAML's and
    # the command line's values; the saved config then says what ran
    name = parser.parse_known_args(argv)[0].ita_type
    parser.set_defaults(**{**LOSS_PRESETS.get(name, {}), **from_yaml})
    cfg = parser.parse_args(argv)
    resolve(cfg)
    return cfg


def load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config file not found: {path}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)} (keys are flag names without '--')")
    return values


def resolve(cfg: argparse.Namespace) -> None:
    """Fill derived values in place: paths, loss aliases, precision."""
    cfg.ita_type = LOSS_ALIASES.get(cfg.ita_type, cfg.ita_type)
    if cfg.output_dir is None:
        cfg.output_dir = os.path.dirname(cfg.checkpoint) if cfg.evaluate and cfg.checkpoint else "output/run"
    cfg.ann_path = _resolve(cfg.data_path, cfg.ann_path)
    for name in ("train_image_root", "coco_image_root", "flickr_image_root", "zs_datafolder"):
        setattr(cfg, name, _resolve(cfg.data_path, getattr(cfg, name)))
    if cfg.train_data:
        parts = cfg.train_data.split("::")  # URLs (pipe:, http://) stay as they are
        cfg.train_data = "::".join(s if is_url(s.strip()) else _resolve(cfg.data_path, s) for s in parts)
    for name in ("train_file", "val_coco_file", "test_coco_file", "val_flickr_file", "test_flickr_file"):
        setattr(cfg, name, _resolve(cfg.ann_path, getattr(cfg, name)))
    if cfg.precision is None:
        cfg.precision = "fp16" if cfg.use_amp else "fp32"
    cfg.crop_scale = tuple(cfg.crop_scale)


def validate(cfg: argparse.Namespace) -> None:
    """Catch settings that cannot work before anything is built (one message each)."""
    if cfg.ita_type not in LOSSES:
        names = ", ".join(sorted([*LOSSES, *LOSS_ALIASES]))
        raise ConfigError(f"unknown --ita_type {cfg.ita_type!r}; valid losses: {names}")
    if cfg.batch_size_train < 2:
        raise ConfigError(
            f"--batch_size_train {cfg.batch_size_train}: a contrastive loss needs at least 2 samples per rank "
            "(the other samples of the batch are the negatives); use 2 or more"
        )
    if cfg.accum_freq < 1:
        raise ConfigError(f"--accum_freq {cfg.accum_freq}: the number of micro-batches per step must be 1 or more")
    if cfg.data_size is None or cfg.data_size < 1:
        raise ConfigError("--data_size must be a positive number of sample indices (CC3M: 3318333)")
    if not cfg.evaluate:
        if bool(cfg.train_data) == bool(cfg.train_file):
            raise ConfigError(
                "give exactly one training source: --train_data (webdataset shards) or --train_file (caption JSON)"
            )
        if cfg.train_file:
            _require_file(cfg.train_file, "--train_file")
            _require_dir(cfg.train_image_root, "--train_image_root")
    for flag in ("val_coco_file", "test_coco_file", "val_flickr_file", "test_flickr_file"):
        if getattr(cfg, flag):
            _require_file(getattr(cfg, flag), f"--{flag}")
            root = cfg.coco_image_root if "coco" in flag else cfg.flickr_image_root
            _require_dir(root, "--coco_image_root" if "coco" in flag else "--flickr_image_root")
    if cfg.zs_dataset:
        _require_dir(cfg.zs_datafolder, "--zs_datafolder")
    if cfg.resume and cfg.resume != "auto":
        _require_file(cfg.resume, "--resume")
    if cfg.checkpoint:
        _require_file(cfg.checkpoint, "--checkpoint")
    if cfg.sync_bn and not cfg.device.startswith("cuda"):
        raise ConfigError(
            f"--sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only), but --device is "
            f"{cfg.device}; leave out --sync_bn"
        )


def _require_file(path: str | None, flag: str) -> None:
    if not path or not os.path.isfile(path):
        raise ConfigError(f"{flag}: file not found: {path}")


def _require_dir(path: str | None, flag: str) -> None:
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{flag}: folder not found: {path}")


def loss_hparams(cfg: argparse.Namespace) -> dict:
    """The hyperparameters of the chosen loss (its ``HParams`` fields), from the flags."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LOSSES[cfg.ita_type].HParams)}


def save_config(cfg: argparse.Namespace, path: str | Path) -> None:
    """Write the resolved configuration as YAML (loadable again with --config)."""
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(cfg).items())}
    with open(path, "w") as f:
        yaml.safe_dump(json.loads(json.dumps(values)), f, sort_keys=True)
