"""P1 (TARGETS.md): one isogclr loss step (forward, backward, state update) at global batch
B = 512, 2048, 8192, d = 256, float32, one process, against the same maths written as the
original code writes it: every B x B intermediate materialised (the similarity matrix, the
shifted differences of both directions, their division by the temperatures, a tiled maximum
for stability, the exponentials, the weights, the weighted products), autograd through them.

Both compute the same step from the same features and state; the script checks that loss,
feature gradients and new state agree before it times anything. Time: median over repeats,
the two methods alternating, with the spread of the per-repeat ratio. Memory: the peak resident
memory a step adds, measured in a fresh process per method and size (``ru_maxrss``), in units
of one B x B float32 matrix.

    python bench/bench_loss.py                      # writes bench/results/loss.{json,md}
    python bench/bench_loss.py --sizes 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bimodal_exps"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, ratio_summary, seconds, write_results
from models.losses import build_loss

DIM = 256
HP = {"tau_init": 0.03, "sogclr_gamma": 0.8, "rho_init": 6.0, "eta_init": 0.03, "beta_u": 0.9}


def inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit features with positives closer than negatives, and indices into N = 2 * batch."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, DIM, generator=gen, device="cpu"), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(batch, DIM, generator=gen, device="cpu") / DIM**0.5 * 4, dim=1)
    idx = torch.randperm(2 * batch, generator=gen, device="cpu")[:batch]
    device = torch.get_default_device()  # --device: the default device of the run
    return image.to(device), text.to(device), idx.to(device)


class OriginalISogCLR:
    """The original code's formulation, with its own state (u kept as s * exp(b), b a running max)."""

    def __init__(self, data_size: int) -> None:
        self.s = {side: torch.zeros(data_size) for side in "IT"}
        self.b = {side: torch.zeros(data_size) for side in "IT"}
        self.seen = {side: torch.zeros(data_size, dtype=torch.bool) for side in "IT"}
        self.tau = {side: torch.full((data_size,), HP["tau_init"]) for side in "IT"}
        self.m = {side: torch.zeros(data_size) for side in "IT"}

    def step(self, image: torch.Tensor, text: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch = image.shape[0]
        gamma, rho, eta, beta = HP["sogclr_gamma"], HP["rho_init"], HP["eta_init"], HP["beta_u"]
        mask_neg = 1.0 - torch.eye(batch)
        sim = image @ text.T
        diag = torch.diagonal(sim)
        diffs = {"I": sim - diag[:, None], "T": (sim - diag[None, :]).T}  # rows: anchors of each side
        loss = sim.new_zeros(())
        for side in "IT":
            tau = self.tau[side][idx]
            d_t = (diffs[side] / tau[:, None]).detach()
            b_new = torch.max(d_t, dim=1, keepdim=True)[0]  # tiled max
            exp_d = torch.exp(d_t - b_new) * mask_neg
            g = torch.sum(exp_d, dim=1, keepdim=True) / (batch - 1)
            s_old, b_old, seen = self.s[side][idx][:, None], self.b[side][idx][:, None], self.seen[side][idx][:, None]
            b = torch.where(seen, torch.maximum(b_old, b_new), b_new)
            s = torch.where(
                seen,
                (1 - gamma) * s_old * torch.exp(b_old - b) + gamma * g * torch.exp(b_new - b),
                g * torch.exp(b_new - b),
            )
            weights = exp_d * torch.exp(b_new - b) / s
            loss = loss + (torch.sum(weights * diffs[side], dim=1, keepdim=True) / (batch - 1)).mean()
            grad_tau = torch.log(s) + b + rho - torch.sum(weights * d_t, dim=1, keepdim=True) / (batch - 1)
            m = (1 - beta) * self.m[side][idx][:, None] + beta * grad_tau.clamp(-5, 5)
            with torch.no_grad():
                self.s[side][idx], self.b[side][idx], self.seen[side][idx] = s[:, 0], b[:, 0], True
                self.m[side][idx] = m[:, 0]
                self.tau[side][idx] = (tau - eta * m[:, 0]).clamp(0.005, 1.0)
        return loss


def project_step(loss_fn, image, text, idx) -> torch.Tensor:
    loss, _ = loss_fn(image, text, idx, idx)
    return loss


def one_step(method: str, batch: int):
    """A fresh loss and one step of ``method``: (loss, image grad, text grad, state dict)."""
    image, text, idx = inputs(batch)
    image, text = image.requires_grad_(True), text.requires_grad_(True)
    if method == "original":
        original = OriginalISogCLR(2 * batch)
        loss = original.step(image, text, idx)
        loss.backward()
        log_u = {side: torch.log(original.s[side]) + original.b[side] for side in "IT"}
        state = {f"{k}_{side}": v for side in "IT" for k, v in (("log_u", log_u[side]), ("tau", original.tau[side]))}
    else:
        loss_fn = build_loss("isogclr", data_size=2 * batch, **HP)
        loss = project_step(loss_fn, image, text, idx)
        loss.backward()
        state = {k: v for k, v in loss_fn.state_dict().items() if k.startswith(("log_u", "tau"))}
    state = {k: v[idx] for k, v in state.items()}
    return loss.detach(), image.grad, text.grad, state


def check_agreement(batch: int) -> float:
    """Largest relative difference between the two methods' loss, gradients and state."""
    a, b = one_step("original", batch), one_step("project", batch)
    worst = 0.0
    for x, y in [*zip(a[:3], b[:3], strict=True), *((a[3][k], b[3][k]) for k in a[3])]:
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def time_steps(batch: int, repeats: int) -> dict:
    image, text, idx = inputs(batch)
    original = OriginalISogCLR(2 * batch)
    loss_fn = build_loss("isogclr", data_size=2 * batch, **HP)

    def run(fn):
        x, y = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        fn(x, y).backward()

    steps = {
        "original": lambda: run(lambda x, y: original.step(x, y, idx)),
        "project": lambda: run(lambda x, y: project_step(loss_fn, x, y, idx)),
    }
    for fn in steps.values():  # warm-up (first visits), then revisits are timed
        fn()
    times = {name: [] for name in steps}
    sync = torch.cuda.synchronize if torch.get_default_device().type == "cuda" else None
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(seconds(fn, sync))
    return ratio_summary(times["original"], times["project"])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(method: str, batch: int) -> None:
    """In a fresh process: resident memory a (revisit) step adds at its peak, in kB, printed."""
    image, text, idx = inputs(batch)
    original = OriginalISogCLR(2 * batch) if method == "original" else None
    loss_fn = build_loss("isogclr", data_size=2 * batch, **HP) if method == "project" else None

    def step():
        x, y = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        loss = original.step(x, y, idx) if original else project_step(loss_fn, x, y, idx)
        loss.backward()
        return x.grad, y.grad

    step()  # first visits; the allocator has now seen the step once
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    grads = step()
    print(_status_kb("VmHWM") - before, len(grads))


def peak_matrices(method: str, batch: int) -> float:
    """Peak memory one step adds, in B x B float32 matrices: on a GPU its allocator's peak, on a
    CPU the resident memory of a fresh process (Linux)."""
    if torch.get_default_device().type == "cuda":
        one_step(method, batch)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = one_step(method, batch)
        torch.cuda.synchronize()
        del grads
        return (torch.cuda.max_memory_allocated() - before) / (batch * batch * 4)
    code = (
        f"import sys; sys.path.insert(0, 'bench'); import torch; torch.set_num_threads({torch.get_num_threads()}); "
        f"import bench_loss; bench_loss.measure_peak({method!r}, {batch})"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=True)
    return int(out.stdout.split()[0]) * 1024 / (batch * batch * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_default_device(args.device)
    rows = []
    for batch in args.sizes:
        agreement = check_agreement(min(batch, 2048))
        assert agreement < 1e-3, f"the two methods disagree by {agreement:.2e} at B={batch}"
        repeats = args.repeats if batch < 8192 else max(3, args.repeats // 2)
        timing = time_steps(batch, repeats)
        torch.set_flush_denormal(True)  # the same comparison with subnormal numbers flushed to 0 for both (CPU)
        flushed = time_steps(batch, repeats)
        torch.set_flush_denormal(False)
        memory = {m: peak_matrices(m, batch) for m in ("original", "project")}
        rows.append(
            {
                "batch": batch,
                **timing,
                "speedup_flushed": flushed["speedup"],
                "agreement": agreement,
                "peak_bxb_original": memory["original"],
                "peak_bxb_project": memory["project"],
            }
        )
        print(json.dumps(rows[-1]))
    result = {"rows": rows, "dim": DIM, "machine": machine(), "hyperparameters": HP}
    lines = [
        "# P1: isogclr loss step against the materialised original form (`bench/bench_loss.py`)",
        "",
        f"Machine: {machine_line(result['machine'])}; device {args.device}. d = {DIM}, float32, one process;",
        "forward, backward and state update of the revisit step; median over repeats, spread of the per-repeat",
        "ratio in brackets.",
        "",
        "| B | original (ms) | project (ms) | speed-up | speed-up, subnormals flushed | peak extra memory in B x B "
        "matrices: original | project |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {1000 * r['baseline_s']:.1f} | {1000 * r['ours_s']:.1f} | {r['speedup']:.2f}x "
            f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | {r['speedup_flushed']:.2f}x | "
            f"{r['peak_bxb_original']:.1f} | {r['peak_bxb_project']:.1f} |"
        )
    lines += [
        "",
        "Targets: >= 2x at B = 2048 and 8192; at most 4 B x B float32 matrices of extra memory. The two",
        f"methods agree to {max(r['agreement'] for r in rows):.1e} (relative) in loss, gradients and state.",
    ]
    print("\n".join(lines))
    if args.sizes == [512, 2048, 8192] or args.device != "cpu":
        write_results("loss" if args.device == "cpu" else f"loss_{args.device}", result, lines)


if __name__ == "__main__":
    main()
