"""Image-text retrieval: embed a split once, then recall@k in both directions (DATA.md 3)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm import tqdm

import parallel
from data.retrieval_split import ImagePathDataset, RetrievalSplit
from data.transforms import eval_transform, pre_caption
from data.workers import DataLoader

RECALL_KS = (1, 5, 10)
TABLE_COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


# Images x captions per score block: a block (8 MB on a CPU) stays in cache while the ranks of its
# rows and columns are counted; on a GPU larger blocks keep the device busy.
CPU_BLOCK = (1024, 2048)
GPU_BLOCK = (4096, 16384)


def recall_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    txt2img: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 in percent for image->text (``txt_r*``) and text->image (``img_r*``).

    image_emb: [Ni, d], text_emb: [Nt, d] (L2-normalised, cast to float32), txt2img: LongTensor [Nt],
    the image of every caption; every image needs at least one caption. Scores are the float32
    cosine similarities image_emb @ text_emb.T, computed block by block (``block_size`` images x
    captions; default CPU_BLOCK or GPU_BLOCK), so memory stays at one block however large the split
    (100k x 500k needs the embeddings and a few MB).

    Tie rule: the rank of a positive is the number of candidates with a STRICTLY higher score,
    so a candidate that ties with the positive does not push it down. An image is a hit at k when
    its best-ranked caption has rank < k; a caption is a hit at k when its image has rank < k.
    Also returns ``txt_r_mean``, ``img_r_mean`` (means of the three recalls) and ``r_mean``
    (their mean).

    Every score block serves both directions: its rows are counted for the images, its columns
    for the captions, so the score product is computed once. A positive is never counted against
    itself or its image's other captions (by index), so the positives' scores may come from a
    cheaper product of the pairs alone.
    """
    image_emb, text_emb, txt2img = _checked_inputs(image_emb, text_emb, txt2img)
    if block_size is None:
        block_size = GPU_BLOCK if image_emb.device.type == "cuda" else CPU_BLOCK
    bi, bt = block_size
    if bi < 1 or bt < 1:
        raise ValueError(f"block_size must be two positive numbers, got {block_size}")
    n_img, n_txt = len(image_emb), len(text_emb)
    n_row_blocks, n_col_blocks = math.ceil(n_img / bi), math.ceil(n_txt / bt)

    # the positives' scores: each caption's with its image, each image's best caption
    best_txt = (image_emb[txt2img] * text_emb).sum(1)
    best_img = image_emb.new_full((n_img,), float("-inf")).scatter_reduce_(0, txt2img, best_txt, reduce="amax")
    # the positive pairs (image, caption) of each block, to leave out of its counts
    captions = torch.arange(n_txt, device=txt2img.device)
    pair_block = (txt2img // bi) * n_col_blocks + captions // bt
    order = torch.argsort(pair_block, stable=True)
    blocks, counts = torch.unique_consecutive(pair_block[order], return_counts=True)
    ends = torch.cumsum(counts, 0)
    pairs_of = {b: order[e - n : e] for b, n, e in zip(blocks.tolist(), counts.tolist(), ends.tolist(), strict=True)}

    # every block once: candidates scoring strictly above the positive, along rows and columns.
    # Buffers reused across blocks: fresh ones would page-fault anew every time on a CPU.
    txt_rank = torch.zeros(n_img, dtype=torch.int32, device=image_emb.device)
    img_rank = torch.zeros(n_txt, dtype=torch.int32, device=image_emb.device)
    score_buf = image_emb.new_empty(min(bi, n_img) * min(bt, n_txt))
    # comparisons written as float 0/1 and summed in float32 (exact below 2**24): three times
    # faster on a CPU than a bool result summed as integers, which converts it first
    above_buf = torch.empty_like(score_buf)
    for r in range(n_row_blocks):
        rows = slice(r * bi, (r + 1) * bi)
        for c in range(n_col_blocks):
            cols = slice(c * bt, (c + 1) * bt)
            images, texts = image_emb[rows], text_emb[cols]
            block = torch.mm(images, texts.T, out=score_buf[: len(images) * len(texts)].view(len(images), -1))
            above = above_buf[: block.numel()].view(block.shape)
            txt_rank[rows] += torch.gt(block, best_img[rows, None], out=above).sum(1).to(torch.int32)
            img_rank[cols] += torch.gt(block, best_txt[None, cols], out=above).sum(0).to(torch.int32)
            pairs = pairs_of.get(r * n_col_blocks + c)
            if pairs is not None:  # a positive above the pair's own score is no candidate
                image, caption = txt2img[pairs], captions[pairs]
                value = block[image - r * bi, caption - c * bt]
                txt_rank.index_add_(0, image, -(value > best_img[image]).to(torch.int32))
                img_rank.index_add_(0, caption, -(value > best_txt[caption]).to(torch.int32))

    metrics = {}
    for prefix, rank in (("txt", txt_rank), ("img", img_rank)):
        for k in RECALL_KS:
            metrics[f"{prefix}_r{k}"] = 100.0 * int((rank < k).sum()) / len(rank)
        metrics[f"{prefix}_r_mean"] = sum(metrics[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _checked_inputs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected image_emb [Ni, d] and text_emb [Nt, d] with the same d, "
            f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ValueError("recall needs at least one image and one caption")
    if txt2img.dtype.is_floating_point or txt2img.shape != (len(text_emb),):
        raise ValueError(
            f"txt2img must be an integer tensor [Nt] = [{len(text_emb)}], got {txt2img.dtype} {tuple(txt2img.shape)}"
        )
    txt2img = txt2img.to(device=image_emb.device, dtype=torch.long)
    if int(txt2img.min()) < 0 or int(txt2img.max()) >= len(image_emb):
        raise ValueError(f"txt2img holds image indices outside [0, {len(image_emb)})")
    captions_per_image = torch.bincount(txt2img, minlength=len(image_emb))
    if int(captions_per_image.min()) == 0:
        lonely = (captions_per_image == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one caption; images {lonely}... have none")
    image_emb, text_emb = image_emb.float(), text_emb.to(image_emb.device).float()
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        raise ValueError("embeddings contain NaN or infinite values; the model produced non-finite features")
    return image_emb, text_emb, txt2img


@torch.no_grad()
def embed_retrieval_split(
    model: nn.Module,
    split: RetrievalSplit,
    tokenizer,
    *,
    image_res: int,
    max_words: int,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image and caption once: (image_emb [Ni, d], text_emb [Nt, d]), float32 on ``device``.

    ``model`` must already sit on ``device`` and provide ``encode_image`` and ``encode_text``.
    With several ranks, each rank embeds a contiguous slice of the images and of the captions
    and the slices are gathered, so every rank returns the full matrices in file order.
    ``amp_dtype`` (e.g. torch.bfloat16) runs the encoders under autocast. The model runs in
    eval mode; its previous train/eval mode is restored on return.
    """
    device = torch.device(device)
    n_img, n_txt = len(split.image_paths), len(split.captions)
    world, rank = parallel.world_size(), parallel.rank()
    if min(n_img, n_txt) < world:
        raise ValueError(
            f"the split has {n_img} images and {n_txt} captions, fewer than the {world} ranks; "
            "evaluate it on fewer processes"
        )
    images = ImagePathDataset(
        split.image_paths[n_img * rank // world : n_img * (rank + 1) // world], eval_transform(image_res)
    )
    captions = split.captions[n_txt * rank // world : n_txt * (rank + 1) // world]
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    progress = parallel.progress_bar(
        total=len(loader) + math.ceil(len(captions) / batch_size), desc="embedding split", unit="batch"
    )
    with evaluating(model), progress:
        image_parts = []
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for batch, _ in loader:
                image_parts.append(model.encode_image(batch.to(device, non_blocking=True)).float())
                progress.update()
        text_emb = encode_texts(
            model,
            captions,
            tokenizer,
            max_words=max_words,
            batch_size=batch_size,
            device=device,
            amp_dtype=amp_dtype,
            progress=progress,
        )
    return parallel.all_gather_cat(torch.cat(image_parts)), parallel.all_gather_cat(text_emb)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: list[str],
    tokenizer,
    *,
    max_words: int,
    batch_size: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """``model.encode_text`` over ``texts`` in batches: float32 [len(texts), d] on ``device``.

    Each text is cleaned with pre_caption(text, max_words) and tokenized to at most
    ``max_words`` tokens, padded to the longest in its batch. Uses the model in its current mode.
    """
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    device = torch.device(device)
    parts = []
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                [pre_caption(t, max_words) for t in texts[start : start + batch_size]],
                padding="longest",
                truncation=True,
                max_length=max_words,
                return_tensors="pt",
            )
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            parts.append(model.encode_text(ids, mask).float())
            if progress is not None:
                progress.update()
    return torch.cat(parts)


def evaluate_retrieval(
    model: nn.Module,
    split: RetrievalSplit,
    tokenizer,
    *,
    image_res: int,
    max_words: int,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Embed ``split`` (in parallel over ranks) and return its recall metrics (see recall_metrics)."""
    image_emb, text_emb = embed_retrieval_split(
        model,
        split,
        tokenizer,
        image_res=image_res,
        max_words=max_words,
        batch_size=batch_size,
        workers=workers,
        device=device,
        amp_dtype=amp_dtype,
    )
    return recall_metrics(image_emb, text_emb, split.txt2img)


def format_recall_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Fixed-width text table: one line per (name, metrics), recall columns with two decimals."""
    name_width = max([len("model"), *(len(name) for name, _ in rows)])
    lines = [f"{'model':<{name_width}}" + "".join(f" {col:>8}" for col in TABLE_COLUMNS)]
    for name, metrics in rows:
        lines.append(f"{name:<{name_width}}" + "".join(f" {metrics[col]:>8.2f}" for col in TABLE_COLUMNS))
    return "\n".join(lines)
