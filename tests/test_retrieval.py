"""Retrieval evaluation: split loading, recall metrics against a brute-force reference, embedding
passes on real JPEGs, and a 2-process gloo run that must match the single-process result.

The tiny model and tokenizer defined here are reused by test_zeroshot.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import PreTrainedTokenizerFast

from data.retrieval_split import load_retrieval_split
from data.transforms import eval_transform, pre_caption
from evaluation.retrieval import (
    embed_retrieval_split,
    evaluate_retrieval,
    format_recall_table,
    recall_metrics,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
EMBED_KW = {"image_res": 16, "max_words": 12, "batch_size": 2, "workers": 0, "device": "cpu"}


# ---------------------------------------------------------------- helpers shared with test_zeroshot


def make_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (plus [PAD], [UNK]), built offline."""
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in sorted(set(words)):
        vocab[w] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


class TinyModel(nn.Module):
    """encode_image: mean colour -> linear; encode_text: masked sum of token embeddings.

    Both use only per-sample elementwise work and short fixed-order reductions, so a sample's
    embedding does not depend on which batch it sits in.
    """

    def __init__(self, vocab_size: int, dim: int = 8, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.colour = nn.Parameter(torch.randn(3, dim, generator=gen))
        self.tokens = nn.Parameter(torch.randn(vocab_size, dim, generator=gen))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(2, 3))  # [b, 3] of uint8 images
        return F.normalize((mean[:, :, None] * self.colour).sum(1), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.tokens[input_ids] * attention_mask[..., None]
        return F.normalize(emb.sum(1), dim=-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


# ------------------------------------------------------------------------------- recall metrics


def brute_force_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: list[int]) -> dict:
    """Per-query loops; rank = number of candidates with a strictly higher score."""
    scores = (image_emb.float() @ text_emb.float().T).numpy()
    n_img, n_txt = scores.shape
    txt_rank = []
    for i in range(n_img):
        best = max(scores[i, t] for t in range(n_txt) if txt2img[t] == i)
        txt_rank.append(sum(1 for t in range(n_txt) if scores[i, t] > best))
    img_rank = []
    for t in range(n_txt):
        positive = scores[txt2img[t], t]
        img_rank.append(sum(1 for i in range(n_img) if scores[i, t] > positive))
    out = {}
    for prefix, ranks in (("txt", txt_rank), ("img", img_rank)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def random_txt2img(n_img: int, gen: torch.Generator, shuffle: bool) -> torch.Tensor:
    counts = torch.randint(1, 8, (n_img,), generator=gen)  # 1 to 7 captions per image
    txt2img = torch.repeat_interleave(torch.arange(n_img), counts)
    return txt2img[torch.randperm(len(txt2img), generator=gen)] if shuffle else txt2img


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [(1, 1), (7, 3), (16, 64), (1000, 1000)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_recall_matches_brute_force_on_random_embeddings(device, block_size, shuffle):
    gen = torch.Generator().manual_seed(block_size[0] + 100 * shuffle)
    txt2img = random_txt2img(37, gen, shuffle)
    # A shared component makes scores correlated, so recalls land strictly between 0 and 100.
    image_emb = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    text_emb = F.normalize(image_emb[txt2img] + 0.9 * torch.randn(len(txt2img), 16, generator=gen), dim=1)
    want = brute_force_recall(image_emb, text_emb, txt2img.tolist())
    got = recall_metrics(image_emb.to(device), text_emb.to(device), txt2img.to(device), block_size=block_size)
    assert_same_metrics(got, want)
    assert 0 < want["txt_r1"] < 100 and 0 < want["img_r10"] < 100


@pytest.mark.parametrize("block_size", [(3, 5), (10, 2), (64, 64)])
def test_recall_matches_brute_force_with_ties(block_size):
    # Entries of +-1/4 in 16 dimensions: unit vectors whose scores are exact multiples of 1/16 in any
    # summation order, drawn from a small pool so that duplicate embeddings and ties abound.
    gen = torch.Generator().manual_seed(block_size[0])
    pool = (torch.randint(0, 2, (6, 16), generator=gen) * 2 - 1) / 4
    image_emb = pool[torch.randint(0, 6, (29,), generator=gen)]
    txt2img = random_txt2img(29, gen, shuffle=True)
    text_emb = pool[torch.randint(0, 6, (len(txt2img),), generator=gen)]
    want = brute_force_recall(image_emb, text_emb, txt2img.tolist())
    assert_same_metrics(recall_metrics(image_emb, text_emb, txt2img, block_size=block_size), want)


def test_ties_do_not_push_a_positive_down():
    # Two identical images, each with one caption equal to it: every score is 1, nothing is
    # strictly higher, so every query is a hit at 1 (a "greater or equal" rule would give 50).
    emb = F.normalize(torch.ones(2, 4), dim=1)
    metrics = recall_metrics(emb, emb.clone(), torch.tensor([0, 1]))
    assert metrics["txt_r1"] == 100.0 and metrics["img_r1"] == 100.0


def test_perfect_embeddings_score_100():
    gen = torch.Generator().manual_seed(0)
    image_emb = F.normalize(torch.randn(23, 32, generator=gen), dim=1)
    txt2img = random_txt2img(23, gen, shuffle=True)
    metrics = recall_metrics(image_emb, image_emb[txt2img], txt2img, block_size=(5, 5))
    assert all(value == 100.0 for value in metrics.values())


def test_recall_rejects_bad_input():
    emb = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match="same d"):
        recall_metrics(emb, torch.randn(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="outside"):
        recall_metrics(emb, emb, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"images \[2\]"):
        recall_metrics(emb, emb, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        recall_metrics(emb, emb, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        recall_metrics(emb, emb * float("nan"), torch.tensor([0, 1, 2]))


def test_format_recall_table():
    metrics = {
        "txt_r1": 1.0,
        "txt_r5": 12.345,
        "txt_r10": 100.0,
        "img_r1": 0.004,
        "img_r5": 5.5,
        "img_r10": 9.999,
        "txt_r_mean": 0.0,
        "img_r_mean": 0.0,
        "r_mean": 33.333,
    }
    lines = format_recall_table([("untrained", metrics), ("epoch 3", metrics)]).splitlines()
    assert lines[0].split() == [
        "model",
        "txt_r1",
        "txt_r5",
        "txt_r10",
        "img_r1",
        "img_r5",
        "img_r10",
        "r_mean",
    ]
    assert lines[1].split() == ["untrained", "1.00", "12.35", "100.00", "0.00", "5.50", "10.00", "33.33"]
    assert lines[2].startswith("epoch 3 ")
    assert len({len(line) for line in lines}) == 1  # fixed width


# ------------------------------------------------------------------------------ split loading


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
CAPTIONS = [
    ["a red circle.", "the red one"],
    ["a green square on the left"],
    ["a blue star", "big blue star", "a small blue star at the top!"],
    ["a red and green square"],
    ["the circle is blue", "an small star"],
]
WORDS = sorted({word for caps in CAPTIONS for c in caps for word in pre_caption(c, 50).split()})


def write_split(root: Path) -> Path:
    """Five real JPEGs under root/images/val and an MSCOCO-style JSON naming them."""
    (root / "images" / "val").mkdir(parents=True)
    entries = []
    for n, (colour, caps) in enumerate(zip(COLOURS, CAPTIONS, strict=True)):
        Image.new("RGB", (20 + 4 * n, 24), colour).save(root / "images" / "val" / f"{n:03d}.jpg", quality=90)
        entries.append({"image": f"val/{n:03d}.jpg", "caption": caps})
    json_path = root / "split.json"
    json_path.write_text(json.dumps(entries))
    return json_path


def test_load_retrieval_split(tmp_path):
    split = load_retrieval_split(write_split(tmp_path), tmp_path / "images")
    assert split.image_paths == [str(tmp_path / "images" / "val" / f"{n:03d}.jpg") for n in range(5)]
    assert split.captions == [c for caps in CAPTIONS for c in caps]
    assert split.txt2img.dtype == torch.long
    assert split.txt2img.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4]
    assert split.img2txt == [[0, 1], [2], [3, 4, 5], [6], [7, 8]]


def test_load_retrieval_split_errors(tmp_path):
    json_path = write_split(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_retrieval_split(tmp_path / "nope.json", tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="no_images"):
        load_retrieval_split(json_path, tmp_path / "no_images")

    (tmp_path / "images" / "val" / "001.jpg").unlink()
    (tmp_path / "images" / "val" / "003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 5 images .*001\.jpg.*003\.jpg"):
        load_retrieval_split(json_path, tmp_path / "images")

    for bad_entry in ({"image": "val/000.jpg", "caption": "not a list"}, {"caption": ["x"]}, "val/000.jpg"):
        json_path.write_text(json.dumps([{"image": "val/000.jpg", "caption": ["ok"]}, bad_entry]))
        with pytest.raises(ValueError, match="entry 1"):
            load_retrieval_split(json_path, tmp_path / "images")


# ------------------------------------------------------------------------------ embedding passes


def one_by_one(model: TinyModel, split, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference embeddings: every image and caption encoded on its own, in file order."""
    transform = eval_transform(EMBED_KW["image_res"])
    with torch.no_grad():
        images = [model.encode_image(transform(Image.open(p).convert("RGB"))[None]) for p in split.image_paths]
        texts = []
        for caption in split.captions:
            tokens = tokenizer([pre_caption(caption, EMBED_KW["max_words"])], return_tensors="pt")
            texts.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
    return torch.cat(images), torch.cat(texts)


@pytest.mark.parametrize("workers", [0, 1])
def test_embed_retrieval_split_keeps_file_order(tmp_path, workers):
    split = load_retrieval_split(write_split(tmp_path), tmp_path / "images")
    tokenizer = make_tokenizer(WORDS)
    model = TinyModel(len(tokenizer))
    model.train()
    image_emb, text_emb = embed_retrieval_split(model, split, tokenizer, **{**EMBED_KW, "workers": workers})
    want_images, want_texts = one_by_one(model, split, tokenizer)
    assert image_emb.shape == (5, 8) and text_emb.shape == (9, 8)
    torch.testing.assert_close(image_emb, want_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(text_emb, want_texts, rtol=0, atol=1e-6)
    assert model.training, "the model's train mode must be restored"


def test_evaluate_retrieval_equals_metrics_of_the_embeddings(tmp_path):
    split = load_retrieval_split(write_split(tmp_path), tmp_path / "images")
    tokenizer = make_tokenizer(WORDS)
    model = TinyModel(len(tokenizer))
    image_emb, text_emb = one_by_one(model, split, tokenizer)
    want = brute_force_recall(image_emb, text_emb, split.txt2img.tolist())
    assert_same_metrics(evaluate_retrieval(model, split, tokenizer, **EMBED_KW), want)


def _embed_worker(rank: int, world: int, port: int, root: str) -> None:
    init_gloo(rank, world, port)
    try:
        split = load_retrieval_split(Path(root) / "split.json", Path(root) / "images")
        tokenizer = make_tokenizer(WORDS)
        model = TinyModel(len(tokenizer))
        image_emb, text_emb = embed_retrieval_split(model, split, tokenizer, **EMBED_KW)
        metrics = evaluate_retrieval(model, split, tokenizer, **EMBED_KW)
        torch.save({"image": image_emb, "text": text_emb, "metrics": metrics}, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    # 5 images and 9 captions do not split evenly over 2 ranks.
    split = load_retrieval_split(write_split(tmp_path), tmp_path / "images")
    tokenizer = make_tokenizer(WORDS)
    model = TinyModel(len(tokenizer))
    want_images, want_texts = embed_retrieval_split(model, split, tokenizer, **EMBED_KW)
    want_metrics = recall_metrics(want_images, want_texts, split.txt2img)

    mp.spawn(_embed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["image"], want_images)
        assert torch.equal(got["text"], want_texts)
        assert got["metrics"] == want_metrics


def test_embed_under_autocast_returns_float32(tmp_path):
    split = load_retrieval_split(write_split(tmp_path), tmp_path / "images")
    tokenizer = make_tokenizer(WORDS)
    model = TinyModel(len(tokenizer))
    want_images, want_texts = embed_retrieval_split(model, split, tokenizer, **EMBED_KW)
    got_images, got_texts = embed_retrieval_split(model, split, tokenizer, **EMBED_KW, amp_dtype=torch.bfloat16)
    assert got_images.dtype == got_texts.dtype == torch.float32
    torch.testing.assert_close(got_images, want_images, rtol=0, atol=2e-2)
    torch.testing.assert_close(got_texts, want_texts, rtol=0, atol=2e-2)
