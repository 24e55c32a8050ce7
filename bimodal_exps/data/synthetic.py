"""Generate the built-in synthetic image-caption dataset in the formats real data comes in.

Layout under ``root`` (spec SYNTHETIC.md; formats DATA.md 1-4)::

    manifest.json                          parameters, vocabularies, counts (written last)
    train/00000.tar, 00000.parquet, 00000_stats.json, ...
                                           webdataset shards exactly as img2dataset writes them
    clip_train/synthetic_val.json          retrieval JSON, 5 captions per image (also _test)
    clip_train/synthetic_train.json        caption-JSON training file (the first train samples)
    images/val/000000.jpg, images/test/..., images/train/KEY.jpg
    zeroshot/images/<shape>/00000.jpg, zeroshot/classnames.txt, zeroshot/templates.txt
    text_encoder/                          WordPiece tokenizer + small BERT config (AutoTokenizer,
                                           AutoConfig and AutoModel.from_config load it offline)

Everything flows from the seed: each shard, split and class draws from its own generator seeded by
(seed, split, id), so files are byte-identical across runs and across worker counts.

    python bimodal_exps/data/synthetic.py --out datasets/synthetic --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

if __package__ in (None, ""):
    # Run as a script: make the `data` package importable, as it is for the rest of the code base.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic_scenes import (
    BACKGROUNDS,
    COLOUR_PROBABILITIES,
    COLOURS,
    MAX_OBJECTS,
    NUM_CAPTION_TEMPLATES,
    POSITIONS,
    SHAPE_PROBABILITIES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    caption_vocabulary,
    draw_scene,
    encode_jpeg,
    sample_scene,
    sample_single_object_scene,
)

logger = logging.getLogger("data.synthetic")

GENERATOR_VERSION = 2  # 2: the text encoder without dropout
# Stands in for every timestamp img2dataset would write (tar mtimes, shard stats), so that files
# are byte-identical across runs: 2024-01-01T00:00:00Z.
FIXED_TIME = 1704067200
# Separate random streams per split, so e.g. val and test never share a seed.
_STREAMS = {"train": 1, "val": 2, "test": 3, "zeroshot": 4}
_DOWNLOAD_ERRORS = (
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
)
ZEROSHOT_TEMPLATES = (
    "a {} .",
    "a picture of a {}",
    "a {} on a plain background",
    "a drawing of a {}",
    "there is a {}",
)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEXT_MAX_POSITIONS = 64
EVAL_CHUNK = 250  # images per parallel task for val/test
# Top-level entries of a dataset root: anything else there means the directory is not ours.
_LAYOUT = {"manifest.json", "train", "clip_train", "images", "zeroshot", "text_encoder"}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Every parameter the generated files depend on (the worker count is not one of them)."""

    seed: int = 0
    train_size: int = 20000  # metadata rows (samples + failed downloads)
    shard_size: int = 1000  # metadata rows per shard
    eval_size: int = 1000  # images in each of val and test
    image_size: int = 64  # pixels, square
    zeroshot_per_class: int = 50
    fail_rate: float = 0.01  # probability a training row "failed to download"
    train_json_size: int = 2000  # samples in clip_train/synthetic_train.json (at most all)
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4

    def __post_init__(self) -> None:
        positive = ("train_size", "shard_size", "eval_size", "zeroshot_per_class")
        for name in (*positive, "text_hidden", "text_layers", "text_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"synthetic dataset: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"synthetic dataset: seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.train_json_size, int) or self.train_json_size < 0:
            raise ValueError(f"synthetic dataset: train_json_size must be >= 0, got {self.train_json_size!r}")
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(
                f"synthetic dataset: image_size must be an integer >= 16 pixels (smaller images "
                f"cannot show the shapes), got {self.image_size!r}"
            )
        if not isinstance(self.fail_rate, (int, float)) or not 0 <= self.fail_rate < 1:
            raise ValueError(f"synthetic dataset: fail_rate must lie in [0, 1), got {self.fail_rate!r}")
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"synthetic dataset: text_hidden ({self.text_hidden}) must be divisible by "
                f"text_heads ({self.text_heads})"
            )

    @property
    def num_shards(self) -> int:
        return math.ceil(self.train_size / self.shard_size)


def _rng(seed: int, split: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[split], *ids])


