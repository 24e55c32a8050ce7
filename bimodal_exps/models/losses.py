"""Contrastive losses for image-text pairs (spec: ALGORITHMS.md).

Every loss takes this rank's local batch of L2-normalised features and their dataset
indices, and computes only its *local anchors* against the features gathered from
all ranks (``parallel.all_gather_with_grad``). Each rank returns the mean over its own
anchors; because the gather's backward sums gradients over ranks, DDP's averaging of
parameter gradients then yields exactly the single-process gradient of the global
batch.

Per-sample state (``u``, ``tau``, momentum) lives in buffers indexed by dataset index.
After every step all ranks write the new values of every sample of the global batch,
so any rank's ``state_dict()`` is complete. An index that occurs several times in one
global batch: all occurrences compute from the state before the step, and the value
kept is that of the last occurrence in global batch order (rank 0 first).

The GCL losses keep ``log u`` instead of ``u`` so that ``exp(h / tau)`` never
overflows: with tau = 0.005 and h in [-2, 2], ``h / tau`` reaches +-400.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import parallel

LOSS_ALIASES = {"sogclr_dro": "isogclr"}


@dataclass
class _GlobalBatch:
    """Similarities of this rank's anchors against the gathered global batch.

    sim_img: [b, B] rows s_ij for local image anchors i and every text j.
    sim_txt: [b, B] rows s_ij (as a function of i) for local text anchors j.
    pos: [b] column of each local anchor's positive in those rows.
    """

    sim_img: torch.Tensor
    sim_txt: torch.Tensor
    pos: torch.Tensor


def _gather_similarities(image_feat: torch.Tensor, text_feat: torch.Tensor) -> _GlobalBatch:
    image_feat, text_feat = image_feat.float(), text_feat.float()
    all_image = parallel.all_gather_with_grad(image_feat)
    all_text = parallel.all_gather_with_grad(text_feat)
    b = image_feat.shape[0]
    pos = torch.arange(b, device=image_feat.device) + parallel.rank() * b
    sim_img = image_feat @ all_text.T
    # one process: the text anchors' rows are the columns of the same matrix (no second matmul)
    sim_txt = sim_img.T if parallel.world_size() == 1 else text_feat @ all_image.T
    return _GlobalBatch(sim_img, sim_txt, pos)


def _check_inputs(image_feat, text_feat, image_idx, text_idx, data_size: int | None) -> None:
    b = image_feat.shape[0]
    if image_feat.shape != text_feat.shape or image_feat.dim() != 2:
        raise ValueError(
            f"image and text features must both be [batch, dim]; got {tuple(image_feat.shape)} "
            f"and {tuple(text_feat.shape)}"
        )
    if b * parallel.world_size() < 2:
        raise ValueError(
            "a contrastive loss needs at least 2 samples in the global batch (no negatives "
            "otherwise); increase --batch_size_train"
        )
    if data_size is None:
        return
    for name, idx in (("image", image_idx), ("text", text_idx)):
        if idx.shape != (b,):
            raise ValueError(f"{name}_idx must have shape [{b}], got {tuple(idx.shape)}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= data_size:
            bad = hi if hi >= data_size else lo
            raise ValueError(
                f"{name} index {bad} is outside [0, {data_size}): --data_size must exceed the "
                f"largest sample index; set --data_size to at least {max(hi + 1, data_size)}"
            )


def _floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats with a single device sync."""
    values = torch.stack([v.detach().float() for v in stats.values()]).tolist()
    return dict(zip(stats, values, strict=True))


