"""Put public datasets into the layouts the project reads (spec DATA.md), and check a data folder
against a run's configuration before a long job.

    python bimodal_exps/prepare.py coco datasets/dataset_coco.json
    python bimodal_exps/prepare.py flickr30k datasets/dataset_flickr30k.json
    python bimodal_exps/prepare.py imagenet datasets/imagenet/val ILSVRC2012_devkit_t12.tar.gz
    python bimodal_exps/prepare.py cc3m Train_GCC-training.tsv      # downloads with img2dataset
    python bimodal_exps/prepare.py cc12m cc12m.tsv
    python bimodal_exps/prepare.py check --config bimodal_exps/configs/cc3m.yaml [clip.py flags]

Every step can be rerun: all input is checked before anything is written, each output file is
written to a temporary name and renamed (so it is whole or absent), ImageNet images are moved one
rename at a time, and a rerun finishes an interrupted job and says what it left unchanged.
Exit status: 0 done (check: the configuration can run); 1 done, but images are missing (check:
problems found, listed); 2 bad input, nothing written.

A subcommand is a function ``(args) -> exit status`` and a function that adds its parser; both
are listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.prepare_status import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_OK, InputError
from data.web_download import add_web_download

SHOWN = 5  # example paths an incomplete result names


def write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so
    ``path`` is never partial; False (nothing written) when it already holds ``data``."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def _examples(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


# ---------------------------------------------------------------------------------------------
# coco, flickr30k: the Karpathy split files (DATA.md 6) -> caption JSON (2) and retrieval JSON (3)

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class KarpathySet:
    """A Karpathy split file and the files derived from it: ``<name>_train.json`` (one row per
    caption, of ``train_splits``), ``<name>_val.json`` and ``<name>_test.json`` (one entry per image)."""

    name: str
    split_file: str
    image_root: str  # the default image folder, under --data_path
    with_filepath: bool  # image paths are filepath/filename (MSCOCO) or filename (Flickr30k)
    id_field: str  # the image id of the training rows
    train_splits: tuple[str, ...]
    published_images: dict[str, int]  # images of evaluation splits in the published file


KARPATHY_SETS = {
    s.name: s
    for s in (
        KarpathySet(
            "coco", "dataset_coco.json", "coco", True, "cocoid", ("train", "restval"), {"val": 5000, "test": 5000}
        ),
        KarpathySet("flickr30k", "dataset_flickr30k.json", "flickr30k", False, "imgid", ("train",), {"test": 1000}),
    )
}


@dataclass(frozen=True)
class KarpathyImage:
    path: str  # under the image root
    image_id: int
    split: str
    captions: list[str]  # every ``raw`` sentence, in order


def read_karpathy(path: Path, spec: KarpathySet) -> list[KarpathyImage]:
    """The images of a Karpathy split file ``{"images": [{"filepath" (MSCOCO only), "filename",
    "cocoid" / "imgid", "split", "sentences": [{"raw": ...}, ...]}, ...]}``, checked, with every
    split that ``spec`` writes present."""
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected the Karpathy split file {spec.split_file})")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not JSON ({error}); expected the Karpathy split file {spec.split_file}") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise InputError(
            f'{path}: expected an object {{"images": [...]}} with a non-empty list of images, as in '
            f"{spec.split_file}; got {data!r:.200}"
        )
    images = [_karpathy_image(entry, n, path, spec) for n, entry in enumerate(data["images"])]
    present = {image.split for image in images}
    absent = [s for s in (*spec.train_splits, "val", "test") if s not in present]
    if absent:
        raise InputError(
            f"{path}: no image has split {' or '.join(absent)} (splits present: {', '.join(sorted(present))}); "
            f"expected the Karpathy split file {spec.split_file}"
        )
    return images


def _karpathy_image(entry: object, n: int, path: Path, spec: KarpathySet) -> KarpathyImage:
    names = ("filepath", "filename") if spec.with_filepath else ("filename",)
    fields = (*names, spec.id_field, "split", "sentences")
    where = f"{path}: image {n}"
    if not isinstance(entry, dict) or not all(f in entry for f in fields):
        raise InputError(f"{where} must be an object with the fields {', '.join(fields)}; got {entry!r:.200}")
    if not all(isinstance(entry[f], str) and entry[f] for f in names):
        raise InputError(f"{where}: {' and '.join(names)} must be non-empty strings; got {entry!r:.200}")
    image = "/".join(entry[f] for f in names)
    if entry["split"] not in KARPATHY_SPLITS:
        raise InputError(f"{where} ({image}): split {entry['split']!r} is not one of {', '.join(KARPATHY_SPLITS)}")
    if not isinstance(entry[spec.id_field], int) or isinstance(entry[spec.id_field], bool):
        raise InputError(f"{where} ({image}): {spec.id_field} must be an integer; got {entry[spec.id_field]!r}")
    sentences = entry["sentences"]
    if (
        not isinstance(sentences, list)
        or not sentences
        or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences)
    ):
        raise InputError(
            f"{where} ({image}): 'sentences' must be a non-empty list of {{\"raw\": <caption>, ...}}; "
            f"got {sentences!r:.200}"
        )
    return KarpathyImage(image, entry[spec.id_field], entry["split"], [s["raw"] for s in sentences])


def prepare_karpathy(args: argparse.Namespace) -> int:
    """``coco`` / ``flickr30k``: the split file -> ``<ann_path>/<name>_{train,val,test}.json``."""
    spec = KARPATHY_SETS[args.command]
    split_file = Path(args.split_file)
    images = read_karpathy(split_file, spec)
    ann_dir = Path(args.data_path) / args.ann_path
    image_root = Path(args.data_path) / (args.image_root or spec.image_root)
    missing = {image.path for image in images if not (image_root / image.path).is_file()}

    train = [image for image in images if image.split in spec.train_splits]
    rows = [{"image": im.path, "caption": c, "image_id": im.image_id} for im in train for c in im.captions]
    _write_json(
        ann_dir / f"{spec.name}_train.json",
        rows,
        f"{len(rows):,} captions of {len(train):,} images (splits {' + '.join(spec.train_splits)})",
        sum(image.path in missing for image in train),
    )
    for split in ("val", "test"):
        chosen = [image for image in images if image.split == split]
        entries = [{"image": image.path, "caption": image.captions} for image in chosen]
        published = spec.published_images.get(split)
        note = "" if published in (None, len(chosen)) else f" (the published split has {published:,})"
        _write_json(
            ann_dir / f"{spec.name}_{split}.json",
            entries,
            f"{len(chosen):,} images{note}, {sum(len(image.captions) for image in chosen):,} captions",
            sum(image.path in missing for image in chosen),
        )
    if not missing:
        print(f"all {len(images):,} images named in {split_file} are present under {image_root}")
        return EXIT_OK
    print(
        f"{len(missing):,} of {len(images):,} images named in {split_file} are missing under {image_root}, "
        f"e.g. {_examples(sorted(missing))}.\nRetrieval evaluation refuses a file with missing images and training "
        "skips them: add the images (or pass --image_root) and run this again",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE


def _write_json(path: Path, value: list, counts: str, missing: int) -> None:
    written = write_atomic(path, json.dumps(value, ensure_ascii=False).encode("utf-8"))
    print(f"{'wrote' if written else 'unchanged'} {path}: {counts}; missing images: {missing:,}")


def add_karpathy(subparsers: argparse._SubParsersAction, spec: KarpathySet) -> None:
    """The parser of ``coco`` or ``flickr30k``."""
    shape = "val2014/COCO_val2014_000000391895.jpg" if spec.with_filepath else "1000092795.jpg"
    p = subparsers.add_parser(
        spec.name,
        help=f"{spec.split_file} -> {spec.name}_train.json, {spec.name}_val.json, {spec.name}_test.json",
        description=(
            f"Write the project's {spec.name} annotation files from the Karpathy split file {spec.split_file} "
            f'({{"images": [{{{"filepath, " if spec.with_filepath else ""}filename, {spec.id_field}, split, '
            "sentences: [{raw, tokens, ...}], ...}]}): "
            f"<data_path>/<ann_path>/{spec.name}_train.json, a caption-JSON list with one row per caption "
            f'{{"image", "caption", "image_id": {spec.id_field}}} of the splits {" + ".join(spec.train_splits)} '
            f"(for --train_file); {spec.name}_val.json and {spec.name}_test.json, retrieval lists with one entry "
            f'per image {{"image": "{shape}", "caption": [every raw sentence]}}. Then says how many of the '
            "images are missing under the image folder (exit status 1 if any are)."
        ),
    )
    p.add_argument("split_file", metavar=spec.split_file.upper().replace(".", "_"), help=f"path of {spec.split_file}")
    p.add_argument("--data_path", default="./datasets", help="root of the data folders (default: %(default)s)")
    p.add_argument("--ann_path", default="clip_train", help="output folder, under --data_path (default: %(default)s)")
    p.add_argument(
        "--image_root",
        help=f"image folder, under --data_path, whose images are checked (default: {spec.image_root}); "
        f"give clip.py the same as --{'coco' if spec.name == 'coco' else 'flickr'}_image_root",
    )
    p.set_defaults(run=prepare_karpathy)


# ---------------------------------------------------------------------------------------------
# imagenet: the flat validation folder + its labels -> val/<wnid>/*.JPEG (DATA.md 8)

WNID = re.compile(r"n[0-9]{8}")
VAL_IMAGE = "ILSVRC2012_val_{:08d}.JPEG"  # the image of line k (1-based) of the devkit's ground truth
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
KAGGLE_HEADER = "ImageId,PredictionString"
LABEL_FORMATS = (
    "LABELS is one of: the devkit ILSVRC2012_devkit_t12.tar.gz or its extracted folder (its data/"
    f"{GROUND_TRUTH} and data/{META_MAT}, which this reads itself, without scipy); {GROUND_TRUTH} alone "
    f"(one ILSVRC2012_ID, 1-1000, per line, line k for image k, ILSVRC2012_val_<k in 8 digits>.JPEG), with "
    f"--synsets {META_MAT} or a text file of the 1,000 wnids in ILSVRC2012_ID order (line i: the wnid of "
    f"ILSVRC2012_ID i; {META_MAT} beside it is found by itself); Kaggle's LOC_val_solution.csv "
    "(ImageId,PredictionString, the first token a wnid); or a text file of one wnid per validation image "
    "in image order (TensorFlow's imagenet_2012_validation_synset_labels.txt)"
)


def read_imagenet_labels(labels: Path, synsets: Path | None) -> dict[str, str]:
    """{validation image file name: wnid} from any of the label formats of LABEL_FORMATS."""
    if labels.is_dir() or labels.name.endswith((".tar.gz", ".tgz", ".tar")):
        ground_truth, meta = _devkit_files(labels)
        synsets = read_synsets(meta, f"{labels}: {META_MAT}")
        return _from_ground_truth(ground_truth, f"{labels}: {GROUND_TRUTH}", synsets)
    if not labels.is_file():
        raise InputError(f"ImageNet labels not found: {labels}. {LABEL_FORMATS}")
    try:
        lines = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise InputError(f"{labels} is not a text file ({error}). {LABEL_FORMATS}") from error
    lines = [line for line in lines if line]
    if lines and lines[0].replace(" ", "") == KAGGLE_HEADER:
        return _from_kaggle(lines[1:], labels)
    if lines and all(WNID.fullmatch(line) for line in lines):
        return {VAL_IMAGE.format(k): wnid for k, wnid in enumerate(lines, 1)}
    if lines and all(line.isdigit() for line in lines):
        if synsets is None and (labels.parent / META_MAT).is_file():
            synsets = labels.parent / META_MAT
        if synsets is None:
            raise InputError(
                f"{labels} holds ILSVRC2012_IDs, which need their wnids: pass --synsets with the devkit's "
                f"{META_MAT} or a text file of the 1,000 wnids in ILSVRC2012_ID order"
            )
        if not synsets.is_file():
            raise InputError(f"--synsets {synsets}: file not found")
        return _from_ground_truth(lines, str(labels), read_synsets(synsets.read_bytes(), str(synsets)))
    raise InputError(f"{labels}: not a label file this step knows. {LABEL_FORMATS}")


def _devkit_files(devkit: Path) -> tuple[list[str], bytes]:
    """The ground-truth lines and the bytes of meta.mat of a devkit archive or folder."""
    wanted = (GROUND_TRUTH, META_MAT)
    if devkit.is_dir():
        found = {p.name: p for name in wanted for p in devkit.rglob(name)}
        contents = {name: found[name].read_bytes() for name in wanted if name in found}
    else:
        if not devkit.is_file():
            raise InputError(f"ImageNet devkit not found: {devkit}. {LABEL_FORMATS}")
        try:
            with tarfile.open(devkit) as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                contents = {n: tar.extractfile(members[n]).read() for n in wanted if n in members}
        except (tarfile.TarError, OSError, EOFError) as error:
            raise InputError(f"{devkit}: cannot read the devkit archive ({error})") from error
    absent = [name for name in wanted if name not in contents]
    if absent:
        raise InputError(f"{devkit} has no {' and no '.join(absent)}; expected the devkit ILSVRC2012_devkit_t12")
    return contents[GROUND_TRUTH].decode("ascii", "replace").split(), contents[META_MAT]


def _from_ground_truth(lines: list[str], where: str, synsets: dict[int, str]) -> dict[str, str]:
    labels = {}
    for k, line in enumerate(lines, 1):
        if not line.isdigit() or int(line) not in synsets:
            raise InputError(
                f"{where}: line {k} is {line!r}, not an ILSVRC2012_ID of the synsets "
                f"({min(synsets)}-{max(synsets)} known)"
            )
        labels[VAL_IMAGE.format(k)] = synsets[int(line)]
    return labels


def _from_kaggle(rows: list[str], where: Path) -> dict[str, str]:
    labels = {}
    for n, row in enumerate(rows, 2):
        image, _, prediction = row.partition(",")
        wnid = prediction.split()[0] if prediction.split() else ""
        if not image or not WNID.fullmatch(wnid):
            raise InputError(f"{where}: line {n} {row!r:.100} is not 'ImageId,wnid ...' ({KAGGLE_HEADER})")
        labels[f"{image}.JPEG"] = wnid
    return labels


def read_synsets(data: bytes, where: str) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} from the devkit's meta.mat (the struct array ``synsets`` with fields
    ILSVRC2012_ID and WNID; the inner nodes of the hierarchy, ids above 1000, come along, but no
    label names them) or from a text file of wnids, line i holding the wnid of ILSVRC2012_ID i."""
    if data.startswith(b"MATLAB 5.0 MAT-file"):
        try:
            synsets = {int(s["ILSVRC2012_ID"][0]): s["WNID"] for s in read_mat_struct_array(data, "synsets")}
            odd = [w for w in synsets.values() if not isinstance(w, str) or not WNID.fullmatch(w)]
            if odd:
                raise ValueError(f"WNID values such as {odd[0]!r} are not wnids")
            return synsets
        except (ValueError, KeyError, TypeError, IndexError, struct.error, zlib.error) as error:
            raise InputError(
                f"{where}: cannot read the synsets of this MAT file ({type(error).__name__}: {error}); pass "
                "--synsets with a text file of the 1,000 wnids in ILSVRC2012_ID order, or use Kaggle's "
                "LOC_val_solution.csv"
            ) from error
    lines = data.decode("utf-8", "replace").split()
    if not lines or not all(WNID.fullmatch(line) for line in lines):
        raise InputError(
            f"{where}: neither the devkit's {META_MAT} nor a text file of wnids (n01440764, ...) in ILSVRC2012_ID order"
        )
    return dict(enumerate(lines, 1))


