"""Evaluating or resuming never downloads (TARGETS R10): the checkpoint folder is enough.

A run starts from "pretrained" encoders named by hub names (``--init_model``, a timm model with
hub weights, a Hugging Face text encoder), served offline from a Hugging Face cache that the test
writes in the hub's own layout (``models--ORG--NAME/refs/main``, ``snapshots/<commit>/...``) with
random weights. Then the cache goes away, as on a compute node without internet or without the
login node's cache, and ``--evaluate --checkpoint`` and ``--resume`` must still work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from tiny_run import tiny_run_args

CLIP = Path(__file__).resolve().parents[1] / "bimodal_exps" / "clip.py"

TEXT_HUB_NAME = "test-org/tiny-bert"
IMAGE_MODEL = "test_resnet"  # timm's own tiny test model, weights on the hub as timm/test_resnet.r160_in1k
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a hub cache (``refs/main`` points at it)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tiny_dataset, tmp_path_factory) -> Path:
    """HF_HOME with a cached text encoder (config, tokenizer, weights) and cached timm weights."""
    home = tmp_path_factory.mktemp("hf_home")
    text = cache_repo(home / "hub", TEXT_HUB_NAME)
    for f in (tiny_dataset / "text_encoder").iterdir():
        shutil.copy(f, text / f.name)
    AutoModel.from_config(AutoConfig.from_pretrained(text)).save_pretrained(text)
    image = cache_repo(home / "hub", f"timm/{IMAGE_MODEL}.r160_in1k")
    save_file(timm.create_model(IMAGE_MODEL).state_dict(), image / "model.safetensors")
    (image / "config.json").write_text(json.dumps({"architecture": IMAGE_MODEL, "num_classes": 1000}))
    return home


def run_args(root: Path, out: Path, **extra) -> list[str]:
    return tiny_run_args(
        root,
        out,
        init_model=True,
        image_encoder=IMAGE_MODEL,
        image_encoder_kwargs="{}",
        text_encoder=TEXT_HUB_NAME,
        **{"epochs": 1, **extra},
    )


def clip_py(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    """clip.py offline in a process of its own (the hub library reads HF_HOME when imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hf_home)}
    return subprocess.run([sys.executable, str(CLIP), *args], capture_output=True, text=True, env=env, timeout=600)


def test_evaluate_and_resume_need_only_the_checkpoint_folder(tiny_dataset, hf_home, tmp_path):
    out = tmp_path / "run"
    trained = clip_py(run_args(tiny_dataset, out), hf_home)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "text_encoder" / "config.json").is_file() and (out / "text_encoder" / "tokenizer.json").is_file()

    compute_node = tmp_path / "empty_cache"  # nothing cached, no internet
    evaluated = run_args(tiny_dataset, out, evaluate=True, checkpoint=out / "checkpoint_0.pth")
    done = clip_py(evaluated, compute_node)
    assert done.returncode == 0, done.stderr[-3000:]
    done = clip_py(run_args(tiny_dataset, out, epochs=2, resume="auto"), compute_node)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    lines = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["tag"] for e in lines if e["dataset"] == "synthetic_test"] == ["untrained", "final", "evaluate", "final"]

    # without the stored text encoder files the hub name would be needed: one clear message
    shutil.rmtree(out / "text_encoder")
    done = clip_py(evaluated, compute_node)
    assert done.returncode == 2
    assert TEXT_HUB_NAME in done.stderr and "HF_HOME" in done.stderr and "Traceback" not in done.stderr
