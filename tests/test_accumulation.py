"""Exact gradient accumulation (ALGORITHMS.md 10, TARGETS S1): K micro-batches per rank equal one
step on the concatenated global batch, for every loss, on 1 and on 2 gloo ranks.

Each step's parameter gradients (encoders and the loss's own parameters, as the optimiser
receives them), the logged loss and the loss state after every step are compared against the
same rows taken whole (``accum_freq`` 1, the ordinary DDP step). The encoders learn with lr 0
here: their gradients are compared every step, but their weights stay put, because a weight
change of float32 rounding size (the two paths sum gradients in another order) moves the
similarities by ~1e-7, which 1/tau = 200 turns into 1e-5 in log u, the tolerance itself. That
two ranks equal one process is tests/test_distributed_training.py's concern.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import traceback

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.accumulate import accumulate_gradients
from engine.checkpoint import load_checkpoint
from engine.step import ContrastiveStep
from models.losses import build_loss
from models.model_clip import CLIPModel
from test_distributed_training import close, free_port
from test_interruptions import CLIP, ENV, log_steps, run_args, start, wait_for
from test_losses_distributed import CASES, LAYOUTS, N, check_state
from tiny_training import ListData, make_trainer, tiny_model

GLOBAL, MICRO = 32, 8  # one process: 4 micro-batches of 8; two ranks: 4 of 4 each
# Per step, the global batch's indices: repeats inside a batch fall in different micro-batches
# (and, with 2 ranks, on different ranks), and later steps revisit earlier indices.
INDEX_SETS = [
    [*range(16), 3, *range(16, 20), 0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15],
    [19, *range(5, 20), *range(5), 7, 7, 2, 1, 0, 4, 3, 6, 11, 12, 18],
]


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for idx in INDEX_SETS:
        assert len(idx) == GLOBAL and max(idx) < N
        out.append(
            {
                "image": torch.randint(0, 256, (GLOBAL, 3, 16, 16), generator=g, dtype=torch.uint8),
                "input_ids": torch.randint(1, 40, (GLOBAL, 7), generator=g),
                "attention_mask": (torch.arange(7) < torch.randint(3, 8, (GLOBAL, 1), generator=g)).long(),
                "image_idx": torch.tensor(idx),
                "text_idx": torch.tensor(idx[::-1]),
            }
        )
    return out


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


class RecordingSGD(torch.optim.SGD):
    """SGD (lr 0 for the encoders, 0.01 for the loss) that keeps every step's gradients by name."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module) -> None:
        named = {f"model.{k}": v for k, v in model.named_parameters()}
        named |= {f"loss.{k}": v for k, v in loss_fn.named_parameters()}
        super().__init__(
            [{"params": list(model.parameters()), "lr": 0.0}, {"params": list(loss_fn.parameters()), "lr": 0.01}]
        )
        self.named, self.grads = named, []

    def step(self, closure=None):
        self.grads.append({n: p.grad.clone() for n, p in self.named.items() if p.grad is not None})
        return super().step(closure)


def run_steps(model, loss_fn, step_batches: list[list[dict]], tmp_dir, accum_freq: int):
    """One train_epoch per step (``accum_freq`` micro-batches each): the parameter gradients,
    logged losses and the loss state after every step."""
    optimizer = RecordingSGD(model, loss_fn)
    trainer = make_trainer(model, loss_fn, optimizer, tmp_dir, accum_freq=accum_freq)
    losses, states = [], []
    for micro in step_batches:  # one epoch each: the loss's schedules move too
        assert trainer.train_epoch(ListData(micro))
        losses.append(trainer.last_log["loss"])
        states.append({k: v.clone() for k, v in loss_fn.state_dict().items()})
    return optimizer.grads, losses, states


