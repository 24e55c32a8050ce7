"""plot.py on a tiny isogclr run: training curves, recall, temperature histograms, missing inputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip
import plot
from engine.temperatures import read_temperatures, snapshot_epochs
from tiny_run import tiny_run_args

PLOT_PY = Path(plot.__file__)


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory):
    """A 2-epoch isogclr run: log.jsonl, eval.jsonl and two temperature snapshots."""
    out = tmp_path_factory.mktemp("plot") / "isogclr"
    assert clip.main(tiny_run_args(tiny_dataset, out, ita_type="isogclr")) == 0
    return out


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file
        assert image.width > 100 and image.height > 100


def test_plots_of_a_run(run_dir, capsys):
    assert sorted(p.name for p in (run_dir / "temperatures").glob("*.npz")) == ["epoch_0.npz", "epoch_1.npz"]
    assert plot.main([str(run_dir)]) == 0
    out = run_dir / "plots"
    names = ("training.png", "recall.png", "temperatures.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert_png(out / name)
    printed = capsys.readouterr().out
    assert all(f"wrote {out / name}" in printed for name in names)


def test_missing_inputs_leave_out_their_plots(run_dir, tmp_path):
    """Without temperatures: no histogram; without eval.jsonl: no recall; a torn last line is skipped."""
    partial = tmp_path / "run"
    partial.mkdir()
    shutil.copy(run_dir / "log.jsonl", partial)
    shutil.copy(run_dir / "eval.jsonl", partial)
    written = plot.make_plots(partial, tmp_path / "a")
    assert [p.name for p in written] == ["training.png", "recall.png"]

    (partial / "eval.jsonl").unlink()
    with open(partial / "log.jsonl", "a") as f:
        f.write('{"step": 99, "epo')  # killed mid-write
    written = plot.make_plots(partial, tmp_path / "b")
    assert written == [tmp_path / "b" / "training.png"]
    assert_png(written[0])


def test_a_folder_without_log_jsonl_is_an_error(tmp_path):
    (tmp_path / "eval.jsonl").write_text("")
    result = subprocess.run([sys.executable, str(PLOT_PY), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'log.jsonl'} not found: RUN_DIR must be a run's --output_dir"
    assert not (tmp_path / "plots").exists()


def split_snapshot(whole: Path, folder: Path, epoch: int, world: int, keep: list[int]) -> None:
    """Write ``whole``'s arrays as an owner-sharded run's parts (index mod world), only ranks ``keep``."""
    with np.load(whole) as arrays:
        for r in keep:
            part = {}
            for side in ("image", "text"):
                idx, tau = arrays[f"{side}_index"], arrays[f"{side}_tau"]
                part[f"{side}_index"], part[f"{side}_tau"] = idx[idx % world == r], tau[idx % world == r]
            np.savez_compressed(folder / f"epoch_{epoch}.part-{r}-of-{world}.npz", **part)


def test_sharded_snapshots_read_whole_and_incomplete_ones_skipped(run_dir, tmp_path, capsys):
    """An owner-sharded run's snapshot parts read back as the whole snapshot; one with a part
    missing (still being written) is refused by name, and plot.py leaves that epoch out."""
    folder = tmp_path / "temperatures"
    folder.mkdir()
    split_snapshot(run_dir / "temperatures" / "epoch_0.npz", folder, 0, 2, [1, 0])
    split_snapshot(run_dir / "temperatures" / "epoch_1.npz", folder, 1, 3, [0, 2])
    assert snapshot_epochs(folder) == [0, 1]
    with np.load(run_dir / "temperatures" / "epoch_0.npz") as whole:
        for side, (idx, tau) in read_temperatures(folder, 0).items():
            np.testing.assert_array_equal(idx, whole[f"{side}_index"])
            np.testing.assert_array_equal(tau, whole[f"{side}_tau"])
    with pytest.raises(FileNotFoundError, match=r"epoch 1 .* is incomplete: parts \['epoch_1.part-0-of-3.npz', "):
        read_temperatures(folder, 1)
    assert plot.plot_temperatures(folder, tmp_path / "t.png") == tmp_path / "t.png"
    assert_png(tmp_path / "t.png")
    assert "skipped: the temperature snapshot of epoch 1" in capsys.readouterr().err
