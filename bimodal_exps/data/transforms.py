"""Image transforms and caption cleaning shared by training and evaluation.

Images stay ``uint8`` from the decoder to the device: the crops and resizes work on uint8
tensors (torchvision's vectorised uint8 resampling, fastest on the channels-last layout that
PIL's pixel buffer has), batches travel as uint8 (a quarter of the float32 bytes) and the model
normalises them on the device (``models.model_clip.CLIPModel.encode_image``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

_PUNCTUATION = re.compile(r"[^\w\s']|_")
_SPACES = re.compile(r"\s+")


def pre_caption(caption: str, max_words: int) -> str:
    """Lower-case, drop punctuation, collapse white space, keep the first ``max_words`` words."""
    words = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower())).strip().split(" ")
    return " ".join(words[:max_words])


def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] RGB, a view of its pixel buffer (channels-last strides); a
    tensor is returned as it is."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def train_transform(
    image_res: int, crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [3, H, W] -> uint8 [3, image_res, image_res]: random resized crop (bicubic, as the
    original set-up), optional horizontal flip; normalisation happens on the device."""
    steps: list = [
        v2.RandomResizedCrop(image_res, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(image_res: int) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """A PIL image or uint8 [3, H, W] -> uint8 [3, image_res, image_res]: the short side resized
    to ``image_res`` (bicubic), then the centre crop."""
    return v2.Compose(
        [
            to_uint8_tensor,
            v2.Resize(image_res, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_res),
        ]
    )