def compare(got, want, what: str) -> list[str]:
    problems = []
    for step, (g_grads, w_grads) in enumerate(zip(got[0], want[0], strict=True)):
        assert g_grads.keys() == w_grads.keys()
        problems += [f"{what} step {step}: gradient of {k}" for k in w_grads if not close(g_grads[k], w_grads[k])]
    problems += [
        f"{what} step {s}: loss {g} != {w}"
        for s, (g, w) in enumerate(zip(got[1], want[1], strict=True))
        if abs(g - w) > 1e-5 * max(1.0, abs(w))
    ]
    for step, (g_state, w_state) in enumerate(zip(got[2], want[2], strict=True)):
        try:
            check_state(g_state, w_state, f"{what} step {step}")
        except AssertionError as err:
            problems.append(str(err))
    return problems


def setups():
    """(case, fresh model, fresh loss) for every loss of the distributed tests."""
    for case, (name, hp) in CASES.items():
        torch.manual_seed(0)
        yield case, tiny_model(), build_loss(name, data_size=N, embed_dim=8, **hp)


def reference(model, loss_fn, tmp_dir):
    return run_steps(model, loss_fn, [[b] for b in batches()], tmp_dir, accum_freq=1)


def test_micro_batches_equal_one_batch_in_one_process(tmp_path):
    problems = []
    for case, model, loss_fn in setups():
        fresh = copy.deepcopy(model), copy.deepcopy(loss_fn)
        want = reference(model, loss_fn, tmp_path)
        micro = [[rows(b, s, s + MICRO) for s in range(0, GLOBAL, MICRO)] for b in batches()]
        got = run_steps(*fresh, micro, tmp_path, accum_freq=GLOBAL // MICRO)
        problems += compare(got, want, case)
    assert not problems, problems


def child(rank: int, world: int, port: int, tmp_dir: str) -> None:
    """Each rank: its 16 rows of every global batch whole, then as 4 micro-batches of 4, with the
    per-sample state replicated and owner-sharded."""
    torch.set_num_threads(1)
    problems = []
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        local = GLOBAL // world
        micro = local // 4
        for (case, model, loss_fn), layout in itertools.product(setups(), LAYOUTS):
            if layout == "owner":
                loss_fn.shard_state(rank, world)
            fresh = copy.deepcopy(model), copy.deepcopy(loss_fn)
            whole = [[rows(b, rank * local, (rank + 1) * local)] for b in batches()]
            want = run_steps(model, loss_fn, whole, tmp_dir, accum_freq=1)
            steps = [
                [rows(b, rank * local + s, rank * local + s + micro) for s in range(0, local, micro)] for b in batches()
            ]
            got = run_steps(*fresh, steps, tmp_dir, accum_freq=4)
            problems += compare(got, want, f"{case} {layout} state rank {rank}")
    except Exception:
        problems.append(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(tmp_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"problems": problems}, f)


def test_micro_batches_on_two_ranks_equal_one_process(tmp_path):
    mp.spawn(child, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        problems = json.loads((tmp_path / f"rank{rank}.json").read_text())["problems"]
        assert not problems, f"rank {rank}: {problems}"


def _micro_batches(n: int = 4, size: int = 6) -> list[dict]:
    b = batches()[0]
    return [rows(b, s, s + size) for s in range(0, n * size, size)]


def test_dropout_sees_the_same_masks_in_both_passes():
    """With dropout, the accumulated gradient is that of the loss on the first pass's features:
    the re-embedding restores each micro-batch's random state."""
    step = ContrastiveStep(tiny_model(dropout=0.3), build_loss("clip", N, temp=0.05), None).train()
    micro = _micro_batches()

    torch.manual_seed(7)
    feats = [step.embed(m["image"], m["input_ids"], m["attention_mask"]) for m in micro]
    out = step.loss_on(
        torch.cat([f[0] for f in feats]),
        torch.cat([f[1] for f in feats]),
        torch.cat([m["image_idx"] for m in micro]),
        torch.cat([m["text_idx"] for m in micro]),
    )
    out.loss.backward()
    want = {k: p.grad.clone() for k, p in step.named_parameters() if p.grad is not None}
    step.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    got_out = accumulate_gradients(step, micro, lambda loss: loss)
    assert torch.allclose(got_out.loss, out.loss, rtol=1e-6)
    for key, grad in want.items():
        got = dict(step.named_parameters())[key].grad
        assert close(got, grad), key


def test_batchnorm_statistics_are_updated_once_per_micro_batch():
    torch.manual_seed(0)
    model = CLIPModel(timm.create_model("test_resnet", num_classes=0), tiny_model().text_encoder, embed_dim=8)
    step = ContrastiveStep(model, build_loss("sogclr", N, temp=0.05), None).train()
    micro = _micro_batches()
    expected = copy.deepcopy(model).train()
    with torch.no_grad():
        for m in micro:
            expected.encode_image(m["image"])
    accumulate_gradients(step, micro, lambda loss: loss)
    bn = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn, "test_resnet should have BatchNorm layers"
    want = dict(expected.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, want[name]), name
    assert all(int(m.num_batches_tracked) == len(micro) for _, m in bn)


def test_a_stop_request_during_a_step_ends_it_first(tmp_path):
    """A signal that arrives while a step's micro-batches are being read stops the run after
    that step, at a step boundary: the checkpoint's data position is a whole number of steps."""
    model, loss_fn = tiny_model(), build_loss("isogclr", N, tau_init=0.05)
    trainer = make_trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, accum_freq=4)

    class Positions(ListData):
        def advance(self, position, batch):
            if position == 1:  # reading the second micro-batch of step 1 (of 2)
                trainer.stop.signal_name = "SIGTERM"
            return (position or 0) + 1

    micro = [rows(b, s, s + MICRO) for b in batches() for s in range(0, GLOBAL, MICRO)]
    assert not trainer.train_epoch(Positions(micro))
    state = load_checkpoint(trainer.checkpoints.latest())
    assert state["progress"]["step"] == 1 and state["progress"]["epoch_step"] == 1
    assert state["per_rank"][0]["data_position"] == 4 and state["accum_freq"] == 4


def test_resume_with_another_accum_freq_restarts_the_epoch(tmp_path, caplog):
    model, loss_fn = tiny_model(), build_loss("clip", N, temp=0.05)
    trainer = make_trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, accum_freq=2)
    micro = [rows(batches()[0], s, s + MICRO) for s in range(0, GLOBAL, MICRO)]
    trainer.progress.epoch_step = 1  # as if stopped mid-epoch
    trainer.data_position = {"batches": 2}
    state = trainer.state_dict()
    other = make_trainer(
        copy.deepcopy(model),
        copy.deepcopy(loss_fn),
        torch.optim.SGD(model.parameters(), lr=0.1),
        tmp_path,
        accum_freq=4,
    )
    other.load_state_dict(state)
    assert other.progress.epoch_step == 0 and other.data_position is None
    assert "--accum_freq 2, this run has 1 and 4" in caplog.text
    assert other.train_epoch(ListData(micro))