# ---------------------------------------------------------------- training shards (img2dataset)


def key_digits(shard_size: int) -> int:
    """Digits of the row-in-shard part of a key: ceil(log10(shard_size)), as img2dataset."""
    return math.ceil(math.log10(shard_size)) if shard_size > 1 else 0


def shard_name(shard_id: int, num_shards: int) -> str:
    """Zero-padded shard file stem: 5 digits, more when there are more than 100,000 shards."""
    return f"{shard_id:0{max(5, len(str(num_shards - 1)))}d}"


def train_key(shard_id: int, row: int, shard_size: int) -> str:
    """img2dataset's sample key: shard id then row in shard, zero-padded decimal.

    ``int(key) == shard_id * 10**key_digits(shard_size) + row``, which is the global metadata row
    whenever ``shard_size`` is a power of ten (the default 1000 gives 8-digit keys).
    """
    digits = key_digits(shard_size)
    return f"{shard_id * 10**digits + row:0{5 + digits}d}"


def train_index_space(config: SyntheticConfig) -> int:
    """One more than the largest training key: the size of the per-sample index space."""
    last_rows = config.train_size - (config.num_shards - 1) * config.shard_size
    return (config.num_shards - 1) * 10 ** key_digits(config.shard_size) + last_rows


_PARQUET_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("url", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("attributes", pa.string()),  # JSON text: parquet has no free-form objects
    ]
)


