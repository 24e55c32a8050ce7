"""The synthetic dataset generator: determinism, img2dataset layout, eval/zero-shot files,
captions, long tail, text encoder folder, and safe (re)generation."""

import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.synthetic import (
    SyntheticConfig,
    ensure_synthetic_dataset,
    main,
    train_key,
)
from data.synthetic_scenes import (
    NUM_CAPTION_TEMPLATES,
    caption,
    caption_vocabulary,
    sample_scene,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bimodal_exps" / "data" / "synthetic.py"
# Small enough to generate in about a second; 20-row shards give 7-digit keys (5 + 2).
SMALL = {
    "train_size": 60,
    "shard_size": 20,
    "eval_size": 24,
    "image_size": 64,
    "zeroshot_per_class": 3,
    "fail_rate": 0.1,
    "train_json_size": 25,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
}
# Independent of the generator's tables: the words each attribute value may appear as.
SIZE_WORDS = {"small": {"small", "little"}, "large": {"large", "big"}}
POSITION_WORDS = {
    "left": {"left"},
    "right": {"right"},
    "top": {"top"},
    "bottom": {"bottom"},
    "centre": {"centre", "center", "middle"},
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shards(root: Path) -> list[Path]:
    return sorted((root / "train").glob("*.tar"))


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("a") / "synthetic", seed=0, workers=1, **SMALL)


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """Same seed, other worker count, made through the command line."""
    root = tmp_path_factory.mktemp("b") / "synthetic"
    flags = [f"--{name}={value}" for name, value in SMALL.items()]
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(root), "--seed", "0", "--workers", "2", *flags],
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("c") / "synthetic", seed=1, workers=2, **SMALL)


def test_same_seed_gives_byte_identical_files(dataset, twin):
    ours, theirs = _tree(dataset), _tree(twin)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def test_other_seed_gives_other_data(dataset, other_seed):
    ours, theirs = _tree(dataset), _tree(other_seed)
    for name in ["train/00000.tar", "clip_train/synthetic_val.json", "images/test/000000.jpg"]:
        assert ours[name] != theirs[name], name


def test_key_format_follows_img2dataset():
    # DATA.md 1: shard id (5 digits) then row in shard; 9 digits for 10,000-row shards.
    assert train_key(3, 7, 1000) == "00003007"
    assert train_key(12, 345, 10000) == "000120345"
    assert int(train_key(19, 999, 1000)) == 19 * 1000 + 999
    assert train_key(2, 5, 20) == "0000205"


def test_tar_layout(dataset):
    all_failed = 0
    some_shard_out_of_order = False
    for tar_path in _shards(dataset):
        shard_id = int(tar_path.stem)
        members = _tar_members(tar_path)
        names = [name for name, _ in members]
        keys = []
        for key, group in groupby(names, key=lambda n: n.split(".")[0]):
            assert [n.split(".", 1)[1] for n in group] == ["jpg", "json", "txt"], key
            keys.append(key)
        assert len(keys) == len(set(keys)), "members of one key must be adjacent"
        for key in keys:
            assert re.fullmatch(r"\d{7}", key) and int(key[:5]) == shard_id, key
        some_shard_out_of_order |= keys != sorted(keys)

        table = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
        rows = SMALL["shard_size"]
        assert sorted(r["key"] for r in table) == [f"{shard_id:05d}{row:02d}" for row in range(rows)]
        ok = sorted(r["key"] for r in table if r["status"] == "success")
        failed = [r for r in table if r["status"] == "failed_to_download"]
        assert ok == sorted(keys) and len(ok) + len(failed) == rows
        for row in failed:
            assert row["error_message"] and row["width"] is None and row["sha256"] is None

        stats = json.loads(Path(str(tar_path)[: -len(".tar")] + "_stats.json").read_text())
        assert stats["count"] == rows == len(table)
        assert stats["successes"] == len(keys) == stats["status_dict"]["success"]
        assert stats["failed_to_download"] == len(failed) and stats["failed_to_resize"] == 0
        assert sum(stats["status_dict"].values()) == rows
        all_failed += len(failed)
    assert some_shard_out_of_order, "img2dataset writes samples in completion order, not key order"
    assert all_failed > 0, "keys must have gaps where downloads failed"


def test_sample_json_and_parquet_agree(dataset):
    fields = ["caption", "url", "key", "status", "error_message", "width", "height"]
    fields += ["original_width", "original_height", "exif", "sha256", "attributes"]
    for tar_path in _shards(dataset):
        parquet = {r["key"]: r for r in pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()}
        members = dict(_tar_members(tar_path))
        for name, jpg in members.items():
            if not name.endswith(".jpg"):
                continue
            key = name[:-4]
            meta = json.loads(members[f"{key}.json"])
            assert set(fields) <= set(meta)
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert meta["caption"] == members[f"{key}.txt"].decode()
            assert meta["url"] == f"synthetic://train/{key}"
            assert meta["sha256"] == hashlib.sha256(jpg).hexdigest()
            image = Image.open(io.BytesIO(jpg))
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (meta["width"], meta["height"]) == (64, 64)
            attributes = meta["attributes"]
            assert 0 <= attributes["template"] < NUM_CAPTION_TEMPLATES
            assert 1 <= len(attributes["objects"]) <= 3
            assert len({o["position"] for o in attributes["objects"]}) == len(attributes["objects"])
            row = parquet[key]
            assert json.loads(row.pop("attributes")) == attributes
            assert row == {k: v for k, v in meta.items() if k != "attributes"}