def test_killed_accumulating_run_resumes_exactly(tiny_dataset, tmp_path):
    """clip.py with --accum_freq 2 and 2 loader workers, killed mid-epoch, then --resume auto: the
    same weights, loss state and progress as the run never interrupted."""
    args = {"accum_freq": 2, "batch_size_train": 16, "save_every_steps": 4, "epochs": 1}
    whole = subprocess.run(
        [sys.executable, str(CLIP), *run_args(tiny_dataset, tmp_path / "whole", **args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert "global batch 32 (16 per rank x 1 ranks x 2 micro-batches)" in whole.stdout

    out = tmp_path / "killed"
    proc = start(run_args(tiny_dataset, out, **args))
    wait_for(lambda: (out / "checkpoint_step4.pth").exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(
        [sys.executable, str(CLIP), *run_args(tiny_dataset, out, resume="auto", **args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    want = load_checkpoint(tmp_path / "whole" / "checkpoint_latest.pth")
    got = load_checkpoint(out / "checkpoint_latest.pth")
    assert got["progress"] == want["progress"] and want["progress"]["step"] == 400 // 32
    for part in ("model", "loss"):
        for key, value in want[part].items():
            assert torch.allclose(got[part][key].double(), value.double(), atol=1e-6, rtol=0), f"{part}.{key}"
    assert log_steps(out) == log_steps(tmp_path / "whole")
