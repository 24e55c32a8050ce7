"""Retrieval evaluation splits: the MSCOCO-style JSON with several captions per image.

Each entry of the JSON list is ``{"image": "<path under image_root>", "caption": [str, ...]}``.
Caption ``k`` of entry ``n`` belongs to image ``n``; captions are numbered in file order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.transforms import to_uint8_tensor

# How many missing image paths an error message lists before summarising the rest.
_MISSING_SHOWN = 5


@dataclass(frozen=True)
class RetrievalSplit:
    """Images and captions of one retrieval split.

    image_paths: absolute image paths, one per entry [Ni].
    captions: raw caption strings in file order [Nt].
    txt2img: LongTensor [Nt], the image index of every caption.
    img2txt: for every image, the indices of its captions.
    """

    image_paths: list[str]
    captions: list[str]
    txt2img: torch.Tensor
    img2txt: list[list[int]]


def load_retrieval_split(json_path: str | os.PathLike, image_root: str | os.PathLike) -> RetrievalSplit:
    """Read a retrieval JSON and check that every image file it names exists under ``image_root``."""
    json_path, image_root = os.fspath(json_path), os.fspath(image_root)
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"retrieval annotation file not found: {json_path}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root directory not found: {image_root} (needed by {json_path})")
    with open(json_path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{json_path}: expected a non-empty JSON list of {{'image': ..., 'caption': [...]}}")

    image_paths: list[str] = []
    captions: list[str] = []
    img2txt: list[list[int]] = []
    for n, entry in enumerate(entries):
        _check_entry(entry, n, json_path)
        image_paths.append(os.path.abspath(os.path.join(image_root, entry["image"])))
        img2txt.append(list(range(len(captions), len(captions) + len(entry["caption"]))))
        captions.extend(entry["caption"])

    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN])
        raise FileNotFoundError(
            f"{len(missing)} of {len(image_paths)} images listed in {json_path} are missing under "
            f"{image_root}, e.g. {shown}"
        )
    txt2img = torch.tensor([n for n, caps in enumerate(img2txt) for _ in caps], dtype=torch.long)
    return RetrievalSplit(image_paths, captions, txt2img, img2txt)


def _check_entry(entry: object, n: int, json_path: str) -> None:
    where = f"{json_path}: entry {n}"
    if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
        raise ValueError(f"{where} must be an object with keys 'image' and 'caption', got {entry!r:.200}")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise ValueError(f"{where}: 'image' must be a non-empty path string, got {entry['image']!r:.200}")
    caps = entry["caption"]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"{where}: 'caption' must be a non-empty list of strings, got {caps!r:.200}")


class ImagePathDataset(Dataset):
    """Images read from a list of paths: item ``i`` is (transform(uint8 RGB [3, H, W]), i)."""

    def __init__(self, paths: list[str], transform: Callable[[torch.Tensor], torch.Tensor]):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                rgb = to_uint8_tensor(image)
        except OSError as e:
            raise OSError(f"cannot read evaluation image {path}: {e}") from e
        return self.transform(rgb), i
