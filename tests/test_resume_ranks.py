"""Resume is decided once (TARGETS R9): rank 0 chooses the checkpoint and every rank loads that
file, or every rank stops with one message naming the rank and the path.

A rank that sees other files than rank 0 (node-local scratch, a shared file system that lags)
is modelled for real: rank 1 runs in a mount namespace of its own, where the run's output
folder is another folder bind-mounted over it, so the same path shows it different files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import clip
from engine.checkpoint import load_checkpoint
from tiny_run import tiny_run_args

CLIP = Path(__file__).resolve().parents[1] / "bimodal_exps" / "clip.py"


def mount_namespaces_unavailable() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to give one rank its own view of the file system"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare --mount fails here: {probe.stderr.decode()[:200]}"


def run_two_ranks_rank1_seeing(view: Path, out: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """torchrun with 2 ranks; rank 1 sees ``view`` where the others see ``out``."""
    wrapper = tmp_path / "rank.sh"
    rank1 = f"exec unshare --mount --propagation private bash -c 'mount --bind {view} {out} && exec \"$@\"' rank1"
    wrapper.write_text(f'#!/bin/bash\nif [ "$LOCAL_RANK" = 1 ]; then\n    {rank1} "$@"\nfi\nexec "$@"\n')
    wrapper.chmod(0o755)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun, str(wrapper), sys.executable, str(CLIP), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("view", ["empty", "stale"])
def test_a_rank_that_sees_other_files_stops_every_rank(tiny_dataset, tmp_path, view):
    reason = mount_namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    one_epoch = tiny_run_args(tiny_dataset, out, epochs=1, batch_size_train=16)
    assert clip.main(one_epoch) == 0
    seen_by_rank1 = tmp_path / "rank1_view"
    if view == "empty":  # node-local storage without the run's files
        seen_by_rank1.mkdir()
    else:  # storage that lags: the files of one epoch earlier, under the newest name
        shutil.copytree(out, seen_by_rank1)
        assert clip.main(tiny_run_args(tiny_dataset, out, epochs=2, batch_size_train=16, resume="auto")) == 0
        shutil.copy(out / "checkpoint_0.pth", seen_by_rank1 / "checkpoint_1.pth")
    before = sorted(p.name for p in out.iterdir())
    log_before = (out / "log.jsonl").read_text()

    args = tiny_run_args(tiny_dataset, out, epochs=3, batch_size_train=8, resume="auto")
    done = run_two_ranks_rank1_seeing(seen_by_rank1, out, args, tmp_path)
    assert done.returncode != 0, done.stdout[-3000:]
    chosen = out / ("checkpoint_0.pth" if view == "empty" else "checkpoint_1.pth")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]  # one message, from rank 0, for every rank
    assert f"cannot resume from {chosen}" in errors[0]
    if view == "empty":
        assert "rank 1 cannot read it (FileNotFoundError" in errors[0]
    else:
        old, new = (load_checkpoint(out / f"checkpoint_{e}.pth")["progress"]["step"] for e in (0, 1))
        assert f"rank 1 reads step {old} from it, rank 0 step {new}" in errors[0]
    # nothing was trained or written: the run folder is as it was
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "log.jsonl").read_text() == log_before