def _assert_caption_matches(text: str, attributes: dict) -> None:
    words = Counter(_words(text))
    objects = attributes["objects"]
    assert words[attributes["background"]] == 1, text
    shapes = Counter(o["shape"] for o in objects)
    assert {s: words[s] for s in SHAPES} == {s: shapes[s] for s in SHAPES}, text
    colours = Counter(o["colour"] for o in objects)
    assert {c: words[c] for c in colours} == colours, text
    for attribute, synonyms in (("size", SIZE_WORDS), ("position", POSITION_WORDS)):
        expected = Counter(o[attribute] for o in objects)
        for value, options in synonyms.items():
            assert sum(words[w] for w in options) == expected[value], (text, attribute, value)


def test_eval_splits(dataset):
    combos = {}
    for split in ("val", "test"):
        entries = json.loads((dataset / "clip_train" / f"synthetic_{split}.json").read_text())
        assert len(entries) == SMALL["eval_size"]
        keys = set()
        for entry in entries:
            assert entry["image"].startswith(f"{split}/")
            image = Image.open(dataset / "images" / entry["image"])
            assert image.mode == "RGB" and image.size == (64, 64)
            assert len(entry["caption"]) == 5 and len(set(entry["caption"])) == 5
            for text in entry["caption"]:
                _assert_caption_matches(text, entry["attributes"])
            objects = sorted(tuple(sorted(o.items())) for o in entry["attributes"]["objects"])
            keys.add((entry["attributes"]["background"], tuple(objects)))
        assert len(keys) == len(entries), f"{split}: attribute combinations must be unique"
        combos[split] = keys
    assert combos["val"] != combos["test"]


def test_train_captions_match_attributes(dataset):
    for tar_path in _shards(dataset):
        for name, data in _tar_members(tar_path):
            if name.endswith(".json"):
                meta = json.loads(data)
                _assert_caption_matches(meta["caption"], meta["attributes"])


def test_train_caption_json_covers_first_samples(dataset):
    entries = json.loads((dataset / "clip_train" / "synthetic_train.json").read_text())
    samples = {}
    for tar_path in _shards(dataset):
        members = dict(_tar_members(tar_path))
        samples.update({n[:-4]: (members[n], members[n[:-4] + ".txt"].decode()) for n in members if n[-4:] == ".jpg"})
    first = sorted(samples)[: SMALL["train_json_size"]]
    assert [e["image"] for e in entries] == [f"train/{key}.jpg" for key in first]
    for entry, key in zip(entries, first, strict=True):
        assert entry["image_id"] == int(key) and entry["caption"] == samples[key][1]
        assert (dataset / "images" / entry["image"]).read_bytes() == samples[key][0]


def test_zeroshot_folder(dataset):
    from torchvision.datasets import ImageFolder

    root = dataset / "zeroshot"
    classnames = (root / "classnames.txt").read_text().splitlines()
    folder = ImageFolder(str(root / "images"))
    assert folder.classes == classnames == sorted(SHAPES)
    assert Counter(label for _, label in folder.samples) == dict.fromkeys(range(8), SMALL["zeroshot_per_class"])
    assert folder[0][0].size == (64, 64)
    templates = (root / "templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)


def test_attribute_frequencies_are_long_tailed():
    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng) for _ in range(6000)]
    objects = [o for s in scenes for o in s.objects]
    zipf = 1 / np.arange(1, 9)
    zipf /= zipf.sum()
    shapes = Counter(o.shape for o in objects)
    observed = np.array([shapes[s] for s in SHAPES]) / len(objects)
    np.testing.assert_allclose(observed, zipf, atol=0.015)
    assert shapes["circle"] > 5 * shapes["ring"]
    colours = Counter(o.colour for o in objects).most_common()
    assert colours[0][1] > 6 * colours[-1][1]
    backgrounds = Counter(s.background for s in scenes)
    assert len(backgrounds) == 8 and max(backgrounds.values()) < 1.25 * min(backgrounds.values())
    counts = Counter(len(s.objects) for s in scenes)
    assert sorted(counts) == [1, 2, 3] and max(counts.values()) < 1.15 * min(counts.values())
    sizes = Counter(o.size for o in objects)
    assert abs(sizes["small"] - sizes["large"]) < 0.05 * len(objects)