# MAT-file level 5 (MATLAB 5 to 7.x; v7.3 files are HDF5 and not read): data element types
# as numpy dtypes, and the array classes read.
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8, _MI_UTF16, _MI_UTF32 = 14, 15, 16, 17, 18
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_MX_NUMERIC = range(6, 16)  # double, single, int8 ... uint64


def read_mat_struct_array(data: bytes, variable: str) -> list[dict[str, object]]:
    """The elements (column-major) of the struct array ``variable`` of a level-5 MAT file, each
    as {field: value}; a value is a str (char array), a list of numbers (numeric array, real part),
    a list of values (cell array), a list of dicts (struct array) or None (empty or another class)."""
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        raise ValueError("no MAT-file level 5 endian indicator")
    for kind, element in _mat_elements(data[128:], order):
        if kind == _MI_COMPRESSED:
            kind, element = next(_mat_elements(zlib.decompress(element), order))
        if kind != _MI_MATRIX or not element:
            continue
        name, value = _mat_matrix(element, order)
        if name == variable:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"variable {variable!r} is not a struct array")
            return value
    raise KeyError(f"no variable {variable!r}")


def _mat_elements(buf: bytes, order: str) -> Iterator[tuple[int, bytes]]:
    """(type, data) of each data element in ``buf``, small (4-byte) elements included."""
    pos = 0
    while pos + 8 <= len(buf):
        kind, size = struct.unpack_from(order + "II", buf, pos)
        if kind >> 16:  # small element: its size in the upper half of the type, its data in the tag
            yield kind & 0xFFFF, buf[pos + 4 : pos + 4 + (kind >> 16)]
            pos += 8
            continue
        yield kind, buf[pos + 8 : pos + 8 + size]
        # Elements inside a matrix are padded to 8 bytes; compressed ones (top level only) are not.
        pos += 8 + size + (0 if kind == _MI_COMPRESSED else -size % 8)


