"""P3 (TARGETS.md): the training input pipeline, decoded and augmented samples per second in one
loader worker, from webdataset shards of 256 px JPEGs to 224 px crops.

Baseline: PIL decode + torchvision's RandomResizedCrop (bicubic) / RandomHorizontalFlip /
ToTensor / Normalize, the original code base's pipeline. Ours: the project's sample decoder
(``data.shards.decode_sample``: caption cleaning, PIL decode into a uint8 tensor, uint8 random
resized crop and flip; normalisation happens later, on the device, inside the model). Both read
the same raw samples from the same tars with the project's reader, in one thread (as a worker),
alternating repeats; the figure is the median speed-up over repeats with its spread.

    python bench/bench_input.py                 # writes bench/results/input.{json,md}
    python bench/bench_input.py --samples 128   # quicker, prints only
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, ratio_summary, seconds, write_results
from data.batching import Skips
from data.shards import decode_sample, read_shard
from data.transforms import TrainAugment
from models.model_clip import MEAN, STD

RES, SCALE = 224, (0.5, 1.0)


def photo_like_jpeg(rng: np.random.Generator) -> bytes:
    """A 256 px-high JPEG (quality 90) with smooth structure and fine texture, as photos have."""
    width = int(rng.integers(256, 385))
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, 256), Image.BICUBIC)
    fine = rng.normal(0, 12, (256, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + fine, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, samples: int, per_shard: int = 128) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, samples, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in range(s, min(s + per_shard, samples)):
                for suffix, data in (("jpg", photo_like_jpeg(rng)), ("txt", f"a photo number {key}".encode())):
                    info = tarfile.TarInfo(f"{key:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker

    baseline_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(RES, scale=SCALE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    ours_transform = TrainAugment(RES, SCALE, hflip=True)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), args.samples)

        def raw_samples():
            return (s for shard in shards for s in read_shard(shard, 10**9, Skips()))

        def baseline():
            for raw in raw_samples():
                baseline_transform(Image.open(io.BytesIO(raw.members["jpg"])).convert("RGB"))
                raw.members["txt"].decode("utf-8")

        def ours():
            for offset, raw in enumerate(raw_samples()):
                decode_sample(raw, ours_transform, 30, seed=offset)

        baseline(), ours()  # warm-up: page cache, allocator
        times = {"baseline": [], "ours": []}
        for _ in range(args.repeats):
            times["baseline"].append(seconds(baseline))
            times["ours"].append(seconds(ours))
        # the part moved to the device: uint8 -> normalised float, per sample, on this CPU
        batch = torch.randint(0, 256, (128, 3, RES, RES), dtype=torch.uint8)
        scale, shift = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1)
        normalise_s = min(seconds(lambda: torch.addcmul(shift, batch.float(), scale)) for _ in range(5)) / 128

    result = {**ratio_summary(times["baseline"], times["ours"]), "samples": args.samples, "repeats": args.repeats}
    result["baseline_samples_per_s"] = args.samples / result["baseline_s"]
    result["ours_samples_per_s"] = args.samples / result["ours_s"]
    result["device_normalise_ms_per_sample_on_cpu"] = 1000 * normalise_s
    result["machine"] = machine()
    lines = [
        "# P3: input pipeline, one loader worker (`bench/bench_input.py`)",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        f"{args.samples} samples of 256 px JPEGs (quality 90) in webdataset tars -> {RES} px random resized crops.",
        "",
        "| pipeline | samples/s per worker | ms per sample |",
        "|---|---|---|",
        f"| PIL + torchvision float transforms (baseline) | {result['baseline_samples_per_s']:.0f} | "
        f"{1000 * result['baseline_s'] / args.samples:.2f} |",
        f"| project (uint8 crop, normalised on the device) | {result['ours_samples_per_s']:.0f} | "
        f"{1000 * result['ours_s'] / args.samples:.2f} |",
        "",
        f"Speed-up {result['speedup']:.2f}x [{result['speedup_min']:.2f}-{result['speedup_max']:.2f}] "
        f"(median [min-max] over {args.repeats} repeats; target >= 1.5x). The normalisation the project moves "
        f"to the device costs {result['device_normalise_ms_per_sample_on_cpu']:.3f} ms per sample when that "
        "device is this CPU.",
    ]
    print("\n".join(lines))
    if args.samples >= 512:
        write_results("input", result, lines)


if __name__ == "__main__":
    main()
