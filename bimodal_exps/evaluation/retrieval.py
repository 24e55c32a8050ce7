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


def recall_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor, *, chunk_size: int = 1024
) -> dict[str, float]:
    """Recall@1/5/10 in percent for image->text (``txt_r*``) and text->image (``img_r*``).

    image_emb: [Ni, d], text_emb: [Nt, d] (L2-normalised, cast to float32), txt2img: LongTensor [Nt],
    the image of every caption; every image needs at least one caption. Scores are the float32
    cosine similarities image_emb @ text_emb.T. Each direction takes ``chunk_size`` query rows at a
    time (images, then captions) against all candidates, so memory stays at about
    chunk_size x max(Ni, Nt) scores, and reads its positives from the same block as its candidates.

    Tie rule: the rank of a positive is the number of candidates with a STRICTLY higher score,
    so a candidate that ties with the positive does not push it down. An image is a hit at k when
    its best-ranked caption has rank < k; a caption is a hit at k when its image has rank < k.
    Also returns ``txt_r_mean``, ``img_r_mean`` (means of the three recalls) and ``r_mean``
    (their mean).
    """
    image_emb, text_emb, txt2img = _checked_inputs(image_emb, text_emb, txt2img, chunk_size)
    captions = torch.arange(len(txt2img), device=txt2img.device)
    txt_rank = _positive_ranks(image_emb, text_emb, txt2img, captions, chunk_size)
    img_rank = _positive_ranks(text_emb, image_emb, captions, txt2img, chunk_size)

    metrics = {}
    for prefix, rank in (("txt", txt_rank), ("img", img_rank)):
        for k in RECALL_KS:
            metrics[f"{prefix}_r{k}"] = 100.0 * int((rank < k).sum()) / len(rank)
        metrics[f"{prefix}_r_mean"] = sum(metrics[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _checked_inputs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor, chunk_size: int
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
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


def _positive_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    pair_query: torch.Tensor,
    pair_candidate: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Rank of each query's best positive: LongTensor [Nq].

    queries [Nq, d], candidates [Nc, d]; positive pairs are (pair_query[j], pair_candidate[j]).
    Rank = number of candidates scoring strictly higher than the query's best positive score.
    """
    # Sorting the pairs by query lets each chunk of query rows take a contiguous slice of them.
    order = torch.argsort(pair_query, stable=True)
    pair_query, pair_candidate = pair_query[order], pair_candidate[order]
    starts = torch.arange(0, len(queries) + chunk_size, chunk_size, device=queries.device)
    bounds = torch.searchsorted(pair_query, starts.clamp(max=len(queries))).tolist()

    ranks = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    # Buffers reused across chunks: a fresh 100 MB tensor per chunk would page-fault anew each
    # time on CPU, which costs about a quarter of the time.
    scores_buf = queries.new_empty((min(chunk_size, len(queries)), len(candidates)))
    above_buf = torch.empty_like(scores_buf, dtype=torch.bool)
    for j, q0 in enumerate(range(0, len(queries), chunk_size)):
        q1 = min(q0 + chunk_size, len(queries))
        scores = torch.mm(queries[q0:q1], candidates.T, out=scores_buf[: q1 - q0])  # [c, Nc]
        rows = pair_query[bounds[j] : bounds[j + 1]] - q0
        cols = pair_candidate[bounds[j] : bounds[j + 1]]
        # Positive scores are read from this same matrix, so every comparison below sees
        # identical float32 values and exact ties stay ties.
        best = scores.new_full((q1 - q0,), float("-inf"))
        best.scatter_reduce_(0, rows, scores[rows, cols], reduce="amax")
        above = torch.gt(scores, best[:, None], out=above_buf[: q1 - q0])
        # An int32 count reduces about twice as fast as the default int64 one on CPU.
        ranks[q0:q1] = above.sum(1, dtype=torch.int32)
    return ranks


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