def _mat_matrix(element: bytes, order: str) -> tuple[str, object]:
    """(name, value) of a miMATRIX element (see read_mat_struct_array for the values)."""
    parts = _mat_elements(element, order)
    flags = struct.unpack_from(order + "I", next(parts)[1])[0]
    dims = np.frombuffer(next(parts)[1], dtype=order + "i4")
    name = next(parts)[1].decode("utf-8")
    count, kind = math.prod(int(d) for d in dims), flags & 0xFF
    if kind == _MX_STRUCT:
        name_length = struct.unpack_from(order + "i", next(parts)[1])[0]
        packed = next(parts)[1]
        fields = [packed[i : i + name_length].split(b"\0")[0].decode() for i in range(0, len(packed), name_length)]
        values = [_mat_matrix(data, order)[1] if data else None for _, data in parts]
        return name, [
            dict(zip(fields, values[i * len(fields) : (i + 1) * len(fields)], strict=True)) for i in range(count)
        ]
    if kind == _MX_CELL:
        return name, [_mat_matrix(data, order)[1] if data else None for _, data in parts]
    if kind not in _MX_NUMERIC and kind != _MX_CHAR:
        return name, None
    data_type, data = next(parts, (2, b""))
    if kind == _MX_CHAR and data_type == _MI_UTF8:
        return name, data.decode("utf-8")
    dtype = {_MI_UTF16: "u2", _MI_UTF32: "u4"}.get(data_type) or _MI_DTYPES[data_type]
    values = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder(order)).tolist()
    return name, "".join(map(chr, values)) if kind == _MX_CHAR else values