def _row_metadata(key: str, text: str, jpg: bytes | None, error: str | None, size: int) -> dict:
    """img2dataset's per-row metadata; the image fields are None for a failed download."""
    ok = jpg is not None
    return {
        "caption": text,
        "url": f"synthetic://train/{key}",
        "key": key,
        "status": "success" if ok else "failed_to_download",
        "error_message": error,
        "width": size if ok else None,
        "height": size if ok else None,
        "original_width": size if ok else None,
        "original_height": size if ok else None,
        "exif": "{}" if ok else None,
        "sha256": hashlib.sha256(jpg).hexdigest() if ok else None,
    }


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and mtime (webdataset's TarWriter defaults, minus the clock).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_TIME
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_train_shard(out_dir: Path, config: SyntheticConfig, shard_id: int) -> list[str]:
    """Write ``NNNNN.tar``, ``.parquet`` and ``_stats.json`` of one shard; return its captions.

    Rows are visited in key order for the random draws, then written in a shuffled order, as
    img2dataset writes samples in download-completion order.
    """
    rng = _rng(config.seed, "train", shard_id)
    rows = min(config.shard_size, config.train_size - shard_id * config.shard_size)
    records = []  # (metadata, jpg bytes or None)
    for row in range(rows):
        key = train_key(shard_id, row, config.shard_size)
        scene = sample_scene(rng)
        template = int(rng.integers(NUM_CAPTION_TEMPLATES))
        text = caption(scene, template, rng)
        if rng.random() < config.fail_rate:
            jpg, error = None, _DOWNLOAD_ERRORS[int(rng.integers(len(_DOWNLOAD_ERRORS)))]
        else:
            jpg, error = encode_jpeg(draw_scene(scene, config.image_size, rng)), None
        meta = _row_metadata(key, text, jpg, error, config.image_size)
        meta["attributes"] = {**scene.to_dict(), "template": template}
        records.append((meta, jpg))
    records = [records[int(i)] for i in rng.permutation(rows)]

    stem = out_dir / shard_name(shard_id, config.num_shards)
    with tarfile.open(f"{stem}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for meta, jpg in records:
            if jpg is None:
                continue
            key = meta["key"]
            _add_tar_member(tar, f"{key}.jpg", jpg)
            _add_tar_member(tar, f"{key}.json", json.dumps(meta, indent=4).encode())
            _add_tar_member(tar, f"{key}.txt", meta["caption"].encode())

    columns = {name: [meta[name] for meta, _ in records] for name in _PARQUET_SCHEMA.names}
    columns["attributes"] = [json.dumps(attributes) for attributes in columns["attributes"]]
    pq.write_table(pa.table(columns, schema=_PARQUET_SCHEMA), f"{stem}.parquet")

    statuses = Counter(meta["error_message"] or "success" for meta, _ in records)
    successes = statuses.pop("success", 0)
    stats = {
        "count": rows,
        "successes": successes,
        "failed_to_download": rows - successes,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": float(FIXED_TIME),
        "end_time": float(FIXED_TIME),
        "status_dict": {"success": successes, **dict(sorted(statuses.items()))},
    }
    Path(f"{stem}_stats.json").write_text(json.dumps(stats, indent=4))
    return [meta["caption"] for meta, jpg in records if jpg is not None]


def _read_shard_samples(tar_path: Path) -> dict[str, tuple[bytes, str]]:
    """``{key: (jpg bytes, caption)}`` of one shard written by :func:`write_train_shard`."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (parts["jpg"], parts["txt"].decode()) for key, parts in samples.items()}


def _write_train_caption_json(root: Path, config: SyntheticConfig) -> int:
    """Copy the first ``train_json_size`` training samples (by key) to caption-JSON form."""
    image_dir = root / "images" / "train"
    image_dir.mkdir(parents=True)
    entries: list[dict] = []
    for shard_id in range(config.num_shards):
        if len(entries) >= config.train_json_size:
            break
        samples = _read_shard_samples(root / "train" / f"{shard_name(shard_id, config.num_shards)}.tar")
        for key in sorted(samples)[: config.train_json_size - len(entries)]:
            jpg, text = samples[key]
            (image_dir / f"{key}.jpg").write_bytes(jpg)
            entries.append({"image": f"train/{key}.jpg", "caption": text, "image_id": int(key)})
    (root / "clip_train" / "synthetic_train.json").write_text(json.dumps(entries, indent=1))
    return len(entries)


# ---------------------------------------------------------------- evaluation splits


def sample_unique_scenes(seed: int, split: str, count: int) -> list[Scene]:
    """``count`` scenes from the training distribution, no two alike (background + objects)."""
    rng = _rng(seed, split, 0)
    scenes: dict[Scene, None] = {}  # insertion-ordered set
    for _ in range(100 * count):
        scenes.setdefault(sample_scene(rng))
        if len(scenes) == count:
            return list(scenes)
    raise ValueError(f"could not draw {count} distinct scenes for {split}; lower eval_size")


def _eval_image_name(index: int, count: int) -> str:
    return f"{index:0{max(6, len(str(count - 1)))}d}.jpg"


def write_eval_images(
    root: Path, config: SyntheticConfig, split: str, start: int, scenes: Sequence[Scene]
) -> list[list[str]]:
    """Draw images ``start, start+1, ...`` of an eval split; return their five captions each."""
    captions = []
    for offset, scene in enumerate(scenes):
        index = start + offset
        rng = _rng(config.seed, split, 1, index)
        image = draw_scene(scene, config.image_size, rng)
        name = _eval_image_name(index, config.eval_size)
        (root / "images" / split / name).write_bytes(encode_jpeg(image))
        captions.append([caption(scene, t, rng) for t in range(NUM_CAPTION_TEMPLATES)])
    return captions


def _write_retrieval_json(root: Path, split: str, scenes: list[Scene], captions: list[list[str]]) -> None:
    # MSCOCO-style entries; "attributes" is an extra key real readers ignore.
    entries = [
        {
            "image": f"{split}/{_eval_image_name(i, len(scenes))}",
            "caption": texts,
            "attributes": scene.to_dict(),
        }
        for i, (scene, texts) in enumerate(zip(scenes, captions, strict=True))
    ]
    (root / "clip_train" / f"synthetic_{split}.json").write_text(json.dumps(entries, indent=1))


# ---------------------------------------------------------------- zero-shot classification

ZEROSHOT_CLASSES = tuple(sorted(SHAPES))  # ImageFolder's class order is the sorted folder order


def write_zeroshot_class(root: Path, config: SyntheticConfig, class_index: int) -> list[str]:
    """Draw the single-object images of one shape class; return their file names."""
    shape = ZEROSHOT_CLASSES[class_index]
    rng = _rng(config.seed, "zeroshot", class_index)
    folder = root / "zeroshot" / "images" / shape
    folder.mkdir(parents=True)
    names = [f"{i:05d}.jpg" for i in range(config.zeroshot_per_class)]
    for name in names:
        image = draw_scene(sample_single_object_scene(rng, shape), config.image_size, rng)
        (folder / name).write_bytes(encode_jpeg(image))
    return names


# ---------------------------------------------------------------- text encoder


def wordpiece_vocabulary(corpus: Sequence[str]) -> list[str]:
    """Special tokens, then every character (word-initial and ``##`` continuation) and every
    whole word of the BERT-normalised, pre-tokenised corpus, sorted.

    This is where the ``tokenizers`` WordPiece trainer ends up on a closed vocabulary like this
    one, minus its intermediate merges; the trainer itself is not used because its tie-breaking
    varies from process to process, which would break byte-identical regeneration.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = set()
    for line in corpus:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    pieces = words | {w[0] for w in words} | {f"##{c}" for w in words for c in w[1:]}
    return [*SPECIAL_TOKENS, *sorted(pieces - set(SPECIAL_TOKENS))]


def build_tokenizer(vocabulary: Sequence[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer (lower-casing, ``[CLS] $A [SEP]``) over ``vocabulary``."""
    ids = {token: i for i, token in enumerate(vocabulary)}
    tokenizer = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return tokenizer


def write_text_encoder(out_dir: Path, corpus: Sequence[str], config: SyntheticConfig) -> int:
    """Save tokenizer and BERT config into one folder; return the vocabulary size."""
    # transformers takes seconds to import and only this step needs it.
    from transformers import BertConfig, BertTokenizerFast

    vocabulary = wordpiece_vocabulary(corpus)
    tokenizer = BertTokenizerFast(tokenizer_object=build_tokenizer(vocabulary), model_max_length=TEXT_MAX_POSITIONS)
    tokenizer.save_pretrained(out_dir)
    BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        intermediate_size=4 * config.text_hidden,
        max_position_embeddings=TEXT_MAX_POSITIONS,
        # no dropout: on this noise-free data it does not help the default run, and its random
        # masks cost a quarter of the text tower's CPU step
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).save_pretrained(out_dir)
    return len(vocabulary)


# ---------------------------------------------------------------- orchestration


def _call(task: Callable[[], object]) -> object:
    return task()


def _run_tasks(tasks: list[Callable[[], object]], workers: int) -> list[object]:
    """Run independent tasks, in a process pool when ``workers > 1``; results in task order."""
    if workers <= 1:
        return _collect(map(_call, tasks), len(tasks))
    with multiprocessing.get_context().Pool(workers) as pool:
        return _collect(pool.imap(_call, tasks), len(tasks))


def _collect(iterator: Iterator[object], total: int) -> list[object]:
    results = []
    for done, result in enumerate(iterator, start=1):
        results.append(result)
        if done == total or done % max(1, total // 4) == 0:
            logger.info("drawing: %d/%d tasks done", done, total)
    return results


def _write_dataset(root: Path, config: SyntheticConfig, workers: int) -> dict:
    """Write every file except the manifest into ``root``; return the manifest's counts."""
    for folder in ("train", "clip_train", "images/val", "images/test", "zeroshot/images"):
        (root / folder).mkdir(parents=True)
    splits = ("val", "test")
    eval_scenes = {split: sample_unique_scenes(config.seed, split, config.eval_size) for split in splits}
    tasks = [  # (output group, task); each task returns a list, concatenated per group in order
        ("train", functools.partial(write_train_shard, root / "train", config, shard_id))
        for shard_id in range(config.num_shards)
    ]
    tasks += [
        (
            split,
            functools.partial(write_eval_images, root, config, split, start, scenes[start : start + EVAL_CHUNK]),
        )
        for split, scenes in eval_scenes.items()
        for start in range(0, config.eval_size, EVAL_CHUNK)
    ]
    tasks += [
        ("zeroshot", functools.partial(write_zeroshot_class, root, config, c)) for c in range(len(ZEROSHOT_CLASSES))
    ]
    outputs: dict[str, list] = {"train": [], "val": [], "test": [], "zeroshot": []}
    for (group, _), result in zip(tasks, _run_tasks([task for _, task in tasks], workers), strict=True):
        outputs[group].extend(result)
    train_captions = outputs["train"]
    for split in splits:
        _write_retrieval_json(root, split, eval_scenes[split], outputs[split])
    train_json_samples = _write_train_caption_json(root, config)

    (root / "zeroshot" / "classnames.txt").write_text("".join(f"{name}\n" for name in ZEROSHOT_CLASSES))
    (root / "zeroshot" / "templates.txt").write_text("".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES))
    prompts = [t.format(name) for t in ZEROSHOT_TEMPLATES for name in ZEROSHOT_CLASSES]
    logger.info("writing the text encoder folder")
    vocab_size = write_text_encoder(
        root / "text_encoder", [*train_captions, *prompts, " ".join(caption_vocabulary())], config
    )
    return {
        "train_samples": len(train_captions),
        "train_json_samples": train_json_samples,
        "vocab_size": vocab_size,
    }


def _manifest(config: SyntheticConfig, counts: dict) -> dict:
    last_shard = shard_name(config.num_shards - 1, config.num_shards)
    first_shard = shard_name(0, config.num_shards)
    return {
        "generator": "bimodal_exps/data/synthetic.py",
        "version": GENERATOR_VERSION,
        "parameters": dataclasses.asdict(config),
        "vocabularies": {
            "shapes": dict(zip(SHAPES, SHAPE_PROBABILITIES.tolist(), strict=True)),
            "colours": {
                name: {"rgb": list(rgb), "probability": p}
                for (name, rgb), p in zip(COLOURS.items(), COLOUR_PROBABILITIES.tolist(), strict=True)
            },
            "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "objects_per_image": list(range(1, MAX_OBJECTS + 1)),
            "frequencies": "shapes and colours p(rank k) ~ 1/(k+1); all else uniform",
            "caption_templates": NUM_CAPTION_TEMPLATES,
        },
        "splits": {
            "train": {
                "shards": f"train/{{{first_shard}..{last_shard}}}.tar",
                "num_shards": config.num_shards,
                "rows": config.train_size,
                "samples": counts["train_samples"],
                "failed_to_download": config.train_size - counts["train_samples"],
                "key_digits": 5 + key_digits(config.shard_size),
                "index_space": train_index_space(config),
            },
            "train_json": {
                "file": "clip_train/synthetic_train.json",
                "image_root": "images",
                "samples": counts["train_json_samples"],
            },
            **{
                split: {
                    "file": f"clip_train/synthetic_{split}.json",
                    "image_root": "images",
                    "images": config.eval_size,
                }
                for split in ("val", "test")
            },
            "zeroshot": {
                "image_folder": "zeroshot/images",
                "classnames": "zeroshot/classnames.txt",
                "templates": "zeroshot/templates.txt",
                "classes": len(ZEROSHOT_CLASSES),
                "images_per_class": config.zeroshot_per_class,
            },
        },
        "text_encoder": {"path": "text_encoder", "vocab_size": counts["vocab_size"]},
    }


def _required_files(config: SyntheticConfig) -> list[str]:
    """Files whose presence (beside a matching manifest) marks a complete dataset."""
    stems = [f"train/{shard_name(i, config.num_shards)}" for i in range(config.num_shards)]
    files = [f"{stem}{suffix}" for stem in stems for suffix in (".tar", ".parquet", "_stats.json")]
    files += [f"clip_train/synthetic_{split}.json" for split in ("train", "val", "test")]
    files += ["zeroshot/classnames.txt", "zeroshot/templates.txt"]
    files += ["text_encoder/config.json", "text_encoder/tokenizer.json", "text_encoder/tokenizer_config.json"]
    return files


def _read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(root: str | Path, config: SyntheticConfig) -> bool:
    """Whether ``root`` holds a finished dataset generated with exactly ``config``."""
    root = Path(root)
    manifest = _read_manifest(root)
    return (
        manifest is not None
        and manifest.get("version") == GENERATOR_VERSION
        and manifest.get("parameters") == dataclasses.asdict(config)
        and all((root / name).is_file() for name in _required_files(config))
    )


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a directory that holds anything the generator did not write."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"synthetic dataset root {root} is a file; pass a directory path")
    foreign = sorted({p.name for p in root.iterdir()} - _LAYOUT) if root.is_dir() else []
    if foreign:
        raise FileExistsError(
            f"{root} holds {', '.join(foreign[:5])}, which the synthetic generator did not write; "
            f"refusing to replace it. Point the dataset root at a new or empty directory."
        )


def _generate(root: Path, config: SyntheticConfig, workers: int) -> Path:
    """(Re)generate the dataset at ``root`` (caller holds the lock), atomically: it is built in a
    temporary sibling directory and renamed into place only when complete. Returns ``root``."""
    _check_replaceable(root)
    partial = root.parent / f".{root.name}.partial"
    retired = root.parent / f".{root.name}.old"
    for stale in (partial, retired):
        if stale.exists():
            logger.info("removing %s left by an interrupted generation", stale)
            shutil.rmtree(stale)
    logger.info("generating the synthetic dataset into %s (seed %d, %d workers)", root, config.seed, workers)
    start = time.perf_counter()
    partial.mkdir(parents=True)
    counts = _write_dataset(partial, config, workers)
    (partial / "manifest.json").write_text(json.dumps(_manifest(config, counts), indent=2) + "\n")
    if root.exists():
        root.rename(retired)
    partial.rename(root)
    if retired.exists():
        shutil.rmtree(retired)
    logger.info("synthetic dataset ready at %s after %.1f s", root, time.perf_counter() - start)
    return root


def ensure_synthetic_dataset(
    root: str | Path, seed: int = 0, workers: int = 2, force: bool = False, **sizes: int | float
) -> Path:
    """Return ``root`` holding a complete synthetic dataset with these parameters, generating
    it only when it is absent, incomplete or made with different parameters (always if ``force``).

    ``sizes`` are the other fields of :class:`SyntheticConfig` (train_size, shard_size,
    eval_size, image_size, zeroshot_per_class, fail_rate, train_json_size, text_hidden,
    text_layers, text_heads). ``workers`` only changes speed, never the files. Safe to call from
    several processes at once: one generates while the others wait on a lock file beside ``root``.
    """
    known = {f.name for f in dataclasses.fields(SyntheticConfig)} - {"seed"}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s) {unknown}; expected some of {sorted(known)}")
    config = SyntheticConfig(seed=seed, **sizes)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_complete(root, config):
            logger.info("reusing the complete synthetic dataset at %s", root)
            return root
        manifest = _read_manifest(root)
        if manifest is not None and not force:
            old = manifest.get("parameters") or {}
            changed = sorted(k for k, v in dataclasses.asdict(config).items() if old.get(k) != v)
            logger.info("synthetic dataset at %s differs in %s (or is incomplete): regenerating it", root, changed)
        return _generate(root, config, workers)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        description="Generate the built-in synthetic image-caption dataset (spec SYNTHETIC.md). "
        "Reuses a complete dataset with the same parameters unless --force is given."
    )
    parser.add_argument("--out", default="datasets/synthetic", help="dataset root directory")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed every file depends on")
    parser.add_argument(
        "--train_size",
        type=int,
        default=defaults.train_size,
        help="training metadata rows (samples + failures)",
    )
    parser.add_argument("--shard_size", type=int, default=defaults.shard_size, help="metadata rows per train shard")
    parser.add_argument("--eval_size", type=int, default=defaults.eval_size, help="images in each of val and test")
    parser.add_argument("--image_size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument(
        "--zeroshot_per_class",
        type=int,
        default=defaults.zeroshot_per_class,
        help="zero-shot images per shape",
    )
    parser.add_argument(
        "--fail_rate",
        type=float,
        default=defaults.fail_rate,
        help="fraction of train rows that 'failed to download'",
    )
    parser.add_argument(
        "--train_json_size",
        type=int,
        default=defaults.train_json_size,
        help="training samples also written as caption JSON (clip_train/synthetic_train.json)",
    )
    parser.add_argument("--text_hidden", type=int, default=defaults.text_hidden, help="BERT hidden size")
    parser.add_argument("--text_layers", type=int, default=defaults.text_layers, help="BERT layers")
    parser.add_argument("--text_heads", type=int, default=defaults.text_heads, help="BERT attention heads")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing images (files do not depend on it)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
    start = time.perf_counter()
    root = ensure_synthetic_dataset(args.out, workers=args.workers, force=args.force, **sizes)
    manifest = _read_manifest(root)
    train = manifest["splits"]["train"]
    print(
        f"synthetic dataset at {root}: {train['samples']} train samples in {train['num_shards']} shards, "
        f"{args.eval_size} val + {args.eval_size} test images ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
