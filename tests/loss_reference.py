"""Naive float64 references for the losses of spec/ALGORITHMS.md (sections 1-3), for tests only.

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

    @classmethod
    def fresh(cls, data_size: int, tau_init: float) -> SideState:
        return cls(
            u=np.zeros(data_size),
            seen=np.zeros(data_size, dtype=bool),
            tau=np.full(data_size, tau_init),
            m=np.zeros(data_size),
        )

    def copy(self) -> SideState:
        return SideState(self.u.copy(), self.seen.copy(), self.tau.copy(), self.m.copy())


class GCLReference:
    """Sections 2 (``individual_tau=False``, temperature ``tau``) and 3 (``individual_tau=True``,
    every sample starts at ``tau``) on one global batch per ``step``.

    Repeated indices: every anchor reads the state as it was before the step, and the value
    written back for an index is the one of its last occurrence in batch order.
    """

    def __init__(
        self,
        data_size: int,
        tau: float,
        individual_tau: bool,
        rho_I: float = 6.0,
        rho_T: float = 6.0,
        beta: float = 0.9,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
    ) -> None:
        self.tau = tau
        self.individual_tau = individual_tau
        self.rho = {"image": rho_I, "text": rho_T}
        self.beta = beta
        self.tau_min, self.tau_max = tau_min, tau_max
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
        """Surrogate LI + LT (0-dim, differentiable w.r.t. image and text [B, d]); updates the state."""
        S = similarities(image, text)
        batch = len(S)
        h_image = [[S[i][j] - S[i][i] for j in range(batch) if j != i] for i in range(batch)]
        h_text = [[S[i][j] - S[j][j] for i in range(batch) if i != j] for j in range(batch)]
        loss_image = self._side("image", h_image, image_idx, gamma, eta)
        loss_text = self._side("text", h_text, text_idx, gamma, eta)
        return loss_image + loss_text

    def _side(self, side: str, h: list[list[torch.Tensor]], idx: list[int], gamma: float, eta: float) -> torch.Tensor:
        old = self.state[side]
        new = old.copy()
        negatives = len(h) - 1
        terms = []
        for k, a in enumerate(idx):
            tau = old.tau[a] if self.individual_tau else self.tau
            h_values = [float(x.detach()) for x in h[k]]
            exps = [math.exp(x / tau) for x in h_values]
            g = sum(exps) / negatives
            u = (1.0 - gamma) * old.u[a] + gamma * g if old.seen[a] else g
            weights = [e / u for e in exps]
            terms.append(sum(w * x for w, x in zip(weights, h[k], strict=True)) / negatives)
            new.u[a], new.seen[a] = u, True
            if self.individual_tau:
                weighted_h = sum(w * x for w, x in zip(weights, h_values, strict=True)) / negatives
                grad_tau = math.log(u) + self.rho[side] - weighted_h / tau
                m = (1.0 - self.beta) * old.m[a] + self.beta * min(max(grad_tau, -5.0), 5.0)
                new.m[a] = m
                new.tau[a] = min(max(old.tau[a] - eta * m, self.tau_min), self.tau_max)
        self.state[side] = new
        return sum(terms) / len(idx)


def assert_matches(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, scale_floor: float = 1e-12) -> None:
    """Max abs error at most ``rtol`` times max(largest ``|want|``, ``scale_floor``), so entries near
    zero (or a value near zero by cancellation) do not demand impossible relative precision."""
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    assert got64.shape == want64.shape, f"{what}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    assert torch.isfinite(got64).all(), f"{what}: non-finite values {got64}"
    error = (got64 - want64).abs().max().item()
    scale = max(want64.abs().max().item(), scale_floor)
    assert error <= rtol * scale, f"{what}: max abs error {error:.3e} > {rtol:.1e} * {scale:.3e}"