@dataclass(frozen=True)
class SortedVal:
    moved: int
    in_place: int
    missing: list[str]  # labelled images found neither flat nor in their class folder
    unlabelled: list[str]  # flat images the labels do not name, left where they are
    classes: int  # class folders after sorting


def sort_imagenet_val(val_dir: Path, labels: dict[str, str]) -> SortedVal:
    """Move each labelled ``val_dir/<image>`` to ``val_dir/<wnid>/<image>``. A move is one rename,
    so after an interruption every image is in exactly one of its two places and a rerun moves the rest."""
    moved, in_place, missing = 0, 0, []
    for image, wnid in sorted(labels.items()):
        target = val_dir / wnid / image
        if target.is_file():
            in_place += 1
            continue
        source = val_dir / image
        if not source.is_file():
            missing.append(image)
            continue
        target.parent.mkdir(exist_ok=True)
        os.replace(source, target)
        moved += 1
    unlabelled = sorted(p.name for p in val_dir.iterdir() if p.is_file() and p.name not in labels)
    classes = sum(1 for p in val_dir.iterdir() if p.is_dir() and WNID.fullmatch(p.name))
    return SortedVal(moved, in_place, missing, unlabelled, classes)


def prepare_imagenet(args: argparse.Namespace) -> int:
    """``imagenet``: sort the flat validation images into class folders."""
    val_dir = Path(args.val_dir)
    labels = read_imagenet_labels(Path(args.labels), Path(args.synsets) if args.synsets else None)
    if not val_dir.is_dir():
        raise InputError(f"ImageNet validation folder not found: {val_dir}")
    result = sort_imagenet_val(val_dir, labels)
    print(
        f"{val_dir}: moved {result.moved:,} images into their class folders, {result.in_place:,} were in place, "
        f"{len(result.missing):,} of the {len(labels):,} labelled images missing; {result.classes:,} class "
        "folders (ImageNet-1k: 1,000)"
    )
    if result.unlabelled:
        print(f"left where they are, not named by the labels: {_examples(result.unlabelled)}")
    if result.missing:
        print(f"missing images: {_examples(result.missing)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"zero-shot evaluation: clip.py --zs_dataset imagenet --zs_datafolder {val_dir}")
    return EXIT_OK


def add_imagenet(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "imagenet",
        help="sort the flat ImageNet validation images into val/<wnid>/ folders",
        description=(
            "Move the flat ImageNet-1k validation images VAL_DIR/ILSVRC2012_val_00000001.JPEG ... into one folder "
            "per class, VAL_DIR/<wnid>/ (sorted wnids give the standard class order), the layout of "
            f"clip.py --zs_dataset imagenet --zs_datafolder VAL_DIR. {LABEL_FORMATS}. Images already in their "
            "folder are left there, so a rerun after an interruption finishes the job. Exit status 1 when "
            "labelled images are missing."
        ),
    )
    p.add_argument("val_dir", metavar="VAL_DIR", help="the validation folder, e.g. datasets/imagenet/val")
    p.add_argument("labels", metavar="LABELS", help="the validation labels (see above)")
    p.add_argument(
        "--synsets",
        help=f"with {GROUND_TRUTH}: the devkit's {META_MAT}, or a text file of the 1,000 wnids in ILSVRC2012_ID order",
    )
    p.set_defaults(run=prepare_imagenet)


# ---------------------------------------------------------------------------------------------
# check: what a configuration needs, present or not


class Findings:
    """The lines of a check, printed as they are found; ``problems`` counts what stops a run."""

    def __init__(self) -> None:
        self.problems = 0

    def ok(self, what: str, detail: str) -> None:
        self._line("ok", what, detail)

    def note(self, what: str, detail: str) -> None:
        self._line("note", what, detail)

    def missing(self, what: str, detail: str) -> None:
        self.problems += 1
        self._line("MISSING", what, detail)

    def bad(self, what: str, detail: str) -> None:
        self.problems += 1
        self._line("BAD", what, detail)

    def _line(self, status: str, what: str, detail: str) -> None:
        print(f"{status:8} {what}: {detail}", flush=True)


def clip_config(argv: list[str]) -> argparse.Namespace:
    """clip.py's configuration from its flags (config.load_config), not yet validated."""
    from config import ConfigError, load_config

    try:
        return load_config(argv)
    except ConfigError as error:
        raise InputError(str(error)) from error


def check_shards(cfg: argparse.Namespace, found: Findings, scan_keys: bool) -> None:
    """Shards, epoch length (img2dataset's ``_stats.json``) and largest key against --data_size."""
    from data.batching import Skips
    from data.shards import check_keys_from_metadata, expand_shards, is_url, read_shard, shard_sizes, stats_path

    try:
        shards = expand_shards(cfg.train_data)
    except (FileNotFoundError, ValueError) as error:
        found.missing("--train_data", str(error))
        return
    found.ok("--train_data", f"{len(shards):,} shards ({cfg.train_data})")
    if any(map(is_url, shards)):
        if cfg.train_num_samples is None:
            found.missing("epoch length", "URL shards, whose _stats.json are not read: pass --train_num_samples")
        found.note("sample keys", "URL shards are read only in training, where keys are checked against --data_size")
        return
    without_stats = [s for s in shards if not os.path.isfile(stats_path(s))]
    if cfg.train_num_samples is not None:
        found.ok("epoch length", f"--train_num_samples {cfg.train_num_samples:,}")
    elif without_stats:
        found.missing(
            "epoch length",
            f"{len(without_stats):,} of {len(shards):,} shards have no _stats.json beside them "
            f"({_examples(without_stats)}): pass --train_num_samples",
        )
    else:
        try:
            found.ok("samples", f"{sum(shard_sizes(shards)):,} (successes in the {len(shards):,} _stats.json files)")
        except ValueError as error:
            found.bad("samples", str(error))
    how = "the shards' .parquet metadata"
    try:
        largest = check_keys_from_metadata(shards, cfg.data_size)
        if largest is None and scan_keys:
            how = "read from every shard"
            skipped = Skips()
            # No bound while reading, so that the largest key is found, not the first one too large.
            samples = (raw.index for shard in shards for raw in read_shard(shard, sys.maxsize, skipped))
            largest = max(samples, default=-1)
            if skipped:
                unreadable = list(skipped.sources)
                found.note("shards", f"{len(unreadable):,} cannot be read to the end: {_examples(unreadable)}")
    except ValueError as error:
        found.bad("sample keys", str(error))
        return
    if largest is not None and largest >= cfg.data_size:
        found.bad(
            "sample keys",
            f"largest {largest:,} ({how}) is outside the index space of --data_size {cfg.data_size:,}; set "
            f"--data_size to at least {largest + 1} (the number of rows of the input metadata)",
        )
    elif largest is None:
        found.note(
            "sample keys",
            "some shards have no .parquet beside them: keys are checked against --data_size as training reads "
            "them (--scan_keys reads every shard now)",
        )
    else:
        found.ok("sample keys", f"largest {largest:,} < --data_size {cfg.data_size:,} ({how})")


def check_caption_json(cfg: argparse.Namespace, found: Findings) -> None:
    """Rows, images and missing images of a --train_file, through the training dataset's own checks."""
    from data.caption_json import CaptionJsonDataset
    from data.transforms import TrainAugment

    root = cfg.train_image_root
    if not root or not os.path.isdir(root):
        found.missing("--train_image_root", f"folder not found: {root}")
        return
    try:
        dataset = CaptionJsonDataset(
            cfg.train_file,
            root,
            data_size=cfg.data_size,
            transform=TrainAugment(cfg.image_res, cfg.crop_scale, cfg.hflip),
            max_words=cfg.max_words,
            seed=cfg.seed,
        )
    except FileNotFoundError as error:
        found.missing("--train_file", str(error))
        return
    except ValueError as error:
        found.bad("--train_file", str(error))
        return
    present: dict[str, bool] = {}
    for row in range(len(dataset)):
        path = dataset.paths[row]
        if path not in present:
            present[path] = os.path.isfile(os.path.join(root, path))
    missing = [path for path, here in present.items() if not here]
    missing_set = set(missing)
    bad_rows = sum(dataset.paths[row] in missing_set for row in range(len(dataset))) if missing else 0
    detail = (
        f"{len(dataset):,} rows, {dataset.num_images:,} image ids, {len(present):,} image files, "
        f"{len(missing):,} missing under {root}" + (f" (e.g. {_examples(missing)})" if missing else "")
    )
    if bad_rows > cfg.max_bad_fraction * len(dataset):
        found.bad("--train_file", f"{detail}: {bad_rows:,} rows without an image, above --max_bad_fraction")
    elif missing:
        found.note("--train_file", f"{detail}; training skips their rows")
    else:
        found.ok("--train_file", detail)


def check_retrieval(cfg: argparse.Namespace, found: Findings) -> None:
    """Every configured retrieval file, read as the evaluator reads it (images checked)."""
    from data.retrieval_split import load_retrieval_split

    for flag, root in (
        ("val_coco_file", cfg.coco_image_root),
        ("test_coco_file", cfg.coco_image_root),
        ("val_flickr_file", cfg.flickr_image_root),
        ("test_flickr_file", cfg.flickr_image_root),
    ):
        path = getattr(cfg, flag)
        if not path:
            continue
        try:
            split = load_retrieval_split(path, root)
        except FileNotFoundError as error:
            found.missing(f"--{flag}", str(error))
        except ValueError as error:
            found.bad(f"--{flag}", str(error))
        else:
            counts = f"{len(split.image_paths):,} images, {len(split.captions):,} captions"
            found.ok(f"--{flag}", f"{path}: {counts} under {root}")


def check_zeroshot(cfg: argparse.Namespace, found: Findings) -> None:
    """The zero-shot folder, read as the evaluator reads it."""
    from evaluation.zeroshot import zeroshot_dataset

    if not cfg.zs_dataset:
        found.note("zero-shot", "none configured (--zs_dataset)")
        return
    what = f"--zs_dataset {cfg.zs_dataset}"
    try:
        dataset, classnames, _ = zeroshot_dataset(cfg.zs_dataset, cfg.zs_datafolder, cfg.image_res)
    except FileNotFoundError as error:
        folder = Path(cfg.zs_datafolder or "")
        flat = len(list(folder.glob("*.JPEG"))) if folder.is_dir() else 0
        hint = f"; it holds {flat:,} flat images: sort them with prepare.py imagenet" if flat else ""
        found.missing(what, f"{error}{hint}")
    except (ValueError, RuntimeError) as error:
        found.bad(what, str(error))
    else:
        found.ok(what, f"{len(dataset):,} images in {len(classnames):,} classes ({cfg.zs_datafolder})")


def check_data(args: argparse.Namespace) -> int:
    """``check``: what the configuration of ``args.clip_flags`` needs, present or not."""
    from config import ConfigError, validate

    cfg = clip_config(args.clip_flags)
    print(f"configuration: {cfg.config or 'built-in defaults'} with --data_path {os.path.abspath(cfg.data_path)}")
    found = Findings()
    if cfg.evaluate:
        found.note("training data", "--evaluate: none needed")
    elif cfg.train_data:
        check_shards(cfg, found, args.scan_keys)
    elif cfg.train_file:
        check_caption_json(cfg, found)
    check_retrieval(cfg, found)
    check_zeroshot(cfg, found)
    try:
        validate(cfg)
    except ConfigError as error:
        # Most often one of the problems above, which is then not counted twice.
        (found.note if found.problems else found.bad)("clip.py", f"stops first with: {error}")
    if found.problems:
        print(f"{found.problems} problem(s): clip.py cannot run with this configuration as it is")
        return EXIT_INCOMPLETE
    print("ready: clip.py can run with this configuration")
    return EXIT_OK


def add_check(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="say what a clip.py configuration needs and what of it is missing or malformed",
        description=(
            "Read a clip.py configuration (its flags: --config FILE.yaml, --data_path, any override; resolved "
            "by clip.py's own config code) and report, before a long job, what its data need: the training "
            "shards (count, samples in img2dataset's _stats.json, largest key against --data_size from the "
            ".parquet metadata) or caption JSON (rows, images, missing images), the retrieval files (images, "
            "captions, missing images) and the zero-shot folder. Exit status 0 only when clip.py can run "
            "with the configuration, 1 with the problems listed."
        ),
        usage="prepare.py check [-h] [--scan_keys] [clip.py flags: --config FILE.yaml, --data_path PATH, ...]",
        epilog="example: prepare.py check --config bimodal_exps/configs/cc3m.yaml --data_path /data",
        allow_abbrev=False,  # every other flag is clip.py's, which must not abbreviate to --scan_keys
    )
    p.add_argument(
        "--scan_keys",
        action="store_true",
        help="when shards have no .parquet beside them, read every shard for the largest key (slow)",
    )
    p.set_defaults(run=check_data, takes_clip_flags=True)


# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    lambda sub: add_karpathy(sub, KARPATHY_SETS["coco"]),
    lambda sub: add_karpathy(sub, KARPATHY_SETS["flickr30k"]),
    add_imagenet,
    lambda sub: add_web_download(sub, "cc3m"),
    lambda sub: add_web_download(sub, "cc12m"),
    add_check,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare.py",
        description="Prepare datasets in the layouts the project reads, and check them against a configuration. "
        "Exit status: 0 done, 1 done but incomplete (missing images; check: problems), 2 bad input (nothing written).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_clip_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.clip_flags = extra
    try:
        return args.run(args)
    except InputError as error:
        print(f"prepare.py {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
