"""The two-tower model: a timm image encoder and a HuggingFace text encoder, each followed
by a linear projection to a shared, L2-normalised embedding space."""

from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

# CLIP's image normalisation constants (RGB, for pixels in [0, 1]), as in the original code base.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class PretrainedUnavailableError(RuntimeError):
    """Weights, a config or a tokenizer could not be loaded (typically: offline, not cached)."""


def _offline_help(what: str, fill_cache: str, original: Exception, weights: bool) -> PretrainedUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    return PretrainedUnavailableError(
        f"could not load {what} ({type(original).__name__}: {str(original).splitlines()[0][:200]}). "
        f"{'HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and n' if offline else 'N'}othing is downloaded "
        "unless the machine can reach the Hugging Face Hub. To provide it: on a machine with internet run "
        f"`{fill_cache}` and copy its cache (~/.cache/huggingface, or $HF_HOME) to this machine or point "
        "HF_HOME at a shared copy; or pass a local folder instead of a hub name"
        + ("; or leave out --init_model to start from random weights." if weights else ".")
    )


# Where a run keeps its text encoder's config and tokenizer, so that resuming and evaluating
# its checkpoints need neither the hub nor its cache.
TEXT_ENCODER_FOLDER = "text_encoder"


def text_encoder_source(name: str, run_dir: str | os.PathLike | None) -> str:
    """The folder a run stored its text encoder's files in, when it exists, else ``name``."""
    if run_dir is not None:
        folder = os.path.join(run_dir, TEXT_ENCODER_FOLDER)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    return name


def save_text_encoder(run_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, model: CLIPModel) -> None:
    """Store the text encoder's config and tokenizer in ``run_dir/text_encoder`` (once)."""
    folder = os.path.join(run_dir, TEXT_ENCODER_FOLDER)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        tokenizer.save_pretrained(folder)
        model.text_encoder.config.save_pretrained(folder)


def load_tokenizer(text_encoder: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a HF hub name or a local folder (the synthetic dataset writes one)."""
    try:
        return AutoTokenizer.from_pretrained(text_encoder)
    except (OSError, ValueError) as err:
        raise _offline_help(
            f"the tokenizer of --text_encoder {text_encoder!r}",
            f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{text_encoder}')\"",
            err,
            weights=False,
        ) from err


def build_image_encoder(name: str, pretrained: bool, kwargs: dict | None = None) -> nn.Module:
    """Any timm model with its classifier removed: images [b,3,H,W] -> features [b, num_features]."""
    if not timm.is_model(name):
        raise ValueError(f"unknown --image_encoder {name!r}: not a timm model name (see timm.list_models())")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **(kwargs or {}))
    except Exception as err:  # timm raises many kinds when the hub is unreachable
        if not pretrained:
            raise
        raise _offline_help(
            f"pretrained weights of --image_encoder {name!r} (--init_model)",
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"",
            err,
            weights=True,
        ) from err


def build_text_encoder(name: str, pretrained: bool) -> nn.Module:
    """HF AutoModel: (input_ids, attention_mask) -> last_hidden_state [b, L, hidden]."""
    try:
        if pretrained:
            return AutoModel.from_pretrained(name)
        return AutoModel.from_config(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as err:
        what = "pretrained weights" if pretrained else "the config"
        call = "AutoModel.from_pretrained" if pretrained else "AutoConfig.from_pretrained"
        raise _offline_help(
            f"{what} of --text_encoder {name!r}",
            f"python -c \"from transformers import {call.split('.')[0]}; {call}('{name}')\"",
            err,
            weights=pretrained,
        ) from err


class CLIPModel(nn.Module):
    """Image and text towers with projections to ``embed_dim``.

    ``forward(images, input_ids, attention_mask)`` returns the L2-normalised image and
    text features, each [b, embed_dim] (``normalize=False``: the projections themselves).
    Images arrive as uint8 [b, 3, H, W] (0-255) and are normalised here, on the model's device,
    with CLIP's mean and std.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int) -> None:
        super().__init__()
        if getattr(text_encoder, "pooler", None) is not None:
            # BERT-style pooler head: unused (the first token represents the text), and unused
            # parameters would stall DistributedDataParallel.
            text_encoder.pooler = None
        self.visual = image_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(image_encoder.num_features, embed_dim)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, embed_dim)
        # x / 255 - mean) / std as one multiply-add; not saved (constants)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -torch.tensor(MEAN).view(1, 3, 1, 1) / std, persistent=False)
        self.channels_last = False

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images uint8 [b,3,H,W] -> [b, embed_dim], unit norm (the projection itself when not
        ``normalize``)."""
        pixels = torch.addcmul(self.pixel_shift, images.float(), self.pixel_scale)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        feat = self.vision_proj(self.visual(pixels))
        return F.normalize(feat, dim=-1) if normalize else feat

    def configure(self, *, channels_last: bool, grad_checkpointing: bool, compile: bool) -> CLIPModel:
        """Speed and memory options: the image encoder in channels-last layout (``--channels_last``;
        faster convolutions on GPUs), activations recomputed in the backward (timm's and Hugging
        Face's gradient checkpointing), the encoders compiled (torch.compile). Returns the model."""
        self.channels_last = channels_last
        if channels_last:
            self.visual.to(memory_format=torch.channels_last)
        if grad_checkpointing:
            self.visual.set_grad_checkpointing(True)
            self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile:  # in place: the parameters keep their names, so checkpoints are the same
            self.visual.compile()
            self.text_encoder.compile()
        return self

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """token ids and mask [b, L] -> [b, embed_dim], unit norm (the projection itself when not
        ``normalize``); the first ([CLS]) token represents the text."""
        mask = self._attention_mask_4d(attention_mask)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        feat = self.text_proj(hidden[:, 0])
        return F.normalize(feat, dim=-1) if normalize else feat

    def _attention_mask_4d(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[b, L] of 0/1 -> [b, 1, 1, L], the form Hugging Face models take as it is: given a 2D
        mask they first ask whether it masks anything (``mask.all()``), a device sync every step.
        SDPA attention takes booleans (True: attend), eager attention an additive bias."""
        keep = attention_mask[:, None, None, :].bool()
        if self.text_encoder.config._attn_implementation == "eager":
            return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, torch.finfo(torch.float32).min)
        return keep

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images, normalize), self.encode_text(input_ids, attention_mask, normalize)


def build_model(
    image_encoder: str,
    text_encoder: str,
    embed_dim: int,
    pretrained: bool = False,
    image_encoder_kwargs: dict | None = None,
) -> CLIPModel:
    """The CLIP model; ``pretrained`` loads both encoders' weights from the libraries' caches
    (``--init_model``), otherwise they are built from their architecture alone (random weights,
    or weights that a checkpoint then provides)."""
    return CLIPModel(
        build_image_encoder(image_encoder, pretrained, image_encoder_kwargs),
        build_text_encoder(text_encoder, pretrained),
        embed_dim,
    )
