"""The evaluations of a run: every configured retrieval split (and zero-shot set), logged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from data.retrieval_split import RetrievalSplit, load_retrieval_split
from evaluation.retrieval import evaluate_retrieval
from evaluation.zeroshot import evaluate_zeroshot


@dataclass
class EvalSplit:
    name: str  # the JSON file's stem, e.g. "coco_test"
    kind: str  # "val" or "test"
    split: RetrievalSplit


def load_eval_splits(files: list[tuple[str, str | None, str]]) -> list[EvalSplit]:
    """``(kind, json_path or None, image_root)`` -> the splits to evaluate; images are checked up front."""
    return [EvalSplit(Path(path).stem, kind, load_retrieval_split(path, root)) for kind, path, root in files if path]


class EvalSuite:
    """Runs the evaluations and hands each result (a flat dict) and the step to ``record``."""

    def __init__(
        self,
        splits: list[EvalSplit],
        zeroshot: tuple[str, str] | None,
        tokenizer,
        record: Callable[[dict, int], None],
        *,
        image_res: int,
        max_words: int,
        batch_size: int,
        workers: int,
        device: torch.device,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.splits, self.zeroshot, self.tokenizer, self.record = splits, zeroshot, tokenizer, record
        self.kwargs = dict(
            image_res=image_res,
            max_words=max_words,
            batch_size=batch_size,
            workers=workers,
            device=device,
            amp_dtype=amp_dtype,
        )

    def __call__(
        self, model, kinds: tuple[str, ...], tag: str, epoch: int, step: int, zeroshot: bool = True
    ) -> dict[str, dict[str, float]]:
        """Metrics by name for the retrieval splits of ``kinds`` (and zero-shot when asked)."""
        results = {}
        for s in self.splits:
            if s.kind in kinds:
                results[s.name] = evaluate_retrieval(model, s.split, self.tokenizer, **self.kwargs)
                self._log(s.name, s.kind, tag, epoch, step, results[s.name])
        if self.zeroshot and zeroshot:
            name, folder = self.zeroshot
            results[f"zeroshot_{name}"] = evaluate_zeroshot(model, name, folder, self.tokenizer, **self.kwargs)
            self._log(name, "zeroshot", tag, epoch, step, results[f"zeroshot_{name}"])
        return results

    def has(self, kind: str) -> bool:
        return any(s.kind == kind for s in self.splits)

    def _log(self, dataset: str, split: str, tag: str, epoch: int, step: int, metrics: dict) -> None:
        self.record({"dataset": dataset, "split": split, "tag": tag, "epoch": epoch, "step": step, **metrics}, step)
