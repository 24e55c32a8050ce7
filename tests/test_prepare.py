"""bimodal_exps/prepare.py: Karpathy split files, the ImageNet validation folder and the data check,
each output loaded by the project's own readers."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

import prepare
from data.caption_json import CaptionJsonDataset, read_caption_rows
from data.retrieval_split import load_retrieval_split
from data.transforms import TrainAugment
from evaluation.zeroshot import zeroshot_dataset
from tiny_run import tiny_run_args

PREPARE = Path(__file__).resolve().parents[1] / "bimodal_exps" / "prepare.py"


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="JPEG")
    return out.getvalue()


# --- coco / flickr30k ------------------------------------------------------------------------

# split -> (images, captions of its first images); the other images have 5 captions
SPLITS = {"train": (6, [6, 7]), "restval": (4, [7]), "val": (5, [6]), "test": (5, [7, 6])}
MISSING = {"train": 2, "restval": 1, "val": 1, "test": 0}  # the last images of each split have no file


def karpathy_file(root: Path, with_filepath: bool, splits: dict = SPLITS, missing: dict = MISSING) -> tuple[Path, list]:
    """A split file in the structure of dataset_coco.json (or, without filepath, dataset_flickr30k.json),
    its images written under root/coco (root/flickr30k) except the ``missing`` last ones of each split."""
    image_root = root / ("coco" if with_filepath else "flickr30k")
    images, sentid = [], 0
    for split, (count, long_ones) in splits.items():
        for i in range(count):
            imgid = len(images)
            folder = "val2014" if split != "train" else "train2014"
            filename = f"COCO_{folder}_{100000 + imgid:012d}.jpg" if with_filepath else f"{1000000 + imgid}.jpg"
            captions = long_ones[i] if i < len(long_ones) else 5
            sentences = []
            for k in range(captions):
                raw = f"Image {imgid} caption {k}: a dog, running."
                sentences.append({"tokens": raw.lower().split(), "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            image = {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences}
            image["sentids"] = [s["sentid"] for s in sentences]
            if with_filepath:
                image |= {"filepath": folder, "cocoid": 500000 + imgid}
            images.append(image)
            path = image_root / (f"{folder}/{filename}" if with_filepath else filename)
            if i < count - missing.get(split, 0):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg())
    dataset = "coco" if with_filepath else "flickr30k"
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path, images


def image_path(image: dict) -> str:
    return f"{image['filepath']}/{image['filename']}" if "filepath" in image else image["filename"]


def test_coco_outputs_load_with_the_project_readers_and_rerun_is_idempotent(tmp_path, capsys):
    split_file, images = karpathy_file(tmp_path, with_filepath=True)
    argv = ["coco", str(split_file), "--data_path", str(tmp_path)]
    ann, image_root = tmp_path / "clip_train", tmp_path / "coco"

    assert prepare.main(argv) == prepare.EXIT_INCOMPLETE
    out, err = capsys.readouterr()
    published = "(the published split has 5,000)"
    assert f"wrote {ann}/coco_train.json: 55 captions of 10 images (splits train + restval); missing images: 3" in out
    assert f"wrote {ann}/coco_val.json: 5 images {published}, 26 captions; missing images: 1" in out
    assert f"wrote {ann}/coco_test.json: 5 images {published}, 28 captions; missing images: 0" in out
    assert f"4 of 20 images named in {split_file} are missing under {image_root}" in err

    test = load_retrieval_split(ann / "coco_test.json", image_root)
    chosen = [im for im in images if im["split"] == "test"]
    assert test.image_paths == [str(image_root / image_path(im)) for im in chosen]
    assert test.captions == [s["raw"] for im in chosen for s in im["sentences"]]
    assert [len(c) for c in test.img2txt] == [7, 6, 5, 5, 5]
    with pytest.raises(FileNotFoundError, match="1 of 5 images listed"):
        load_retrieval_split(ann / "coco_val.json", image_root)

    rows = read_caption_rows(str(ann / "coco_train.json"))
    train = [im for im in images if im["split"] in ("train", "restval")]
    assert rows == [(image_path(im), s["raw"], im["cocoid"]) for im in train for s in im["sentences"]]
    dataset = CaptionJsonDataset(
        str(ann / "coco_train.json"), str(image_root), data_size=55, transform=TrainAugment(8), max_words=30, seed=0
    )
    assert (len(dataset), dataset.num_images) == (55, 10)

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ann.iterdir()}
    assert prepare.main(argv) == prepare.EXIT_INCOMPLETE
    assert capsys.readouterr().out.count("unchanged ") == 3
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ann.iterdir()} == before

    for im in images:  # the missing images arrive
        (image_root / image_path(im)).write_bytes(jpeg())
    assert prepare.main(argv) == prepare.EXIT_OK
    assert f"all 20 images named in {split_file} are present" in capsys.readouterr().out
    load_retrieval_split(ann / "coco_val.json", image_root)


def bad_image(images: list) -> None:
    del images[3]["sentences"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json {", "dataset_coco.json is not JSON (Expecting value: line 1 column 1 (char 0)); expected the"),
        ([{"image": "a.jpg"}], 'dataset_coco.json: expected an object {"images": [...]} with a non-empty list'),
        (bad_image, "dataset_coco.json: image 3 must be an object with the fields filepath, filename, cocoid, split"),
        ("no test", "dataset_coco.json: no image has split test (splits present: restval, train, val)"),
        ("no restval", "dataset_coco.json: no image has split restval (splits present: test, train, val)"),
    ],
)
def test_coco_refuses_bad_input_with_one_message_and_writes_nothing(tmp_path, capsys, content, message):
    splits = {k: v for k, v in SPLITS.items() if content != f"no {k}"}
    split_file, images = karpathy_file(tmp_path, with_filepath=True, splits=splits)
    if callable(content):
        content(images)
        split_file.write_text(json.dumps({"images": images}))
    elif isinstance(content, list):
        split_file.write_text(json.dumps(content))
    elif not content.startswith("no "):
        split_file.write_text(content)

    assert prepare.main(["coco", str(split_file), "--data_path", str(tmp_path)]) == prepare.EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"prepare.py coco: {tmp_path}/{message}") and err.count("\n") == 1
    assert not (tmp_path / "clip_train").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare.write_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and target.read_text() == "old"


def test_flickr30k(tmp_path, capsys):
    splits = {"train": (5, [6]), "val": (3, []), "test": (4, [])}
    split_file, images = karpathy_file(tmp_path, with_filepath=False, splits=splits, missing={"train": 1})
    argv = ["flickr30k", str(split_file), "--data_path", str(tmp_path)]
    ann, image_root = tmp_path / "clip_train", tmp_path / "flickr30k"

    assert prepare.main(argv) == prepare.EXIT_INCOMPLETE
    out, err = capsys.readouterr()
    assert f"{ann / 'flickr30k_train.json'}: 26 captions of 5 images (splits train); missing images: 1" in out
    assert f"{ann / 'flickr30k_val.json'}: 3 images, 15 captions; missing images: 0" in out
    assert f"{ann / 'flickr30k_test.json'}: 4 images (the published split has 1,000), 20 captions" in out
    assert "1 of 12 images named" in err
    test = load_retrieval_split(ann / "flickr30k_test.json", image_root)
    assert test.image_paths == [str(image_root / im["filename"]) for im in images if im["split"] == "test"]
    assert len(test.captions) == 20
    val = load_retrieval_split(ann / "flickr30k_val.json", image_root)
    assert val.captions[0] == "Image 5 caption 0: a dog, running."
    rows = read_caption_rows(str(ann / "flickr30k_train.json"))
    assert rows[0] == ("1000000.jpg", "Image 0 caption 0: a dog, running.", 0)

    assert prepare.main(argv) == prepare.EXIT_INCOMPLETE
    assert capsys.readouterr().out.count("unchanged ") == 3

    del images[0]["filename"]
    split_file.write_text(json.dumps({"images": images}))
    assert prepare.main(argv) == prepare.EXIT_BAD_INPUT
    assert "image 0 must be an object with the fields filename, imgid, split, sentences" in capsys.readouterr().err


# --- imagenet --------------------------------------------------------------------------------


def mat_element(kind: int, data: bytes) -> bytes:
    if 0 < len(data) <= 4:  # MATLAB's small element format for short data
        return struct.pack("<HH", kind, len(data)) + data.ljust(4, b"\0")
    return struct.pack("<II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def mat_matrix(mx_class: int, dims: tuple[int, int], name: bytes, *body: bytes) -> bytes:
    content = mat_element(6, struct.pack("<II", mx_class, 0)) + mat_element(5, struct.pack("<2i", *dims))
    content += mat_element(1, name) + b"".join(body)
    return struct.pack("<II", 14, len(content)) + content


def meta_mat(synsets: list[tuple[int, str, int]]) -> bytes:
    """A MAT v5 file as MATLAB 7 saves the devkit's meta.mat: one compressed variable ``synsets``,
    an [N, 1] struct array of (ILSVRC2012_ID, WNID, words, num_children, children); doubles stored
    in the smallest integer type that holds them, chars as UTF-8 or UTF-16, empty arrays without data."""
    fields = ("ILSVRC2012_ID", "WNID", "words", "num_children", "children")
    values = []
    for ilsvrc_id, wnid, children in synsets:
        words = f"class {wnid}, café"
        values += [
            mat_matrix(6, (1, 1), b"", mat_element(4, struct.pack("<H", ilsvrc_id))),  # miUINT16
            mat_matrix(4, (1, len(wnid)), b"", mat_element(4, wnid.encode("utf-16-le"))),
            mat_matrix(4, (1, len(words)), b"", mat_element(16, words.encode("utf-8"))),
            mat_matrix(6, (1, 1), b"", mat_element(2, bytes([children]))),  # miUINT8
            mat_matrix(6, (1, children), b"", *([mat_element(2, bytes(range(1, children + 1)))] if children else [])),
        ]
    names = b"".join(f.encode().ljust(32, b"\0") for f in fields)
    matrix = mat_matrix(
        2, (len(synsets), 1), b"synsets", mat_element(5, struct.pack("<i", 32)), mat_element(1, names), *values
    )
    header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    compressed = zlib.compress(matrix)
    return header + struct.pack("<II", 15, len(compressed)) + compressed


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_imagenet_devkit_sorts_resumably_into_the_zero_shot_layout(tmp_path, capsys, monkeypatch):
    rng = random.Random(0)
    wnids = [f"n{1000000 + 37 * k:08d}" for k in range(1000)]
    rng.shuffle(wnids)  # ILSVRC2012_ID order is not the sorted wnid order
    ground_truth = [*rng.sample(range(1, 1001), 1000), *(rng.randrange(1, 1001) for _ in range(200))]
    # inner nodes of the hierarchy (ids above 1000, with children) are never labels
    synsets = [(i + 1, wnid, 0) for i, wnid in enumerate(wnids)] + [(1001, "n99999999", 3), (1002, "n99999998", 2)]
    devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tar:
        add_to_tar(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(synsets))
        text = "".join(f"{i}\n" for i in ground_truth).encode()
        add_to_tar(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", text)
    val = tmp_path / "val"
    val.mkdir()
    image = jpeg()
    for k in range(1, len(ground_truth) + 1):
        (val / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(image)

    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        if len(calls) == 300:
            raise KeyboardInterrupt
        calls.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["imagenet", str(val), str(devkit)])
    monkeypatch.setattr(os, "replace", real_replace)

    assert prepare.main(["imagenet", str(val), str(devkit)]) == prepare.EXIT_OK
    out = capsys.readouterr().out
    assert f"{val}: moved 900 images into their class folders, 300 were in place, 0 of the 1,200" in out
    assert "1,000 class folders" in out
    assert prepare.main(["imagenet", str(val), str(devkit)]) == prepare.EXIT_OK
    assert "moved 0 images into their class folders, 1,200 were in place" in capsys.readouterr().out

    dataset, classnames, templates = zeroshot_dataset("imagenet", val, 16)
    assert len(dataset) == 1200 and len(classnames) == 1000 and templates
    standard_order = sorted(wnids)
    for path, label in dataset.samples:
        k = int(Path(path).stem.rsplit("_", 1)[1])
        assert label == standard_order.index(wnids[ground_truth[k - 1] - 1])


def test_imagenet_other_label_formats_and_bad_labels(tmp_path, capsys):
    wnids = ["n00000003", "n00000001", "n00000002"]  # ILSVRC2012_ID 1, 2, 3
    truth = [2, 3, 1, 1]
    expected = {f"ILSVRC2012_val_{k:08d}.JPEG": wnids[i - 1] for k, i in enumerate(truth, 1)}

    synset_list = tmp_path / "synsets.txt"
    synset_list.write_text("\n".join(wnids) + "\n")
    ground_truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ground_truth.write_text("\n".join(map(str, truth)) + "\n")
    assert prepare.read_imagenet_labels(ground_truth, synset_list) == expected
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "meta.mat").write_bytes(meta_mat([(i + 1, w, 0) for i, w in enumerate(wnids)]))
    (devkit / ground_truth.name).write_text(ground_truth.read_text())
    assert prepare.read_imagenet_labels(devkit.parent, None) == expected
    assert prepare.read_imagenet_labels(devkit / ground_truth.name, None) == expected  # meta.mat found beside it
    kaggle = tmp_path / "LOC_val_solution.csv"
    rows = [f"{name[:-5]},{wnid} 10 20 30 40 {wnid} 1 2 3 4 " for name, wnid in reversed(expected.items())]
    kaggle.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    assert prepare.read_imagenet_labels(kaggle, None) == expected
    per_image = tmp_path / "imagenet_2012_validation_synset_labels.txt"
    per_image.write_text("\n".join(expected.values()))
    assert prepare.read_imagenet_labels(per_image, None) == expected

    val = tmp_path / "val"
    val.mkdir()
    for name in [*list(expected)[:3], "README.txt"]:  # the fourth image is missing
        (val / name).write_bytes(jpeg())
    assert prepare.main(["imagenet", str(val), str(kaggle)]) == prepare.EXIT_INCOMPLETE
    out, err = capsys.readouterr()
    assert "moved 3 images into their class folders, 0 were in place, 1 of the 4 labelled images missing" in out
    assert "3 class folders" in out and "left where they are, not named by the labels: README.txt" in out
    assert "missing images: ILSVRC2012_val_00000004.JPEG" in err
    assert sorted(p.relative_to(val).as_posix() for p in val.rglob("*.JPEG")) == [
        "n00000001/ILSVRC2012_val_00000001.JPEG",
        "n00000002/ILSVRC2012_val_00000002.JPEG",
        "n00000003/ILSVRC2012_val_00000003.JPEG",
    ]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg())
    ground_truth.write_text("2\n4\n")
    assert prepare.main(["imagenet", str(bad), str(ground_truth), "--synsets", str(synset_list)]) == 2
    assert capsys.readouterr().err == (
        f"prepare.py imagenet: {ground_truth}: line 2 is '4', not an ILSVRC2012_ID of the synsets (1-3 known)\n"
    )
    (tmp_path / "loose").mkdir()
    loose = tmp_path / "loose" / ground_truth.name
    loose.write_text("2\n")
    assert prepare.main(["imagenet", str(bad), str(loose)]) == 2
    assert "holds ILSVRC2012_IDs, which need their wnids: pass --synsets" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert prepare.main(["imagenet", str(bad), str(notes)]) == 2
    assert "not a label file this step knows. LABELS is one of: the devkit" in capsys.readouterr().err
    (tmp_path / "broken.mat").write_bytes(meta_mat([(1, "n00000001", 0)])[:200])
    assert prepare.main(["imagenet", str(bad), str(ground_truth), "--synsets", str(tmp_path / "broken.mat")]) == 2
    assert "cannot read the synsets of this MAT file" in capsys.readouterr().err
    assert [p.name for p in bad.iterdir()] == ["ILSVRC2012_val_00000001.JPEG"]  # nothing moved


# --- check and the command line --------------------------------------------------------------


def test_check_passes_on_the_tiny_dataset(tiny_dataset, tmp_path, capsys):
    args = tiny_run_args(tiny_dataset, tmp_path / "out", zs_dataset="imagefolder", zs_datafolder="zeroshot")
    assert prepare.main(["check", *args]) == prepare.EXIT_OK
    out = capsys.readouterr().out
    successes = sum(json.loads(p.read_text())["successes"] for p in (tiny_dataset / "train").glob("*_stats.json"))
    assert f"ok       --train_data: 4 shards ({tiny_dataset / 'train'})" in out
    assert f"ok       samples: {successes} (successes in the 4 _stats.json files)" in out
    assert "ok       sample keys: largest 399 < --data_size 400 (the shards' .parquet metadata)" in out
    assert "ok       --test_coco_file: " in out and "40 images, 200 captions under" in out
    assert "ok       --zs_dataset imagefolder: " in out
    assert out.rstrip().endswith("ready: clip.py can run with this configuration")

    caption_json = tiny_run_args(
        tiny_dataset, tmp_path / "out", train_data=None, train_file="synthetic_train.json", train_image_root="images"
    )
    assert prepare.main(["check", *caption_json]) == prepare.EXIT_OK
    rows = len(json.loads((tiny_dataset / "clip_train" / "synthetic_train.json").read_text()))
    out = capsys.readouterr().out
    assert f"ok       --train_file: {rows} rows, {rows} image ids, {rows} image files, 0 missing" in out


def test_check_lists_what_is_missing_or_malformed(tiny_dataset, tmp_path, capsys):
    (tmp_path / "broken.json").write_text('[{"image": "val/000000.jpg"}]')
    args = tiny_run_args(
        tiny_dataset,
        tmp_path / "out",
        train_data="train/{00000..00009}.tar",
        test_coco_file="absent.json",
        val_coco_file=str(tmp_path / "broken.json"),
        zs_dataset="imagenet",
        zs_datafolder=str(tmp_path / "no_imagenet"),
    )
    assert prepare.main(["check", *args]) == prepare.EXIT_INCOMPLETE
    lines = capsys.readouterr().out.splitlines()
    problems = [line for line in lines if line.startswith(("MISSING", "BAD"))]
    assert problems[0].startswith("MISSING  --train_data: 6 shard path(s) of ")
    assert problems[1].startswith(f"BAD      --val_coco_file: {tmp_path / 'broken.json'}: entry 0 must be an object")
    assert problems[2] == (
        f"MISSING  --test_coco_file: retrieval annotation file not found: {tiny_dataset / 'clip_train' / 'absent.json'}"
    )
    assert problems[3].startswith("MISSING  --zs_dataset imagenet: ImageNet-1k validation folder not found")
    assert len(problems) == 4
    assert lines[-2].startswith("note     clip.py: stops first with: --test_coco_file: file not found")
    assert lines[-1] == "4 problem(s): clip.py cannot run with this configuration as it is"

    # a problem only clip.py's own validation sees
    assert prepare.main(["check", *tiny_run_args(tiny_dataset, tmp_path / "out", batch_size_train=1)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("BAD      clip.py: stops first with: --batch_size_train 1: a contrastive loss needs")
    assert lines[-1] == "1 problem(s): clip.py cannot run with this configuration as it is"


def test_check_without_parquet_scans_keys_on_request(tiny_dataset, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"):  # no .parquet
        (shards / name).write_bytes((tiny_dataset / "train" / name).read_bytes())
    flat = tmp_path / "imagenet_val"
    flat.mkdir()
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg())
    args = tiny_run_args(tiny_dataset, tmp_path / "out", train_data=str(shards))

    assert prepare.main(["check", *args]) == prepare.EXIT_OK
    assert "note     sample keys: some shards have no .parquet beside them" in capsys.readouterr().out
    assert prepare.main(["check", "--scan_keys", *args]) == prepare.EXIT_OK
    assert "ok       sample keys: largest 199 < --data_size 400 (read from every shard)" in capsys.readouterr().out
    small = [*args, "--data_size", "150", "--zs_dataset", "imagenet", "--zs_datafolder", str(flat)]
    assert prepare.main(["check", "--scan_keys", *small]) == prepare.EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert "BAD      sample keys: largest 199 (read from every shard) is outside the index space of --data_size" in out
    assert "set --data_size to at least 200" in out
    assert "MISSING  --zs_dataset imagenet: Couldn't find any class folder in " in out
    assert "; it holds 1 flat images: sort them with prepare.py imagenet" in out


def test_command_line(tiny_dataset, tmp_path):
    for command in ("", "coco", "flickr30k", "imagenet", "check"):
        shown = subprocess.run(
            [sys.executable, str(PREPARE), *command.split(), "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert shown.startswith(f"usage: prepare.py {command}".rstrip())
    imagenet_help = subprocess.run(
        [sys.executable, str(PREPARE), "imagenet", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "without scipy" in imagenet_help and "LOC_val_solution.csv" in imagenet_help

    wrong = subprocess.run([sys.executable, str(PREPARE), "coco", "x.json", "--bogus"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr

    check = subprocess.run(
        [sys.executable, str(PREPARE), "check", *tiny_run_args(tiny_dataset, tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ready: clip.py can run with this configuration" in check.stdout
