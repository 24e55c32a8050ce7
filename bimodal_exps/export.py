"""Write a checkpoint's model in a form that needs neither this project nor its checkpoints.

    python bimodal_exps/export.py --checkpoint output/run/checkpoint_best.pth --format open_clip --out exported/

Formats (README, "Exporting a model"):

    open_clip    a folder that ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
                 ``open_clip.get_tokenizer("local-dir:DIR")`` load offline: open_clip_config.json
                 (model config: timm image tower, Hugging Face text tower with first-token
                 pooling and linear projections; preprocessing), open_clip_model.safetensors,
                 the tokenizer, image_encoder/ (timm's config) and text_encoder/ (Hugging Face's)
    torchscript  model.pt, a traced module: ``encode_image(uint8 [b,3,H,W])`` and
                 ``encode_text(input_ids, attention_mask)`` give unit-norm embeddings;
                 ``logit_scale`` (and ``logit_bias``) buffers; the tokenizer beside it
    state_dict   model.safetensors with this project's parameter names, text_encoder/

Every format writes export_config.json (architecture, preprocessing, temperature). The model is
built from the checkpoint's own settings and the text encoder files its run stored, as
``clip.py --evaluate --checkpoint`` builds it, so nothing is downloaded. On any error nothing is
written: the folder is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine.checkpoint import load_checkpoint
from engine.resume import ARCHITECTURE_KEYS, architecture_of
from models.losses import LOSSES, FixedTemperature, resolve_loss_name
from models.model_clip import (
    MEAN,
    STD,
    TEXT_ENCODER_FOLDER,
    CLIPModel,
    PretrainedUnavailableError,
    build_model,
    load_tokenizer,
    text_encoder_source,
)

FORMATS = ("open_clip", "torchscript", "state_dict")
IMAGE_ENCODER_FOLDER = "image_encoder"
# Model types whose open_clip HF tower (open_clip 3.3, hf_model.py / hf_configs.py) pools the first
# token of last_hidden_state as ours does: listed in its arch_dict, not encoder-decoder (it would
# keep the encoder alone) and built with add_pooling_layer=False, which these model classes take.
OPEN_CLIP_TEXT_TYPES = ("bert", "roberta", "xlm-roberta")


class ExportError(RuntimeError):
    """The checkpoint cannot be read or exported in the requested format; nothing was written."""


def load_model(checkpoint: str | os.PathLike) -> tuple[CLIPModel, PreTrainedTokenizerBase, dict]:
    """(model in eval mode with the checkpoint's weights, its tokenizer, the checkpoint)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        state = load_checkpoint(path)
    except Exception as err:  # torch.load raises many kinds for files it cannot read
        reason = (str(err).splitlines() or [""])[0][:200]
        raise ExportError(f"{path} is not a checkpoint ({type(err).__name__}: {reason})") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ExportError(f"{path} is not a checkpoint of this project (no 'model' and 'config' entries)")
    arch = architecture_of(state)
    if missing := [k for k in ARCHITECTURE_KEYS if k not in arch]:
        raise ExportError(f"{path} is not a checkpoint of this project (its config lacks {', '.join(missing)})")
    text_encoder = text_encoder_source(arch["text_encoder"], path.parent)
    tokenizer = load_tokenizer(text_encoder)
    model = build_model(
        arch["image_encoder"], text_encoder, arch["embed_dim"], image_encoder_kwargs=arch["image_encoder_kwargs"]
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ExportError(f"the weights of {path} do not fit its own architecture: {str(err)[:500]}") from err
    return model.eval(), tokenizer, state


def logit_scale_and_bias(state: dict) -> tuple[float, float | None]:
    """open_clip's ``logit_scale`` (log of the scale on cosine similarities) and ``logit_bias``.

    A learned global temperature (clip/cyclip with --learnable_temp, fastclip_v0/v3) gives
    log(1/tau), clamped to the range its loss keeps it in; siglip its learned scale and bias;
    every other loss its configured --temp (per-sample temperatures have no single value)."""
    config, loss = state["config"], state.get("loss") or {}
    if "log_scale" in loss:  # siglip: logits = exp(log_scale) * s + bias, open_clip's form
        return float(loss["log_scale"]), float(loss["bias"])
    cls = LOSSES[resolve_loss_name(config.get("ita_type", "clip"))]
    learned = next((loss[k] for k in ("temp", "tau") if k in loss and loss[k].ndim == 0), None)
    if learned is not None:
        low, high = getattr(cls, "TEMP_RANGE", None) or cls.TAU_RANGE
        tau = min(max(float(learned), low), high)
    else:
        tau = float(config.get("temp", FixedTemperature.temp))
    return math.log(1.0 / tau), None


def export_config(state: dict, fmt: str, checkpoint: Path) -> dict:
    """What a user needs to rebuild and feed the model (export_config.json)."""
    arch = architecture_of(state)
    scale, bias = logit_scale_and_bias(state)
    return {
        "format": fmt,
        "checkpoint": str(checkpoint.resolve()),
        "step": state.get("progress", {}).get("step"),
        "ita_type": state["config"].get("ita_type"),
        "image_encoder": arch["image_encoder"],
        "image_encoder_kwargs": arch["image_encoder_kwargs"],
        "text_encoder": TEXT_ENCODER_FOLDER,
        "embed_dim": arch["embed_dim"],
        "text_pooling": "first token of last_hidden_state",
        "projections": "linear with bias, then L2 normalisation",
        "image_res": arch["image_res"],
        "image_preprocess": "short side resized to image_res (bicubic, antialiased), centre crop, /255, mean/std",
        "mean": list(MEAN),
        "std": list(STD),
        "max_words": arch["max_words"],
        "text_preprocess": "lower case, punctuation removed, at most max_words words and tokens",
        "logit_scale": scale,
        "logit_bias": bias,
    }


def _text_bias_shift(model: CLIPModel) -> tuple[str, torch.Tensor]:
    """(name, shift c) of the text encoder's last LayerNorm bias, with ``text_proj.weight @ c ==
    text_proj.bias``: open_clip's HF projection has no bias, and the pooled first token is that
    LayerNorm's output, so shifting its bias by c moves the projection by exactly the bias."""
    layers = getattr(getattr(model.text_encoder, "encoder", None), "layer", None)
    norm = getattr(getattr(layers[-1], "output", None), "LayerNorm", None) if layers else None
    if not isinstance(norm, nn.LayerNorm) or norm.bias is None:
        raise ExportError(
            "cannot export to open_clip: the text projection has a bias, open_clip's Hugging Face text "
            "projection has none, and the text encoder does not end in a LayerNorm to take it"
        )
    weight, bias = model.text_proj.weight.double(), model.text_proj.bias.double()
    shift = torch.linalg.pinv(weight) @ bias
    if (weight @ shift - bias).abs().max() > 1e-6 * (1 + bias.abs().max()):
        raise ExportError(
            f"cannot export to open_clip: the text projection's bias is not reachable from its "
            f"{weight.shape[1]} inputs (embed_dim {weight.shape[0]}), and open_clip's Hugging Face text "
            "projection has no bias"
        )
    name = next(n for n, p in model.text_encoder.named_parameters() if p is norm.bias)
    return name, shift


def open_clip_files(
    model: CLIPModel, tokenizer: PreTrainedTokenizerBase, state: dict, out: Path
) -> tuple[dict, dict, dict]:
    """(open_clip_config.json, timm's image_encoder/config.json, open_clip state dict); raises
    ExportError naming the part open_clip's config cannot express. ``out``: the final folder,
    which the config names by its absolute path (open_clip resolves the towers' folders so)."""
    text_config = model.text_encoder.config
    if text_config.model_type not in OPEN_CLIP_TEXT_TYPES:
        raise ExportError(
            f"cannot export to open_clip: the text encoder is a {text_config.model_type!r} model; open_clip's "
            f"Hugging Face text tower pools the first token only for {', '.join(OPEN_CLIP_TEXT_TYPES)}"
        )
    if tokenizer.pad_token_id != text_config.pad_token_id:
        raise ExportError(
            f"cannot export to open_clip: its text tower masks the tokens equal to the config's pad_token_id "
            f"{text_config.pad_token_id}, the tokenizer pads with {tokenizer.pad_token_id}"
        )
    norm_bias, shift = _text_bias_shift(model)
    arch = architecture_of(state)
    scale, bias = logit_scale_and_bias(state)
    out = out.resolve()
    model_cfg = {
        "embed_dim": arch["embed_dim"],
        "init_logit_scale": scale,
        "vision_cfg": {
            # timm's own local-folder form carries the architecture arguments (img_size, depth, ...)
            "timm_model_name": f"local-dir:{out / IMAGE_ENCODER_FOLDER}",
            "timm_model_pretrained": False,
            "timm_pool": "",  # keep the network's own pooling, as num_classes=0 does here
            "timm_proj": "linear",
            "timm_proj_bias": True,
            "image_size": arch["image_res"],
        },
        "text_cfg": {
            "hf_model_name": str(out / TEXT_ENCODER_FOLDER),
            "hf_tokenizer_name": str(out / TEXT_ENCODER_FOLDER),
            "hf_model_pretrained": False,
            "hf_pooler_type": "cls_last_hidden_state_pooler",  # cls_pooler would take BERT's pooler head
            "hf_proj_type": "linear",
            "context_length": arch["max_words"],
            "vocab_size": text_config.vocab_size,
            # lower case, ASCII punctuation removed: pre_caption's cleaning but for punctuation
            # inside words and apostrophes (README, "Exporting a model")
            "tokenizer_kwargs": {"clean": "canonicalize"},
        },
    }
    if bias is not None:
        model_cfg["init_logit_bias"] = bias
    preprocess_cfg = {
        "size": arch["image_res"],
        "mode": "RGB",
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    timm_config = {
        "architecture": arch["image_encoder"],
        "model_args": {**arch["image_encoder_kwargs"], "num_classes": 0},
        "pretrained_cfg": {
            "input_size": [3, arch["image_res"], arch["image_res"]],
            "interpolation": "bicubic",
            "mean": list(MEAN),
            "std": list(STD),
            "crop_pct": 1.0,
            "num_classes": 0,
        },
    }
    weights = {f"visual.trunk.{k}": v for k, v in model.visual.state_dict().items()}
    weights["visual.head.proj.weight"] = model.vision_proj.weight
    weights["visual.head.proj.bias"] = model.vision_proj.bias
    for k, v in model.text_encoder.state_dict().items():
        weights[f"text.transformer.{k}"] = (v.double() + shift).float() if k == norm_bias else v
    weights["text.proj.weight"] = model.text_proj.weight
    weights["logit_scale"] = torch.tensor(scale)
    if bias is not None:
        weights["logit_bias"] = torch.tensor(bias)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    return config, timm_config, weights


class _Embedder(nn.Module):
    """What the torchscript export traces: the model's two encoders and its logit scale/bias."""

    def __init__(self, model: CLIPModel, scale: float, bias: float | None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("logit_scale", torch.tensor(scale))
        if bias is not None:
            self.register_buffer("logit_bias", torch.tensor(bias))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def _trace(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, state: dict) -> torch.jit.ScriptModule:
    res = architecture_of(state)["image_res"]
    tokens = tokenizer(["a photo", "an example of a longer caption"], padding="longest", return_tensors="pt")
    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8)
    inputs = {"encode_image": (images,), "encode_text": (tokens["input_ids"], tokens["attention_mask"])}
    # the tracer warns of the Python branches on the attention mask; with a mask given they do not
    # depend on the inputs (the tests run the trace on other batch sizes and lengths)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace_module(_Embedder(model, *logit_scale_and_bias(state)), inputs, check_trace=False)


def _follow_umask(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only files; an export is for sharing, so its
    permissions are those of ordinary new files."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _safe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores neither shared nor non-contiguous tensors (tied embeddings are shared)."""
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Export ``checkpoint`` as ``fmt`` into the new folder ``out`` (absent or empty); returns it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
    out = Path(out).resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty folder")
    model, tokenizer, state = load_model(checkpoint)
    # everything that can fail for this checkpoint happens before the first file is written
    if fmt == "open_clip":
        config, timm_config, weights = open_clip_files(model, tokenizer, state, out)
    elif fmt == "torchscript":
        traced = _trace(model, tokenizer, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = export_config(state, fmt, Path(checkpoint))
        (tmp / "export_config.json").write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save_pretrained(tmp / TEXT_ENCODER_FOLDER)
        model.text_encoder.config.save_pretrained(tmp / TEXT_ENCODER_FOLDER)
        if fmt == "open_clip":
            (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / IMAGE_ENCODER_FOLDER).mkdir()
            (tmp / IMAGE_ENCODER_FOLDER / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
            save_file(_safe(weights), tmp / "open_clip_model.safetensors")
            tokenizer.save_pretrained(tmp)  # open_clip.get_tokenizer("local-dir:...") reads the folder itself
        elif fmt == "torchscript":
            traced.save(str(tmp / "model.pt"))
        else:
            save_file(_safe(model.state_dict()), tmp / "model.safetensors")
        _follow_umask(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint_*.pth of a run (its folder holds text_encoder/)")
    p.add_argument("--format", default="open_clip", choices=FORMATS, help="what to write (default: open_clip)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = export(args.checkpoint, args.format, args.out)
    except (ExportError, PretrainedUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
