"""Zero-shot classification: prompt embeddings as a linear classifier over image embeddings (DATA.md 4)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.models._meta import _IMAGENET_CATEGORIES

import parallel
from data.transforms import eval_transform
from data.workers import DataLoader
from evaluation.retrieval import encode_texts, evaluating

ZEROSHOT_DATA = Path(__file__).resolve().parent / "zeroshot_data"
ZEROSHOT_DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder")
_CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


@torch.no_grad()
def build_zeroshot_classifier(
    model: nn.Module,
    classnames: list[str],
    templates: list[str],
    tokenizer,
    *,
    max_words: int,
    device: torch.device | str,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class weights [d, C]: per class, the mean of its normalised prompt embeddings, renormalised.

    Each template holds ``{}`` where the class name goes, e.g. "a photo of a {}.".
    """
    if not classnames or not templates:
        raise ValueError(f"need class names and templates, got {len(classnames)} and {len(templates)}")
    unfilled = [t for t in templates if "{}" not in t]
    if unfilled:
        raise ValueError(f"every prompt template needs a '{{}}' for the class name; these have none: {unfilled}")
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    with evaluating(model):
        emb = encode_texts(
            model,
            prompts,
            tokenizer,
            max_words=max_words,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
        )
    per_class = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1).T


@torch.no_grad()
def evaluate_zeroshot(
    model: nn.Module,
    name: str,
    folder: str | os.PathLike,
    tokenizer,
    *,
    image_res: int,
    max_words: int,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 and top-min(5, C) accuracy in percent: {"zs_top1": ..., "zs_top5": ...}.

    ``name`` is one of ZEROSHOT_DATASETS (see zeroshot_dataset for the folder layouts). With several
    ranks each rank classifies a contiguous slice of the images and the hit counts are summed.
    """
    device = torch.device(device)
    dataset, classnames, templates = zeroshot_dataset(name, folder, image_res)
    n, world, rank = len(dataset), parallel.world_size(), parallel.rank()
    shard = Subset(dataset, range(n * rank // world, n * (rank + 1) // world))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    k = min(5, len(classnames))
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1 hits, top-k hits

    classifier = build_zeroshot_classifier(
        model, classnames, templates, tokenizer, max_words=max_words, device=device, amp_dtype=amp_dtype
    )
    with evaluating(model):
        for images, labels in parallel.progress_bar(loader, desc=f"zero-shot {name}"):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                features = model.encode_image(images.to(device, non_blocking=True))
            # Scores in float32, outside autocast, as for retrieval.
            logits = features.float() @ classifier
            correct = logits.topk(k, dim=1).indices == labels.to(device)[:, None]  # [b, k]
            hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()])
    hits = parallel.all_gather_cat(hits[None]).sum(0)
    return {"zs_top1": 100.0 * int(hits[0]) / n, "zs_top5": 100.0 * int(hits[1]) / n}


def zeroshot_dataset(name: str, folder: str | os.PathLike, image_res: int) -> tuple[Dataset, list[str], list[str]]:
    """(dataset of (image [3, image_res, image_res], label), class names, prompt templates).

    cifar10 / cifar100: torchvision's on-disk layout under ``folder`` (test split; never downloaded).
    imagenet: the validation set as an ImageFolder, one folder per class in the standard order.
    imagefolder: ``folder/images/<class>/*``, ``folder/classnames.txt`` (sorted folder order),
    ``folder/templates.txt``.
    """
    folder = os.fspath(folder)
    transform = eval_transform(image_res)
    if name in _CIFAR:
        return _cifar(name, folder, transform)
    if name == "imagenet":
        dataset = _image_folder(folder, "ImageNet-1k validation", transform)
        if len(dataset.classes) != len(_IMAGENET_CATEGORIES):
            raise ValueError(
                f"{folder} has {len(dataset.classes)} class folders; ImageNet-1k validation needs "
                f"{len(_IMAGENET_CATEGORIES)}, one per WordNet id (n01440764, ...)"
            )
        return dataset, list(_IMAGENET_CATEGORIES), _read_lines(ZEROSHOT_DATA / "imagenet" / "templates.txt")
    if name == "imagefolder":
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"zero-shot image folder not found: {folder}")
        dataset = _image_folder(os.path.join(folder, "images"), "zero-shot images", transform)
        classnames = _read_lines(Path(folder) / "classnames.txt")
        if len(classnames) != len(dataset.classes):
            raise ValueError(
                f"{folder}/classnames.txt lists {len(classnames)} names but images/ has "
                f"{len(dataset.classes)} class folders; write one name per folder, in sorted folder order"
            )
        return dataset, classnames, _read_lines(Path(folder) / "templates.txt")
    raise ValueError(f"unknown zero-shot dataset {name!r}; choose one of {', '.join(ZEROSHOT_DATASETS)}")


def _cifar(name: str, folder: str, transform) -> tuple[Dataset, list[str], list[str]]:
    cifar = _CIFAR[name]
    extracted = os.path.join(folder, cifar.base_folder)
    if not os.path.isdir(extracted):
        raise FileNotFoundError(
            f"{name} not found: expected torchvision's extracted folder {extracted} "
            f"(the python version of the dataset); nothing is downloaded at run time"
        )
    try:
        dataset = cifar(folder, train=False, download=False, transform=transform)
    except RuntimeError as e:  # torchvision's checksum test failed
        raise RuntimeError(
            f"{name} files under {extracted} are incomplete or corrupted ({e}); "
            "replace them with the original archive's contents; nothing is downloaded at run time"
        ) from e
    classnames = _read_lines(ZEROSHOT_DATA / name / "classnames.txt")
    if [c.replace(" ", "_") for c in classnames] != dataset.classes:
        raise ValueError(f"{ZEROSHOT_DATA / name / 'classnames.txt'} does not match the labels of {extracted}")
    return dataset, classnames, _read_lines(ZEROSHOT_DATA / name / "templates.txt")


def _image_folder(root: str, what: str, transform) -> datasets.ImageFolder:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} folder not found: {root} (expected one sub-folder per class)")
    return datasets.ImageFolder(root, transform=transform)


def _read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file."""
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]