def _last_occurrence_values(idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Replace each row of ``values`` [n, k] by the row of the last occurrence of its index.

    Writing the result with ``buffer[idx] = ...`` is then deterministic (duplicates
    carry equal values) without a host sync.
    """
    n = idx.shape[0]
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    is_last = torch.ones(n, dtype=torch.bool, device=idx.device)
    is_last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    position = torch.arange(n, device=idx.device)
    run_end = torch.where(is_last, position, torch.full_like(position, n))
    run_end = torch.flip(torch.cummin(torch.flip(run_end, [0]), 0).values, [0])
    out = torch.empty_like(values)
    out[order] = values[order[run_end]]
    return out


class ContrastiveLoss(nn.Module):
    """Base class: input checks, epoch bookkeeping, state synchronisation."""

    def __init__(self, data_size: int | None = None) -> None:
        super().__init__()
        self.data_size = data_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch that drives the gamma / eta schedules."""
        self.epoch = epoch

    def _write_state(self, columns: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Write new per-sample values for the whole global batch on every rank.

        ``columns`` maps a buffer name to (local indices [b], new local values [b]).
        Values of all ranks are gathered in one collective; nothing is written when any
        value is non-finite. Returns that all-finite flag (a 0-dim bool tensor).
        """
        names = list(columns)
        # [b, 2 * len(names)] of (index, value) pairs; float64 holds indices exactly up to 2**53
        packed = torch.stack([t.double() for name in names for t in columns[name]], dim=1)
        packed = parallel.all_gather_cat(packed)
        finite = torch.isfinite(packed).all()
        for k, name in enumerate(names):
            buffer = getattr(self, name)
            idx = packed[:, 2 * k].long()
            new = _last_occurrence_values(idx, packed[:, 2 * k + 1 : 2 * k + 2])[:, 0]
            buffer[idx] = torch.where(finite, new, buffer[idx].double()).to(buffer.dtype)
        return finite


class CLIPLoss(ContrastiveLoss):
    """Mini-batch InfoNCE (ALGORITHMS.md 1) with a fixed or learnable temperature."""

    TEMP_RANGE = (0.001, 0.5)

    def __init__(self, data_size: int | None = None, temp: float = 0.01, learnable_temp: bool = False):
        super().__init__(data_size)
        if learnable_temp:
            self.temp = nn.Parameter(torch.tensor(float(temp)))
        else:
            self.register_buffer("temp", torch.tensor(float(temp)), persistent=False)
        self.learnable_temp = learnable_temp

    def forward(self, image_feat, text_feat, image_idx, text_idx):
        _check_inputs(image_feat, text_feat, image_idx, text_idx, self.data_size)
        if self.learnable_temp:
            with torch.no_grad():
                self.temp.clamp_(*self.TEMP_RANGE)
        batch = _gather_similarities(image_feat, text_feat)
        loss = 0.5 * (
            F.cross_entropy(batch.sim_img / self.temp, batch.pos)
            + F.cross_entropy(batch.sim_txt / self.temp, batch.pos)
        )
        return loss, {"temp": float(self.temp.detach())}


@dataclass
class _AnchorTerms:
    """What the GCL core computes for b anchors of one direction.

    terms [b]: the surrogate ``1/(B-1) sum_{j != i} w_ij h_ij``; its gradient is the GCL
    gradient (the weights are constants). log_g [b]: log of the batch estimate g_i.
    log_u [b]: the updated estimate. weights [b, B]: w_ij = exp(h_ij / tau_i) / u_i, 0 at
    the positive.
    """

    terms: torch.Tensor
    log_g: torch.Tensor
    log_u: torch.Tensor
    weights: torch.Tensor

    def tau_gradient(self, rho: float) -> torch.Tensor:
        """G_i = log u_i + rho - 1/(B-1) sum_j w_ij h_ij / tau_i (ALGORITHMS.md 3), [b].

        Computed in the equivalent form ``rho - log u * (g/u - 1) - 1/(B-1) sum_j w log w``
        (substituting h/tau = log w + log u): the direct form subtracts two numbers of
        size ~1/tau and loses float32 precision at small tau.
        """
        n_neg = self.weights.shape[1] - 1
        entropy_term = torch.special.xlogy(self.weights, self.weights).sum(1) / n_neg
        return rho - self.log_u * torch.expm1(self.log_g - self.log_u) - entropy_term


def _gcl_anchor_terms(
    sim: torch.Tensor,
    pos: torch.Tensor,
    tau: torch.Tensor,
    log_u: torch.Tensor,
    seen: torch.Tensor,
    gamma: float,
) -> _AnchorTerms:
    """The SogCLR core for one direction (ALGORITHMS.md 2), for b local anchors.

    sim [b, B] (anchor rows vs all candidates), pos [b] (column of the positive),
    tau [b] (temperature of each anchor), log_u [b] and seen [b] (state before the step).
    """
    n_neg = sim.shape[1] - 1
    positive = sim.gather(1, pos[:, None])  # [b, 1]
    with torch.no_grad():
        logits = (sim - positive).div_(tau[:, None])  # h_ij / tau_i
        logits.scatter_(1, pos[:, None], -math.inf)  # the positive is no negative
        log_g = torch.logsumexp(logits, dim=1) - math.log(n_neg)
        if gamma >= 1.0:
            log_u_new = log_g
        else:
            moving = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
            log_u_new = torch.where(seen, moving, log_g)
        weights = logits.sub_(log_u_new[:, None]).exp_()
    # w is a constant here: the gradient of sum_j w_ij h_ij is w_ij on s_ij and -sum_j w_ij on s_ii
    terms = (weights * (sim - positive)).sum(1) / n_neg
    return _AnchorTerms(terms, log_g, log_u_new, weights)


def gamma_at(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """SogCLR moving-average weight for a 0-based epoch (ALGORITHMS.md 2)."""
    if schedule == "constant":
        return gamma
    if schedule == "cosine":
        if epoch >= decay_epochs:
            return gamma
        return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
    raise ValueError(f"unknown --gamma_schedule {schedule!r}; use 'constant' or 'cosine'")


class SogCLRLoss(ContrastiveLoss):
    """Global contrastive loss with one fixed temperature (ALGORITHMS.md 2).

    Subclasses change only where the temperature of an anchor comes from
    (``_anchor_tau``) and how it learns (``_update_tau``).
    """

    def __init__(
        self,
        data_size: int,
        temp: float = 0.01,
        sogclr_gamma: float = 0.8,
        gamma_schedule: str = "constant",
        gamma_decay_epochs: int = 1,
    ) -> None:
        super().__init__(data_size)
        self.temp = float(temp)
        self.gamma, self.gamma_schedule, self.gamma_decay_epochs = (
            sogclr_gamma,
            gamma_schedule,
            gamma_decay_epochs,
        )
        gamma_at(0, sogclr_gamma, gamma_schedule, gamma_decay_epochs)  # validates the schedule name
        for side in ("I", "T"):
            self.register_buffer(f"log_u_{side}", torch.zeros(data_size))
            self.register_buffer(f"seen_{side}", torch.zeros(data_size, dtype=torch.bool))

    @property
    def gamma_t(self) -> float:
        return gamma_at(self.epoch, self.gamma, self.gamma_schedule, self.gamma_decay_epochs)

    def _anchor_tau(self, side: str, idx: torch.Tensor) -> torch.Tensor:
        """Temperature [b] of each local anchor of one side ("I" or "T")."""
        return torch.full(idx.shape, self.temp, device=idx.device)

    def _update_tau(
        self, side: str, idx: torch.Tensor, tau: torch.Tensor, anchors: _AnchorTerms, stats: dict
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """New temperature state for the anchors of one side; none for a fixed temperature."""
        return {}

    def forward(self, image_feat, text_feat, image_idx, text_idx):
        _check_inputs(image_feat, text_feat, image_idx, text_idx, self.data_size)
        batch = _gather_similarities(image_feat, text_feat)
        gamma = self.gamma_t
        loss = image_feat.new_zeros((), dtype=torch.float32)
        new_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        stats: dict[str, torch.Tensor] = {}
        for side, sim, idx in (("I", batch.sim_img, image_idx), ("T", batch.sim_txt, text_idx)):
            tau = self._anchor_tau(side, idx)
            anchors = _gcl_anchor_terms(
                sim,
                batch.pos,
                tau,
                getattr(self, f"log_u_{side}")[idx],
                getattr(self, f"seen_{side}")[idx],
                gamma,
            )
            loss = loss + anchors.terms.mean()
            new_state[f"log_u_{side}"] = (idx, anchors.log_u)
            new_state[f"seen_{side}"] = (idx, torch.ones_like(anchors.log_u))
            new_state.update(self._update_tau(side, idx, tau, anchors, stats))
            stats[f"tau_{side}"] = tau.mean()
            stats[f"gcl_{side}"] = (tau * anchors.log_u).mean()  # tau * log(global mean of exp(h/tau))
        stats["state_finite"] = self._write_state(new_state)
        return loss, {"gamma": gamma, **_floats(stats)}


def eta_at(epoch: int, eta_init: float, schedule: str, eta_min: float, eta_exp_base: float, epochs: int) -> float:
    """Temperature learning rate for a 0-based epoch (ALGORITHMS.md 3)."""
    if schedule == "const":
        return eta_init
    if schedule == "cosine":
        return eta_min + (eta_init - eta_min) * math.cos(math.pi * epoch / (2 * epochs))
    if schedule == "exp":
        return (eta_init - eta_min) * eta_exp_base**epoch + eta_min
    raise ValueError(f"unknown --eta_sched {schedule!r}; use 'const', 'cosine' or 'exp'")


class ISogCLRLoss(SogCLRLoss):
    """Robust GCL with a learned temperature per sample (ALGORITHMS.md 3)."""

    def __init__(
        self,
        data_size: int,
        sogclr_gamma: float = 0.8,
        gamma_schedule: str = "constant",
        gamma_decay_epochs: int = 1,
        tau_init: float = 0.01,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
        rho_I: float = 6.0,
        rho_T: float = 6.0,
        eta_init: float = 0.03,
        eta_sched: str = "const",
        eta_min: float = 1e-4,
        eta_exp_base: float = 0.8,
        beta_u: float = 0.9,
        epochs: int = 30,
    ) -> None:
        super().__init__(data_size, tau_init, sogclr_gamma, gamma_schedule, gamma_decay_epochs)
        self.tau_min, self.tau_max = tau_min, tau_max
        self.rho = {"I": rho_I, "T": rho_T}
        self.eta = dict(
            eta_init=eta_init, schedule=eta_sched, eta_min=eta_min, eta_exp_base=eta_exp_base, epochs=epochs
        )
        self.beta = beta_u
        eta_at(0, **self.eta)  # validates the schedule name
        for side in ("I", "T"):
            self.register_buffer(f"tau_{side}", torch.full((data_size,), float(tau_init)))
            self.register_buffer(f"m_{side}", torch.zeros(data_size))

    @property
    def eta_t(self) -> float:
        return eta_at(self.epoch, **self.eta)

    def _anchor_tau(self, side, idx):
        return getattr(self, f"tau_{side}")[idx]

    def temperatures(self) -> dict[str, torch.Tensor]:
        """Learned temperatures of the samples seen so far: {"image"/"text": (indices [n], tau [n])}."""
        out = {}
        for side, name in (("I", "image"), ("T", "text")):
            idx = getattr(self, f"seen_{side}").nonzero().flatten()
            out[name] = (idx.cpu(), getattr(self, f"tau_{side}")[idx].cpu())
        return out

    def _update_tau(self, side, idx, tau, anchors, stats):
        grad_tau = anchors.tau_gradient(self.rho[side])  # d/dtau of the KL-DRO objective at u
        stats[f"grad_tau_{side}"] = grad_tau.mean()
        m_new = (1 - self.beta) * getattr(self, f"m_{side}")[idx] + self.beta * grad_tau.clamp(-5.0, 5.0)
        tau_new = (tau - self.eta_t * m_new).clamp(self.tau_min, self.tau_max)
        return {f"m_{side}": (idx, m_new), f"tau_{side}": (idx, tau_new)}

    def forward(self, image_feat, text_feat, image_idx, text_idx):
        loss, stats = super().forward(image_feat, text_feat, image_idx, text_idx)
        return loss, {**stats, "eta": self.eta_t}


LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": CLIPLoss, "sogclr": SogCLRLoss, "isogclr": ISogCLRLoss}


def build_loss(name: str, data_size: int, **hp) -> ContrastiveLoss:
    """Build a loss by its ``--ita_type`` name; ``hp`` may hold every loss flag, each loss
    takes the ones it knows (see the constructors)."""
    key = LOSS_ALIASES.get(name, name)
    if key not in LOSSES:
        valid = sorted([*LOSSES, *LOSS_ALIASES])
        raise ValueError(f"unknown loss (--ita_type) {name!r}; valid names: {', '.join(valid)}")
    cls = LOSSES[key]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(data_size=data_size, **{k: v for k, v in hp.items() if k in accepted})
