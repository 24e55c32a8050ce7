"""What every benchmark shares: the machine it ran on, repeated timings, result files.

Speed figures are ratios against a baseline measured in the same process (spec/TARGETS.md),
reported as the median over repeats with the spread [min-max] of the per-repeat ratios.
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model (lscpu), whether it has AVX-512, torch threads, torch and Python versions."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "cpu": fields.get("Model name", platform.processor() or "unknown").strip()
        + (f" (family {fields['CPU family'].strip()} model {fields['Model'].strip()})" if "Model" in fields else ""),
        "cpu_cores": int(fields.get("CPU(s)", "0").strip() or 0),
        "avx512": "avx512f" in flags,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(m: dict) -> str:
    vector = "AVX-512" if m["avx512"] else "AVX2, no AVX-512"
    gpu = f"; GPU {m['gpu']}" if m["gpu"] else ""
    return f"{m['cpu']} ({m['cpu_cores']} cores, {vector}), {m['torch_threads']} torch threads{gpu}; torch {m['torch']}"


def seconds(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one call (after ``sync``, e.g. torch.cuda.synchronize, on both sides)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def ratio_summary(baseline: list[float], ours: list[float]) -> dict:
    """Speed-up baseline/ours per repeat (paired): median and [min, max], and the median times."""
    ratios = [b / o for b, o in zip(baseline, ours, strict=True)]
    return {
        "baseline_s": statistics.median(baseline),
        "ours_s": statistics.median(ours),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def write_results(name: str, data: dict, markdown: list[str]) -> None:
    """``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {RESULTS / name}.json and .md")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
