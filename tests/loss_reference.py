"""Naive float64 references for the losses of spec/ALGORITHMS.md (sections 1-6, 12), for tests only.

Everything is written straight from the formulas: explicit Python loops over anchors and
negatives, one scalar at a time, with plain ``exp`` and ``log``. Float64 holds
``exp(h / tau)`` for ``|h| <= 2`` and ``tau >= 0.005`` (at most e^400), so no stabilising
tricks are needed and none are used. Similarities are 0-dim float64 tensors so that
autograd gives the reference gradients; everything treated as ``stopgrad`` in the spec
is computed on Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def gamma_at(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """gamma_t for the 0-based ``epoch`` (spec section 2; cosine starts at 1)."""
    if schedule == "constant":
        return gamma
    if schedule == "cosine":
        if epoch >= decay_epochs:
            return gamma
        return gamma + (1.0 - gamma) * (1.0 + math.cos(math.pi * epoch / decay_epochs)) / 2.0
    raise ValueError(f"unknown gamma schedule {schedule!r}")


def eta_at(epoch: int, eta_init: float, schedule: str, eta_min: float, exp_base: float, total_epochs: int) -> float:
    """eta_t for the 0-based ``epoch`` (spec section 3; "exp" uses ``epoch`` for the spec's e-1)."""
    if schedule == "const":
        return eta_init
    if schedule == "cosine":
        return eta_min + (eta_init - eta_min) * math.cos(math.pi * epoch / (2.0 * total_epochs))
    if schedule == "exp":
        return (eta_init - eta_min) * exp_base**epoch + eta_min
    raise ValueError(f"unknown eta schedule {schedule!r}")


def similarities(image: torch.Tensor, text: torch.Tensor) -> list[list[torch.Tensor]]:
    """S[i][j] = e_i . f_j as 0-dim tensors; image, text: [B, d] float64."""
    batch = image.shape[0]
    return [[torch.dot(image[i], text[j]) for j in range(batch)] for i in range(batch)]


def clip_loss(image: torch.Tensor, text: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Section 1: mean of the image->text and text->image cross-entropies at temperature ``tau``.

    CE(S[i, :] / tau, i) is written as log(sum_j exp((s_ij - s_ii) / tau)), the same quantity with
    exponents kept inside [-2 / tau, 2 / tau].
    """
    S = similarities(image, text)
    batch = len(S)
    image_ce = sum(torch.log(sum(torch.exp((S[i][j] - S[i][i]) / tau) for j in range(batch))) for i in range(batch))
    text_ce = sum(torch.log(sum(torch.exp((S[i][j] - S[j][j]) / tau) for i in range(batch))) for j in range(batch))
    return (image_ce / batch + text_ce / batch) / 2.0


@dataclass
class SideState:
    """Per-sample state of one modality, float64 arrays of length N.

    ``u`` is the moving average itself (not its log); ``tau`` and ``m`` only change for isogclr.
    """

    u: np.ndarray
    seen: np.ndarray
    tau: np.ndarray
    m: np.ndarray
    v: np.ndarray  # fastclip_v2's second moment
    n: np.ndarray  # fastclip_v2's update count

    @classmethod
    def fresh(cls, data_size: int, tau_init: float) -> SideState:
        return cls(
            u=np.zeros(data_size),
            seen=np.zeros(data_size, dtype=bool),
            tau=np.full(data_size, tau_init),
            m=np.zeros(data_size),
            v=np.zeros(data_size),
            n=np.zeros(data_size),
        )

    def copy(self) -> SideState:
        return SideState(*(getattr(self, k).copy() for k in ("u", "seen", "tau", "m", "v", "n")))


class GCLReference:
    """Sections 2-5 on one global batch per ``step``: the GCL core with the temperature rule
    ``rule``:

    - "fixed": one temperature ``tau`` (sogclr);
    - "momentum": every sample starts at ``tau`` and moves by momentum SGD on its G (isogclr);
    - "adam": the same objective, each tau moved by Adam with per-sample moments and count
      (fastclip_v2; ``eta`` is the learning rate);
    - "global": one learned ``tau``; the step adds ``side_weight * (mean G_I + mean G_T) * tau``
      to the loss and reports that gradient in ``grad_tau`` (fastclip_v0 / v3);
    - "network": ``tau_i = tau_min + (tau_max - tau_min) * sigmoid(net(e_i))`` with ``nets`` =
      {"image"/"text": (W1 [M, d], b1 [M], w2 [M], b2 [])} float64 tensors (their gradients are
      the reference's), adding ``mean_i G_i * tau_i`` per side (isogclr_tempnet); the state
      records each sample's last tau.

    ``individual_tau=True`` is "momentum". Repeated indices: every anchor reads the state as it
    was before the step, and the value written back for an index is the one of its last
    occurrence in batch order.
    """

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(
        self,
        data_size: int,
        tau: float,
        individual_tau: bool = False,
        rho_I: float = 6.0,
        rho_T: float = 6.0,
        beta: float = 0.9,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
        rule: str | None = None,
        side_weight: float = 1.0,
        nets: dict | None = None,
    ) -> None:
        self.rule = rule or ("momentum" if individual_tau else "fixed")
        self.individual_tau = self.rule in ("momentum", "adam", "network")
        self.tau = tau
        self.rho = {"image": rho_I, "text": rho_T}
        self.beta = beta
        self.tau_min, self.tau_max = tau_min, tau_max
        self.side_weight, self.nets = side_weight, nets
        self.grad_tau = 0.0
        self.state = {"image": SideState.fresh(data_size, tau), "text": SideState.fresh(data_size, tau)}

    def step(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_idx: list[int],
        text_idx: list[int],
        gamma: float,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Surrogate LI + LT (0-dim, differentiable w.r.t. image and text [B, d]) plus the
        temperature's term of the rule; updates the state."""
        S = similarities(image, text)
        batch = len(S)
        h_image = [[S[i][j] - S[i][i] for j in range(batch) if j != i] for i in range(batch)]
        h_text = [[S[i][j] - S[j][j] for i in range(batch) if i != j] for j in range(batch)]
        self.grad_tau = 0.0
        loss_image = self._side("image", h_image, image_idx, gamma, eta, image)
        loss_text = self._side("text", h_text, text_idx, gamma, eta, text)
        return loss_image + loss_text

    def _network_tau(self, side: str, feature: torch.Tensor) -> torch.Tensor:
        W1, b1, w2, b2 = self.nets[side]
        x = [float(v) for v in feature.detach()]  # stopgrad(e_i)
        hidden = [torch.relu(sum(W1[k, d] * x[d] for d in range(len(x))) + b1[k]) for k in range(len(b1))]
        out = sum(w2[k] * hidden[k] for k in range(len(hidden))) + b2
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(out)

    def _side(self, side, h, idx, gamma, eta, features) -> torch.Tensor:
        old = self.state[side]
        new = old.copy()
        negatives = len(h) - 1
        terms, tau_terms, grads = [], [], []
        for k, a in enumerate(idx):
            if self.rule == "network":
                tau_k = self._network_tau(side, features[k])
                tau = float(tau_k.detach())
            else:
                tau = old.tau[a] if self.individual_tau else self.tau
            h_values = [float(x.detach()) for x in h[k]]
            exps = [math.exp(x / tau) for x in h_values]
            g = sum(exps) / negatives
            u = (1.0 - gamma) * old.u[a] + gamma * g if old.seen[a] else g
            weights = [e / u for e in exps]
            terms.append(sum(w * x for w, x in zip(weights, h[k], strict=True)) / negatives)
            new.u[a], new.seen[a] = u, True
            weighted_h = sum(w * x for w, x in zip(weights, h_values, strict=True)) / negatives
            grad_tau = math.log(u) + self.rho[side] - weighted_h / tau  # section 3 (rho 0: v0)
            grads.append(grad_tau)
            if self.rule == "momentum":
                m = (1.0 - self.beta) * old.m[a] + self.beta * min(max(grad_tau, -5.0), 5.0)
                new.m[a] = m
                new.tau[a] = min(max(old.tau[a] - eta * m, self.tau_min), self.tau_max)
            elif self.rule == "adam":
                (b1, b2), clipped = self.BETAS, min(max(grad_tau, -5.0), 5.0)
                n = old.n[a] + 1
                m = b1 * old.m[a] + (1 - b1) * clipped
                v = b2 * old.v[a] + (1 - b2) * clipped**2
                step = (m / (1 - b1**n)) / (math.sqrt(v / (1 - b2**n)) + self.EPS)
                new.m[a], new.v[a], new.n[a] = m, v, n
                new.tau[a] = min(max(old.tau[a] - eta * step, self.tau_min), self.tau_max)
            elif self.rule == "network":
                new.tau[a] = tau
                tau_terms.append(grad_tau * tau_k)
        self.state[side] = new
        loss = sum(terms) / len(idx)
        if self.rule == "global":
            self.grad_tau += self.side_weight * sum(grads) / len(idx)
            loss = loss + self.side_weight * sum(grads) / len(idx) * self.tau
        if self.rule == "network":
            loss = loss + sum(tau_terms) / len(idx)
        return loss


def siglip_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Section 12: -1/B sum_ij log sigmoid(z_ij (t s_ij + b)), t = exp(log_scale), written as
    -log(1 + exp(-x)) (|x| stays below ~30 here, no overflow in float64)."""
    S = similarities(image, text)
    batch = len(S)
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            x = z * (torch.exp(log_scale) * S[i][j] + bias)
            total = total - torch.log(1.0 + torch.exp(-x))
    return -total / batch


def cyclip_loss(image, text, tau: float, lambda_in: float, lambda_cross: float) -> torch.Tensor:
    """Section 6: clip + l_in * B * mean_ij (e_i.e_j - f_i.f_j)^2 + l_cross * B * mean_ij (s_ij - s_ji)^2."""
    S = similarities(image, text)
    batch = len(S)
    in_modal = sum(
        (torch.dot(image[i], image[j]) - torch.dot(text[i], text[j])) ** 2 for i in range(batch) for j in range(batch)
    )
    cross = sum((S[i][j] - S[j][i]) ** 2 for i in range(batch) for j in range(batch))
    mean = batch * batch
    return clip_loss(image, text, tau) + lambda_in * batch * in_modal / mean + lambda_cross * batch * cross / mean


def vicreg_loss(x, y, w_sim: float, w_std: float, w_cov: float) -> torch.Tensor:
    """Section 6 on unnormalised [B, d] features, one dimension and one pair at a time."""
    batch, dim = x.shape
    invariance = sum((x[i, k] - y[i, k]) ** 2 for i in range(batch) for k in range(dim)) / (batch * dim)

    def stats(z):
        mean = [sum(z[i, k] for i in range(batch)) / batch for k in range(dim)]
        cov = [
            [sum((z[i, k] - mean[k]) * (z[i, l] - mean[l]) for i in range(batch)) / (batch - 1) for l in range(dim)]
            for k in range(dim)
        ]
        hinge = sum(torch.relu(1.0 - torch.sqrt(cov[k][k] + 1e-4)) for k in range(dim)) / dim
        off = sum(cov[k][l] ** 2 for k in range(dim) for l in range(dim) if k != l) / dim
        return hinge, off

    hinge_x, off_x = stats(x)
    hinge_y, off_y = stats(y)
    return w_sim * invariance + w_std * (hinge_x / 2 + hinge_y / 2) + w_cov * (off_x + off_y)


def assert_matches(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, scale_floor: float = 1e-12) -> None:
    """Max abs error at most ``rtol`` times max(largest ``|want|``, ``scale_floor``), so entries near
    zero (or a value near zero by cancellation) do not demand impossible relative precision."""
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    assert got64.shape == want64.shape, f"{what}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    assert torch.isfinite(got64).all(), f"{what}: non-finite values {got64}"
    error = (got64 - want64).abs().max().item()
    scale = max(want64.abs().max().item(), scale_floor)
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:.1e} * {scale:.3e}"
