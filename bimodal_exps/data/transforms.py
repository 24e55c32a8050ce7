"""Image transforms and caption cleaning shared by training and evaluation.

Images stay ``uint8`` from the decoder to the device: the crops and resizes work on uint8
tensors (torchvision's vectorised uint8 resampling, fastest on the channels-last layout that
PIL's pixel buffer has), batches travel as uint8 (a quarter of the float32 bytes) and the model
normalises them on the device (``models.model_clip.CLIPModel.encode_image``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


class TrainAugment:
    """uint8 [3, H, W] -> uint8 [3, image_res, image_res]: a random resized crop (bicubic,
    antialiased, as the original set-up; area in ``crop_scale``, aspect ratio in [3/4, 4/3], the
    sampling of torchvision's RandomResizedCrop) and, with ``hflip``, a random horizontal flip.

    The random draws come from the ``rng`` of each call, so a sample's augmentation depends on its
    own seed alone, and torch's global generator is never touched. Normalisation happens on the
    device (in the model).
    """

    RATIO = (3 / 4, 4 / 3)

    def __init__(self, image_res: int, crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True) -> None:
        self.image_res, self.crop_scale, self.hflip = image_res, crop_scale, hflip

    def crop_box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width)."""
        area = height * width
        log_ratio = (math.log(self.RATIO[0]), math.log(self.RATIO[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # no box fits in 10 draws: the largest centred box inside the aspect range
        aspect = width / height
        if aspect < self.RATIO[0]:
            w, h = width, round(width / self.RATIO[0])
        elif aspect > self.RATIO[1]:
            w, h = round(height * self.RATIO[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1], rng)
        size = [self.image_res, self.image_res]
        out = TF.resized_crop(image, top, left, h, w, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and rng.random() < 0.5:
            out = out.flip(-1)
        return out


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
