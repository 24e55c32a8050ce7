"""Image transforms and caption cleaning shared by training and evaluation."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms

# CLIP's normalisation constants, as in the original code base.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_PUNCTUATION = re.compile(r"[^\w\s']|_")
_SPACES = re.compile(r"\s+")


def pre_caption(caption: str, max_words: int) -> str:
    """Lower-case, drop punctuation, collapse white space, keep the first ``max_words`` words."""
    words = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower())).strip().split(" ")
    return " ".join(words[:max_words])


def train_transform(
    image_res: int, crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor [3, image_res, image_res]."""
    steps: list = [
        transforms.RandomResizedCrop(image_res, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


def eval_transform(image_res: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``image_res`` and centre-crop: [3, image_res, image_res]."""
    return transforms.Compose(
        [
            transforms.Resize(image_res, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_res),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