def test_manifest_records_the_long_tail(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    shapes = manifest["vocabularies"]["shapes"]
    assert list(shapes) == SHAPES
    assert shapes["circle"] == pytest.approx(8 * shapes["ring"])
    assert manifest["parameters"] == {"seed": 0, **SMALL}
    train = manifest["splits"]["train"]
    assert train["rows"] == 60 and train["num_shards"] == 3 and train["key_digits"] == 7
    assert train["index_space"] == 2 * 100 + 20


def test_caption_vocabulary_covers_every_template():
    rng = np.random.default_rng(7)
    vocabulary = set(caption_vocabulary())
    for _ in range(300):
        scene = sample_scene(rng)
        for template in range(NUM_CAPTION_TEMPLATES):
            assert set(_words(caption(scene, template, rng))) <= vocabulary


def test_text_encoder_loads_offline(dataset):
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = dataset / "text_encoder"
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert" and config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    texts = [e["caption"] for e in json.loads((dataset / "clip_train/synthetic_train.json").read_text())]
    for split in ("val", "test"):
        texts += [
            c for e in json.loads((dataset / f"clip_train/synthetic_{split}.json").read_text()) for c in e["caption"]
        ]
    classes = (dataset / "zeroshot/classnames.txt").read_text().split()
    texts += [t.format(c) for t in (dataset / "zeroshot/templates.txt").read_text().splitlines() for c in classes]
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids)
    assert tokenizer("A Big RED Circle")["input_ids"] == tokenizer("a big red circle")["input_ids"]
    model = AutoModel.from_config(config).eval()
    batch = tokenizer(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (4, batch["input_ids"].shape[1], 32)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_complete_dataset_is_reused_untouched(dataset):
    before = _mtimes(dataset)
    assert ensure_synthetic_dataset(dataset, seed=0, workers=1, **SMALL) == dataset
    assert _mtimes(dataset) == before
    assert not (dataset.parent / f".{dataset.name}.partial").exists()


def test_leftovers_of_an_interrupted_generation_are_replaced(dataset, tmp_path):
    root = tmp_path / "synthetic"
    partial = tmp_path / ".synthetic.partial"
    (partial / "train").mkdir(parents=True)
    (partial / "train" / "00000.tar").write_bytes(b"half a shard")
    (root / "train").mkdir(parents=True)
    (root / "train" / "00000.tar").write_bytes(b"half a shard")
    (root / "manifest.json").write_text('{"version": 1, "param')  # truncated
    ensure_synthetic_dataset(root, seed=0, workers=1, **SMALL)
    assert not partial.exists()
    assert _tree(root) == _tree(dataset)


def test_killed_generation_leaves_no_dataset_behind(dataset, tmp_path):
    root = tmp_path / "synthetic"
    partial = tmp_path / ".synthetic.partial"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(root), "--workers", "1", "--train_size", "5000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial / "train" / "00000.tar").exists():
            assert process.poll() is None and time.monotonic() < deadline, "generation did not start"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not root.exists(), "an interrupted generation must not leave a dataset in place"
    ensure_synthetic_dataset(root, seed=0, workers=1, **SMALL)
    assert not partial.exists()
    assert _tree(root) == _tree(dataset)


def test_concurrent_callers_share_one_generation(dataset, tmp_path):
    root = tmp_path / "synthetic"
    flags = [f"--{name}={value}" for name, value in SMALL.items()]
    command = [sys.executable, str(SCRIPT), "--out", str(root), "--workers", "1", *flags]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate()[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs
    assert sum("reusing" in log for log in logs) == 1, logs
    assert _tree(root) == _tree(dataset)


def test_changed_parameters_regenerate(dataset, tmp_path, caplog):
    root = tmp_path / "synthetic"
    ensure_synthetic_dataset(root, seed=0, workers=1, **SMALL)
    with caplog.at_level(logging.INFO, logger="data.synthetic"):
        ensure_synthetic_dataset(root, seed=0, workers=1, **{**SMALL, "eval_size": 10})
    assert "eval_size" in caplog.text and "regenerating" in caplog.text
    assert len(json.loads((root / "clip_train/synthetic_val.json").read_text())) == 10
    assert json.loads((root / "manifest.json").read_text())["parameters"]["eval_size"] == 10
    assert (root / "train/00000.tar").read_bytes() == (dataset / "train/00000.tar").read_bytes()


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"thesis\.tex"):
        ensure_synthetic_dataset(tmp_path, seed=0, workers=1, **SMALL)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_bad_parameters_are_reported(tmp_path):
    with pytest.raises(ValueError, match="fail_rate"):
        SyntheticConfig(fail_rate=1.5)
    with pytest.raises(ValueError, match="text_heads"):
        SyntheticConfig(text_hidden=30, text_heads=4)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=8)
    with pytest.raises(TypeError, match="trian_size"):
        ensure_synthetic_dataset(tmp_path / "x", trian_size=10)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--out", "--seed", "--workers", "--force", *(f"--{name}" for name in SMALL)]:
        assert flag in text
