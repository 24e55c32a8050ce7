"""Zero-shot classification on a tiny image folder of solid colours, where a test model's class
ranking is known in advance (nearest palette colour), plus the shipped class-name files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models._meta import _IMAGENET_CATEGORIES

from data.transforms import pre_caption
from evaluation.zeroshot import ZEROSHOT_DATA, build_zeroshot_classifier, evaluate_zeroshot, zeroshot_dataset
from test_retrieval import TinyModel, free_port, init_gloo, make_tokenizer

PALETTE = {
    "black": (10, 10, 10),
    "blue": (30, 60, 200),
    "green": (40, 180, 60),
    "red": (220, 30, 30),
    "white": (245, 245, 245),
    "yellow": (230, 220, 40),
}
TEMPLATES = ["a {} square", "a picture of a {}", "{} on a plain background"]
# (class folder, colour actually drawn): the first two images of every class are drawn right.
MISLABELLED = [("black", "white"), ("red", "blue"), ("yellow", "red"), ("green", "yellow"), ("blue", "green")]
EVAL_KW = {"image_res": 16, "max_words": 12, "batch_size": 4, "workers": 0, "device": "cpu"}


def write_colour_folder(root: Path, classes: list[str], mislabelled: list[tuple[str, str]]) -> list[tuple]:
    """The synthetic zero-shot layout: images/<class>/*.jpg, classnames.txt, templates.txt.

    Returns (class, drawn colour) for every image written.
    """
    drawn = [(c, c) for c in classes for _ in range(2)] + mislabelled
    for n, (cls, colour) in enumerate(drawn):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), PALETTE[colour]).save(root / "images" / cls / f"{n:05d}.jpg", quality=95)
    (root / "classnames.txt").write_text("\n".join(sorted(classes)) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return drawn


def tokenizer_for(classes: list[str]):
    words = {w for t in TEMPLATES for c in classes for w in pre_caption(t.replace("{}", c), 50).split()}
    return make_tokenizer(sorted(words))


class ColourModel(nn.Module):
    """Ranks classes by how close the image's mean colour is to each class's palette colour.

    encode_text maps a prompt to the one-hot vector of the class word it contains; encode_image
    to softmax(-distance to every palette colour), so image @ class_k falls as the distance grows.
    """

    def __init__(self, classnames: list[str], tokenizer):
        super().__init__()
        table = torch.zeros(len(tokenizer), len(classnames))
        for k, name in enumerate(classnames):
            table[tokenizer.convert_tokens_to_ids(name), k] = 1.0
        self.register_buffer("word_to_class", table)
        self.register_buffer("palette", torch.tensor([PALETTE[c] for c in classnames]) / 255.0)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.float().mean(dim=(2, 3)) / 255.0  # uint8 images
        dist = torch.cdist(rgb, self.palette)  # [b, C]
        return F.normalize(torch.softmax(-dist / 0.05, dim=1), dim=1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize((self.word_to_class[input_ids] * attention_mask[..., None]).sum(1), dim=1)


def expected_accuracy(drawn: list[tuple[str, str]], classes: list[str]) -> dict[str, float]:
    """A class is in the top k when fewer than k palette colours lie closer to the drawn colour."""
    k = min(5, len(classes))
    top1 = top5 = 0
    for cls, colour in drawn:
        dist = {c: np.linalg.norm(np.subtract(PALETTE[c], PALETTE[colour])) for c in classes}
        closer = sum(d < dist[cls] for d in dist.values())
        top1 += closer == 0
        top5 += closer < k
    return {"zs_top1": 100.0 * top1 / len(drawn), "zs_top5": 100.0 * top5 / len(drawn)}


@pytest.mark.parametrize("classes", [sorted(PALETTE), ["black", "red", "white"]])
def test_imagefolder_accuracy_matches_known_predictions(tmp_path, classes):
    mislabelled = [(c, m) for c, m in MISLABELLED if c in classes and m in classes]
    drawn = write_colour_folder(tmp_path, classes, mislabelled)
    tokenizer = tokenizer_for(classes)
    model = ColourModel(sorted(classes), tokenizer)
    model.train()
    want = expected_accuracy(drawn, classes)
    if len(classes) > 5:
        assert want["zs_top1"] < want["zs_top5"] < 100  # the set-up exercises both kinds of miss
    else:
        assert want["zs_top5"] == 100 > want["zs_top1"]  # top-5 of 3 classes is top-3
    got = evaluate_zeroshot(model, "imagefolder", tmp_path, tokenizer, **EVAL_KW)
    assert got == pytest.approx(want)
    assert model.training, "the model's train mode must be restored"


class UnevenNormModel(TinyModel):
    """Text embeddings whose norm grows with the prompt length, to show that prompts are normalised."""

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().encode_text(input_ids, attention_mask) * attention_mask.sum(1, keepdim=True)


def test_classifier_is_the_renormalised_mean_of_normalised_prompts():
    classes = ["red", "green", "blue", "white"]
    tokenizer = tokenizer_for(classes)
    model = UnevenNormModel(len(tokenizer), dim=8)
    got = build_zeroshot_classifier(model, classes, TEMPLATES, tokenizer, max_words=12, device="cpu", batch_size=5)
    columns = []
    with torch.no_grad():
        for name in classes:
            prompts = []
            for template in TEMPLATES:
                tokens = tokenizer([template.replace("{}", name)], return_tensors="pt")
                emb = model.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
                prompts.append(emb / emb.norm())
            mean = torch.stack(prompts).mean(0)
            columns.append(mean / mean.norm())
    assert got.shape == (8, 4)
    torch.testing.assert_close(got, torch.stack(columns, dim=1), rtol=0, atol=1e-6)


def test_zeroshot_errors(tmp_path):
    tokenizer = tokenizer_for(["red"])
    model = TinyModel(len(tokenizer))
    with pytest.raises(ValueError, match="cifar10, cifar100, imagenet, imagefolder"):
        zeroshot_dataset("mnist", tmp_path, 16)
    for name in ("cifar10", "cifar100"):
        with pytest.raises(FileNotFoundError, match="nothing is downloaded") as err:
            zeroshot_dataset(name, tmp_path / "cifar", 16)
        assert str(tmp_path / "cifar") in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        zeroshot_dataset("imagefolder", tmp_path / "missing_folder", 16)

    write_colour_folder(tmp_path / "zs", ["red", "blue"], [])
    (tmp_path / "zs" / "classnames.txt").write_text("red\nblue\ngreen\n")
    with pytest.raises(ValueError, match="3 names but images/ has 2 class folders"):
        zeroshot_dataset("imagefolder", tmp_path / "zs", 16)
    with pytest.raises(ValueError, match="1000"):
        zeroshot_dataset("imagenet", tmp_path / "zs" / "images", 16)
    with pytest.raises(ValueError, match="a photo of"):
        build_zeroshot_classifier(model, ["red"], ["a photo of"], tokenizer, max_words=12, device="cpu")


def test_shipped_class_names_and_templates():
    def lines(path: Path) -> list[str]:
        return path.read_text().splitlines()

    # CIFAR-10's label order as published with the dataset.
    assert lines(ZEROSHOT_DATA / "cifar10" / "classnames.txt") == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    # CIFAR-100's fine labels are numbered in alphabetical order of their underscore names.
    cifar100 = [c.replace(" ", "_") for c in lines(ZEROSHOT_DATA / "cifar100" / "classnames.txt")]
    assert len(set(cifar100)) == 100 and cifar100 == sorted(cifar100)
    assert {"aquarium_fish", "maple_tree", "sweet_pepper", "willow_tree", "worm"} <= set(cifar100)
    for name in ("cifar10", "cifar100", "imagenet"):
        templates = lines(ZEROSHOT_DATA / name / "templates.txt")
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert len(_IMAGENET_CATEGORIES) == 1000


def _zeroshot_worker(rank: int, world: int, port: int, root: str) -> None:
    init_gloo(rank, world, port)
    try:
        classes = sorted(PALETTE)
        tokenizer = tokenizer_for(classes)
        got = evaluate_zeroshot(ColourModel(classes, tokenizer), "imagefolder", root, tokenizer, **EVAL_KW)
        torch.save(got, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    classes = sorted(PALETTE)
    write_colour_folder(tmp_path, classes, MISLABELLED)  # 17 images: uneven slices
    tokenizer = tokenizer_for(classes)
    want = evaluate_zeroshot(ColourModel(classes, tokenizer), "imagefolder", tmp_path, tokenizer, **EVAL_KW)
    mp.spawn(_zeroshot_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == want
