"""Contrastive losses for image-text pairs (spec: ALGORITHMS.md).

Every loss takes this rank's local batch of L2-normalised features and their dataset
indices, and computes only its *local anchors* against the features gathered from
all ranks (``parallel.all_gather_with_grad``). Each rank returns the mean over its own
anchors; because the gather's backward sums gradients over ranks, DDP's averaging of
parameter gradients then yields exactly the single-process gradient of the global
batch.

Per-sample state (``u``, ``tau``, momentum) lives in buffers indexed by dataset index.
``compute`` returns the step's new values for every sample of the global batch as a
:class:`StateUpdate`, which writes nothing until ``commit``: the trainer commits it only when
the optimiser step is taken, so a skipped step (non-finite loss, fp16 overflow) leaves the
state as it was. Replicated (a loss module's layout until :meth:`ContrastiveLoss.shard_state`),
every rank holds the whole state, the same after every commit. Owner-sharded (clip.py's
``--state_sharding owner``, ALGORITHMS.md 11), each rank holds the indices it owns
(:class:`OwnerShards`) and fetches its anchors' values each step; a checkpoint then holds
each rank's shard in a file of its own (``checkpoint_parts``), which any layout on any number
of ranks loads (``load_checkpoint_parts``), and ``state_dict()`` assembles the whole state on
rank 0 (a collective call). An index that occurs several times in one
global batch: all occurrences compute from the state before the step, and the
value kept is that of the last occurrence in global batch order (rank 0 first).

The GCL losses keep ``log u`` instead of ``u`` so that ``exp(h / tau)`` never
overflows: with tau = 0.005 and h in [-2, 2], ``h / tau`` reaches +-400.

Each loss declares its hyperparameters once, as the dataclass ``HParams``: the command-line
flags, the YAML keys and the constructor's arguments all come from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import parallel

# Other names of a loss: the original code's and the FastCLIP paper's.
LOSS_ALIASES = {"sogclr_dro": "isogclr", "isogclr_new": "isogclr_tempnet", "fastclip_v1": "sogclr"}
# Defaults a loss name brings (the FastCLIP paper's CC3M set-up, ALGORITHMS.md 5 and 9) in place
# of the general ones, where the user sets no value. fastclip_v1 is sogclr with these.
# positions per chunk when a checkpoint's state shards are loaded (int64 temporaries of 8 MB)
LOAD_CHUNK = 1 << 20
_FASTCLIP_GAMMA = {"gamma_schedule": "cosine", "sogclr_gamma": 0.2, "gamma_decay_epochs": 18}
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "fastclip_v0": _FASTCLIP_GAMMA,
    "fastclip_v1": _FASTCLIP_GAMMA,
    "fastclip_v2": {**_FASTCLIP_GAMMA, "tau_min": 0.01},
    "fastclip_v3": _FASTCLIP_GAMMA,
}


def hparam(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A loss hyperparameter: its default, its ``--help`` text and (for strings) its choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


# ---- hyperparameters, declared once; the losses' HParams combine these groups ----------


@dataclass(frozen=True)
class FixedTemperature:
    temp: float = hparam(0.01, "temperature of clip and sogclr")


@dataclass(frozen=True)
class CLIPHParams(FixedTemperature):
    learnable_temp: bool = hparam(False, "clip: learn one global temperature, kept in [0.001, 0.5]")


@dataclass(frozen=True)
class GammaSchedule:
    sogclr_gamma: float = hparam(0.8, "moving-average weight gamma of u (the minimum under a schedule)")
    gamma_schedule: str = hparam(
        "constant", "gamma per epoch: constant, or cosine from 1 down to --sogclr_gamma", choices=("constant", "cosine")
    )
    gamma_decay_epochs: int = hparam(1, "epochs over which the cosine gamma schedule decays")


@dataclass(frozen=True)
class SogCLRHParams(GammaSchedule, FixedTemperature):
    pass


@dataclass(frozen=True)
class IndividualTemperature(GammaSchedule):
    tau_init: float = hparam(0.01, "initial per-sample temperature (isogclr and its variants)")
    tau_min: float = hparam(0.005, "smallest per-sample temperature")
    tau_max: float = hparam(1.0, "largest per-sample temperature")
    rho_init: float = hparam(6.0, "KL-DRO radius rho of both modalities")
    rho_I: float | None = hparam(None, "image-side rho (None: --rho_init)")
    rho_T: float | None = hparam(None, "text-side rho (None: --rho_init)")


@dataclass(frozen=True)
class ISogCLRHParams(IndividualTemperature):
    eta_init: float = hparam(0.03, "isogclr: temperature learning rate eta")
    eta_sched: str = hparam("const", "eta per epoch", choices=("const", "cosine", "exp"))
    eta_min: float = hparam(1e-4, "isogclr: final eta of the cosine and exp schedules")
    eta_exp_base: float = hparam(0.8, "isogclr: lambda of the exp eta schedule")
    beta_u: float = hparam(0.9, "isogclr: momentum of the temperature gradient")


@dataclass(frozen=True)
class TempNetHParams(IndividualTemperature):
    tempnet_hidden: int = hparam(256, "isogclr_tempnet: hidden width M of each temperature network")
    tempnet_dropout: float = hparam(0.0, "isogclr_tempnet: dropout after the hidden layer")
    lr_tempnet: float | None = hparam(None, "isogclr_tempnet: learning rate of the networks (None: --lr)")


@dataclass(frozen=True)
class AdamTau:
    lr_tau: float = hparam(2e-4, "fastclip_v2/v3: learning rate of the temperature(s)")


@dataclass(frozen=True)
class FastCLIPv0HParams(AdamTau, GammaSchedule, FixedTemperature):
    pass


@dataclass(frozen=True)
class FastCLIPv2HParams(AdamTau, IndividualTemperature):
    pass


@dataclass(frozen=True)
class FastCLIPv3HParams(AdamTau, GammaSchedule, FixedTemperature):
    rho: float = hparam(6.5, "fastclip_v3: rho of the global temperature's objective")


@dataclass(frozen=True)
class SigLIPHParams:
    siglip_scale_init: float = hparam(10.0, "siglip: initial scale t (learned as log t)")
    siglip_bias_init: float = hparam(-10.0, "siglip: initial bias b")


@dataclass(frozen=True)
class CyCLIPHParams(CLIPHParams):
    cyclip_lambda_in: float = hparam(0.25, "cyclip: weight of the in-modal consistency term")
    cyclip_lambda_cross: float = hparam(0.25, "cyclip: weight of the cross-modal consistency term")


@dataclass(frozen=True)
class VICRegHParams:
    vicreg_sim: float = hparam(25.0, "vicreg: weight of the invariance term")
    vicreg_std: float = hparam(25.0, "vicreg: weight of the variance term")
    vicreg_cov: float = hparam(1.0, "vicreg: weight of the covariance term")


# ---- what compute() returns -------------------------------------------------------------


@dataclass
class StateUpdate:
    """New per-sample values for every sample of one step's global batch, not yet written.

    ``writes``: (buffer, indices [n], values [n]) with duplicates of an index carrying the value
    of its last occurrence, so a plain ``buffer[idx] = values`` is deterministic. ``finite``:
    0-dim bool, every new value is finite.
    """

    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    finite: torch.Tensor

    def commit(self, ok: torch.Tensor | None = None) -> None:
        """Write the values when they are finite and ``ok`` (a 0-dim bool tensor, the trainer's
        decision to take the step) holds; decided on the device, so no host sync."""
        keep = self.finite if ok is None else self.finite & ok
        for buffer, idx, new in self.writes:
            buffer[idx] = torch.where(keep, new, buffer[idx].to(new.dtype)).to(buffer.dtype)


@dataclass
class LossOutput:
    """``loss``: 0-dim float32 to back-propagate; ``stats``: 0-dim tensors (or floats) to log;
    ``update``: the state update, written by ``update.commit``."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor | float]
    update: StateUpdate


# ---- shared pieces ----------------------------------------------------------------------


@dataclass
class _GlobalBatch:
    """Similarities of this rank's anchors against the gathered global batch.

    sim_img: [b, B] rows s_ij for local image anchors i and every text j.
    sim_txt: [b, B] rows s_ij (as a function of i) for local text anchors j.
    pos: [b] column of each local anchor's positive in those rows.
    all_image, all_text: [B, d] the gathered features (their gradients reach every rank).
    """

    sim_img: torch.Tensor
    sim_txt: torch.Tensor
    pos: torch.Tensor
    all_image: torch.Tensor
    all_text: torch.Tensor


@contextlib.contextmanager
def _ieee_float32():
    """float32 matrix products in full precision inside the block, also where TF32 is on for the
    encoders (CUDA): with tau = 0.005 an error of 1e-3 in a similarity (TF32's) moves a logit by 0.2."""
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


class _Similarity(torch.autograd.Function):
    """``a @ b.T`` (a [m, d], b [n, d]) with its backward, both in full float32."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with _ieee_float32():
            return a @ b.T

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        with _ieee_float32():
            grad_a = grad @ b if ctx.needs_input_grad[0] else None
            grad_b = grad.T @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _positive_columns(b: int, device: torch.device) -> torch.Tensor:
    """[b] column of each of this rank's b anchors' positive among the gathered global batch."""
    return torch.arange(b, device=device) + parallel.rank() * b


def _gather_similarities(image_feat: torch.Tensor, text_feat: torch.Tensor) -> _GlobalBatch:
    image_feat, text_feat = image_feat.float(), text_feat.float()
    all_image = parallel.all_gather_with_grad(image_feat)
    all_text = parallel.all_gather_with_grad(text_feat)
    pos = _positive_columns(image_feat.shape[0], image_feat.device)
    sim_img = _Similarity.apply(image_feat, all_text)
    # one process: the text anchors' rows are the columns of the same matrix (no second matmul)
    sim_txt = sim_img.T if parallel.world_size() == 1 else _Similarity.apply(text_feat, all_image)
    return _GlobalBatch(sim_img, sim_txt, pos, all_image, all_text)


def _check_shapes(image_feat: torch.Tensor, text_feat: torch.Tensor, image_idx, text_idx) -> None:
    """Shape checks: metadata only, no device sync."""
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
    for name, idx in (("image", image_idx), ("text", text_idx)):
        if idx.shape != (b,):
            raise ValueError(f"{name}_idx must have shape [{b}], got {tuple(idx.shape)}")


def check_indices(image_idx: torch.Tensor, text_idx: torch.Tensor, data_size: int) -> None:
    """Every index inside ``[0, data_size)``, else a ValueError naming --data_size.

    Reads the indices on the host: the training loop checks them in the data pipeline, on the
    CPU, before the batch reaches the device.
    """
    for name, idx in (("image", image_idx), ("text", text_idx)):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= data_size:
            bad = hi if hi >= data_size else lo
            raise ValueError(
                f"{name} index {bad} is outside [0, {data_size}): --data_size must exceed the "
                f"largest sample index; set --data_size to at least {max(hi + 1, data_size)}"
            )


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


def floats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Stats as Python floats, with a single device sync for all tensors."""
    tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist() if tensors else []
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
    out.update(zip(tensors, values, strict=True))
    return {k: out[k] for k in stats}


class OwnerShards:
    """Owner sharding of per-sample state arrays of length ``n`` over ``world`` ranks: index a
    lives on rank ``a % world`` at slot ``a // world``. A rank's shard has ``ceil(n / world)``
    slots plus one scratch slot, which takes the writes of the indices other ranks own, so
    that every write is fixed-size (no host sync to count them)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world
        self.slots = -(-n // world)  # the scratch slot is number self.slots

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard [slots + 1] of a whole array [n]."""
        out = full.new_zeros(self.slots + 1)
        mine = full[self.rank :: self.world]
        out[: len(mine)] = mine
        return out

    def whole(self, shard: torch.Tensor) -> torch.Tensor | None:
        """The whole array [n] on the host of rank 0, from every rank's shard (a collective
        call); None on the other ranks, which hold nothing but their shard meanwhile."""
        parts = parallel.gather_to_main(shard[: self.slots])
        if parts is None:
            return None
        whole = torch.empty(self.slots, self.world, dtype=shard.dtype)  # [slot, owner]: index order
        for owner, part in enumerate(parts):
            whole[:, owner] = part.cpu()
        return whole.reshape(-1)[: self.n]

    def slot(self, idx: torch.Tensor) -> torch.Tensor:
        """Slots [k] of indices [k] in this rank's shard: the scratch slot for those it does not own."""
        return torch.where(idx % self.world == self.rank, idx // self.world, self.slots)

    def fetch(self, buffers: list[torch.Tensor], idx: list[torch.Tensor]) -> list[torch.Tensor]:
        """``buffer[i]`` for this rank's indices ``i`` [b] of every buffer, whichever rank owns
        them: the indices of every rank gathered, each owner fills in its own values, and a sum
        over ranks scattered to the ranks that want them delivers them (two fixed-size
        collectives of O(W b) values, never O(n))."""
        wanted = parallel.all_gather_equal(torch.stack(idx, dim=1))  # [W b, k]
        owned = wanted % self.world == self.rank
        values = torch.stack(
            [torch.where(owned[:, k], buf[self.slot(wanted[:, k])].double(), 0.0) for k, buf in enumerate(buffers)],
            dim=1,
        )  # float64: a float32 value plus zeros sums exactly
        values = parallel.sum_scatter(values)
        return [values[:, k].to(buf.dtype) for k, buf in enumerate(buffers)]


class ContrastiveLoss(nn.Module):
    """Base class: the standalone call, epoch bookkeeping, per-sample state and its updates.

    Per-sample state arrays are registered with :meth:`_sample_state` (name ending in ``_I``
    or ``_T``: the image or text side's index); ``compute`` reads them at its anchors through
    :meth:`_fetch` and writes them through :meth:`_state_update`, so that both layouts
    (replicated, owner-sharded) run the same code.
    """

    HParams: ClassVar[type] = type(None)
    # False: compute() takes the projected features before L2 normalisation (vicreg)
    normalized_features: ClassVar[bool] = True

    def __init__(self, data_size: int | None = None) -> None:
        super().__init__()
        self.data_size = data_size
        self.epoch = 0
        self.sample_state: list[str] = []
        self.shards: OwnerShards | None = None

    def _sample_state(self, name: str, initial: torch.Tensor) -> None:
        """Register a per-sample state buffer [data_size]."""
        self.register_buffer(name, initial)
        self.sample_state.append(name)

    def shard_state(self, rank: int, world: int) -> None:
        """Keep only this rank's owner shard of every per-sample state array (ALGORITHMS.md 11);
        every rank of ``world`` must call it, before training."""
        if self.shards is not None or world == 1 or not self.sample_state:
            return
        self.shards = OwnerShards(self.data_size, rank, world)
        for name in self.sample_state:
            setattr(self, name, self.shards.shard(getattr(self, name)))

    def _fetch(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-sample state array at this rank's anchors: name -> [b]."""
        idx = [image_idx if name.endswith("_I") else text_idx for name in self.sample_state]
        if self.shards is None:
            return {name: getattr(self, name)[i] for name, i in zip(self.sample_state, idx, strict=True)}
        values = self.shards.fetch([getattr(self, name) for name in self.sample_state], idx)
        return dict(zip(self.sample_state, values, strict=True))

    def state_dict(self, *args, **kwargs):
        """As nn.Module's. Owner-sharded, a collective call: on rank 0 the per-sample arrays
        are whole, gathered one at a time onto its host (for a notebook or a test; checkpoints
        use :meth:`checkpoint_parts`, which gathers nothing); the other ranks' state leaves
        them out."""
        state = super().state_dict(*args, **kwargs)
        if self.shards is not None:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for name in self.sample_state:
                whole = self.shards.whole(getattr(self, name))
                if whole is None:
                    del state[prefix + name]
                else:
                    state[prefix + name] = whole
        return state

    def checkpoint_parts(self) -> tuple[dict, dict[str, torch.Tensor] | None]:
        """What a checkpoint holds of this loss: (state, shard). Replicated: ``state_dict()``
        and None. Owner-sharded (not a collective call): the state without the per-sample
        arrays, and this rank's shard of each, name -> [slots] on the host, for its own file,
        so that no rank ever holds more than its share (see :meth:`load_checkpoint_parts`)."""
        if self.shards is None:
            return self.state_dict(), None
        state = nn.Module.state_dict(self)  # the shards as they are: nothing gathered
        # a view of the live buffer (torch.save writes it at once); on a GPU, a copy on the host
        shard = {name: state.pop(name)[: self.shards.slots].cpu() for name in self.sample_state}
        return state, shard

    def load_checkpoint_parts(
        self, state: dict, read_shard: Callable[[int], dict[str, torch.Tensor]], saved_world: int
    ) -> None:
        """Load ``state`` and the per-sample arrays that ``saved_world`` owner-sharded ranks
        saved in files of their own (``read_shard(s)``: rank s's arrays, name -> [slots]),
        into this module's layout on any number of ranks: each saved shard is read once, in
        turn, and this rank keeps the entries it holds; so a rank holds at most its share
        plus one saved shard. Not a collective call."""
        missing, unexpected = nn.Module.load_state_dict(self, state, strict=False)
        if unexpected or set(missing) != set(self.sample_state):
            raise RuntimeError(
                f"the checkpoint's loss state does not fit {type(self).__name__}: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        first, stride = (0, 1) if self.shards is None else (self.shards.rank, self.shards.world)
        positions = len(range(first, self.data_size, stride))  # position p holds index first + p * stride
        for saved_rank in range(saved_world):
            part = read_shard(saved_rank)
            for start in range(0, positions, LOAD_CHUNK):  # chunks: index temporaries stay small
                held = first + stride * torch.arange(start, min(start + LOAD_CHUNK, positions))
                mine = held % saved_world == saved_rank
                take = start + mine.nonzero().squeeze(1)  # positions in this layout
                source = held[mine] // saved_world  # slots in the saved shard
                for name in self.sample_state:
                    buffer = getattr(self, name)
                    buffer[take.to(buffer.device)] = part[name][source].to(buffer.device, buffer.dtype)
            del part

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints hold whole arrays (any layout, any number of ranks): keep this rank's shard
        if self.shards is not None:
            for name in self.sample_state:
                key = prefix + name
                if key in state_dict and state_dict[key].shape[0] == self.data_size:
                    state_dict[key] = self.shards.shard(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch that drives the gamma / eta schedules."""
        self.epoch = epoch

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        """The loss on this rank's local batch (features [b, d], indices [b]); writes no state
        and reads nothing from the device."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The loss's trainable parameters as optimiser groups, never weight-decayed; a group
        without "lr" learns at the model's learning rate."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}] if params else []

    def forward(self, image_feat, text_feat, image_idx, text_idx) -> tuple[torch.Tensor, dict[str, float]]:
        """Standalone use: check the indices, compute, write the state (when finite); returns
        the loss and the stats as floats."""
        if self.data_size is not None:
            check_indices(image_idx, text_idx, self.data_size)
        out = self.compute(image_feat, text_feat, image_idx, text_idx)
        out.update.commit()
        return out.loss, floats(out.stats)

    def _state_update(self, columns: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> StateUpdate:
        """Gather the new values of the whole global batch (one collective, fixed size).

        ``columns`` maps a buffer name to (local indices [b], new local values [b]).
        """
        if not columns:
            return StateUpdate([], torch.ones((), dtype=torch.bool, device=device))
        names = list(columns)
        # [b, 2 * len(names)] of (index, value) pairs; float64 holds indices exactly up to 2**53
        packed = torch.stack([t.double() for name in names for t in columns[name]], dim=1)
        packed = parallel.all_gather_equal(packed)
        writes = []
        for k, name in enumerate(names):
            idx = packed[:, 2 * k].long()
            new = _last_occurrence_values(idx, packed[:, 2 * k + 1 : 2 * k + 2])[:, 0]
            slots = idx if self.shards is None else self.shards.slot(idx)  # owners write their own
            writes.append((getattr(self, name), slots, new))
        return StateUpdate(writes, torch.isfinite(packed).all())


class CLIPLoss(ContrastiveLoss):
    """Mini-batch InfoNCE (ALGORITHMS.md 1) with a fixed or learnable temperature."""

    HParams = CLIPHParams
    TEMP_RANGE = (0.001, 0.5)

    def __init__(self, data_size: int | None = None, hp: CLIPHParams = CLIPHParams(), epochs: int = 1):
        super().__init__(data_size)
        self.learnable_temp = hp.learnable_temp
        if hp.learnable_temp:
            self.temp = nn.Parameter(torch.tensor(float(hp.temp)))
        else:
            self.register_buffer("temp", torch.tensor(float(hp.temp)), persistent=False)

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        _check_shapes(image_feat, text_feat, image_idx, text_idx)
        if self.learnable_temp:
            # the projection of the previous optimiser step back into the range (idempotent)
            with torch.no_grad():
                self.temp.clamp_(*self.TEMP_RANGE)
        batch = _gather_similarities(image_feat, text_feat)
        loss = 0.5 * (
            F.cross_entropy(batch.sim_img / self.temp, batch.pos)
            + F.cross_entropy(batch.sim_txt / self.temp, batch.pos)
        )
        stats: dict[str, torch.Tensor | float] = {"temp": self.temp.detach()}
        extra = self._extra_terms(image_feat.float(), text_feat.float(), batch, stats)
        if extra is not None:
            loss = loss + extra
        return LossOutput(loss, stats, self._state_update({}, image_feat.device))

    def _extra_terms(self, image_feat, text_feat, batch: _GlobalBatch, stats: dict) -> torch.Tensor | None:
        """Terms a variant adds to CLIP's loss (CyCLIP); None for CLIP itself."""
        return None


class SigLIPLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (ALGORITHMS.md 12) with a learned scale ``t = exp(log_scale)`` and
    bias: ``-1/B sum_ij log sigmoid(z_ij (t s_ij + b))``, z = +1 on the diagonal, -1 elsewhere.

    Each rank takes the rows of its image anchors against every gathered text, so its share of
    the sum is ``b x B``; divided by its b rows, the mean over ranks is the global loss.
    """

    HParams = SigLIPHParams

    def __init__(self, data_size: int | None = None, hp: SigLIPHParams = SigLIPHParams(), epochs: int = 1):
        super().__init__(data_size)
        self.log_scale = nn.Parameter(torch.tensor(math.log(hp.siglip_scale_init)))
        self.bias = nn.Parameter(torch.tensor(float(hp.siglip_bias_init)))

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        _check_shapes(image_feat, text_feat, image_idx, text_idx)
        image_feat, text_feat = image_feat.float(), text_feat.float()
        all_text = parallel.all_gather_with_grad(text_feat)
        b = image_feat.shape[0]
        logits = _Similarity.apply(image_feat, all_text) * self.log_scale.exp() + self.bias
        # log sigmoid(z x) for z = -1 everywhere, then the diagonal's z = +1 added back:
        # log sigmoid(x) - log sigmoid(-x) = x
        pos = _positive_columns(b, image_feat.device)
        negatives = F.logsigmoid(-logits).sum()
        positives = logits.gather(1, pos.unsqueeze(1)).sum()
        loss = -(negatives + positives) / b
        stats = {"scale": self.log_scale.detach().exp(), "bias": self.bias.detach()}
        return LossOutput(loss, stats, self._state_update({}, image_feat.device))


class CyCLIPLoss(CLIPLoss):
    """CyCLIP (ALGORITHMS.md 6): CLIP's loss plus the in-modal and cross-modal consistency terms
    ``l_in * B * mean_ij (E E^T - F F^T)_ij^2 + l_cross * B * mean_ij (S - S^T)_ij^2`` on the
    global batch; each rank sums the squares of its anchors' rows (divided by its b rows, the
    mean over ranks is the global value)."""

    HParams = CyCLIPHParams

    def __init__(self, data_size: int | None = None, hp: CyCLIPHParams = CyCLIPHParams(), epochs: int = 1):
        super().__init__(data_size, hp)
        self.lambda_in, self.lambda_cross = hp.cyclip_lambda_in, hp.cyclip_lambda_cross

    def _extra_terms(self, image_feat, text_feat, batch: _GlobalBatch, stats: dict) -> torch.Tensor:
        b = image_feat.shape[0]
        in_modal = _Similarity.apply(image_feat, batch.all_image) - _Similarity.apply(text_feat, batch.all_text)
        # row i of S^T is text i against every image: the text anchors' rows
        cross_modal = batch.sim_img - batch.sim_txt
        stats["cyclip_in"] = in_modal.detach().square().sum() / b
        stats["cyclip_cross"] = cross_modal.detach().square().sum() / b
        return (self.lambda_in * in_modal.square().sum() + self.lambda_cross * cross_modal.square().sum()) / b


class VICRegLoss(ContrastiveLoss):
    """VICReg (ALGORITHMS.md 6) on the projected features before L2 normalisation, x (images)
    and y (texts): ``sim * I + std * V + cov * C`` with the invariance I (mean squared
    difference), the variance hinge V and the off-diagonal covariance C, all statistics of the
    global batch.

    Every rank gathers the whole batch (with gradient) and computes the same value: the terms
    are d x d, cheap; the gather's backward sums the W equal gradients, which DDP's averaging
    divides back.
    """

    HParams = VICRegHParams
    normalized_features = False

    def __init__(self, data_size: int | None = None, hp: VICRegHParams = VICRegHParams(), epochs: int = 1):
        super().__init__(data_size)
        self.weights = (hp.vicreg_sim, hp.vicreg_std, hp.vicreg_cov)

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        _check_shapes(image_feat, text_feat, image_idx, text_idx)
        x = parallel.all_gather_with_grad(image_feat.float())
        y = parallel.all_gather_with_grad(text_feat.float())
        invariance = (x - y).square().mean()
        variance = 0.5 * (self._hinge(x) + self._hinge(y))
        covariance = self._off_diagonal(x) + self._off_diagonal(y)
        w_sim, w_std, w_cov = self.weights
        loss = w_sim * invariance + w_std * variance + w_cov * covariance
        stats = {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}
        return LossOutput(loss, stats, self._state_update({}, image_feat.device))

    @staticmethod
    def _hinge(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1.0 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    @staticmethod
    def _off_diagonal(z: torch.Tensor) -> torch.Tensor:
        """sum_{k != l} cov(z)_kl^2 / d."""
        centred = z - z.mean(dim=0)
        cov = _Similarity.apply(centred.T.contiguous(), centred.T.contiguous()) / (z.shape[0] - 1)
        return (cov.square().sum() - cov.diagonal().square().sum()) / z.shape[1]


@dataclass
class _AnchorTerms:
    """What the GCL core computes for b anchors of one direction, all [b].

    terms: the surrogate ``1/(B-1) sum_{j != i} w_ij h_ij`` (its gradient is the GCL gradient,
    the weights being constants); log_g: log of the batch estimate g_i; log_u: the updated
    estimate; entropy: ``1/(B-1) sum_{j != i} w_ij log w_ij``, with w_ij = exp(h_ij / tau_i) / u_i.
    """

    terms: torch.Tensor
    log_g: torch.Tensor
    log_u: torch.Tensor
    entropy: torch.Tensor

    def tau_gradient(self, rho: float) -> torch.Tensor:
        """G_i = log u_i + rho - 1/(B-1) sum_j w_ij h_ij / tau_i (ALGORITHMS.md 3), [b].

        Computed in the equivalent form ``rho - log u * (g/u - 1) - 1/(B-1) sum_j w log w``
        (substituting h/tau = log w + log u): the direct form subtracts two numbers of
        size ~1/tau and loses float32 precision at small tau.
        """
        return rho - self.log_u * torch.expm1(self.log_g - self.log_u) - self.entropy


# Anchors processed at once: a block of about 1 MB (2**18 floats) stays in the CPU's L2 cache
# (or a GPU's) through the ten passes of the core, where passes over whole B x B matrices would
# stream through main memory; only the similarity matrix and its gradient are ever B x B.
_BLOCK_FLOATS = 1 << 18
# Smaller weights and gradient entries are set to 0: they change no sum in float32 (1e-30 of the
# largest term), and as subnormal numbers they would slow every multiplication they enter (on x86
# CPUs by 10-100x, which made the backward's matrix products four times slower).
_NEGLIGIBLE = 1e-30


@torch.no_grad()
def _gcl_anchor_terms(
    sim: torch.Tensor,
    dim: int,
    pos: torch.Tensor,
    tau: torch.Tensor,
    log_u: torch.Tensor,
    seen: torch.Tensor,
    gamma: float,
    grad: torch.Tensor,
    scale: float,
    accumulate: bool,
) -> _AnchorTerms:
    """The SogCLR core for one direction (ALGORITHMS.md 2), for b anchors of ``sim``.

    The anchors are the rows of ``sim`` (``dim=1``: [b, B], each anchor against its B candidates
    along dim 1) or its columns (``dim=0``: [B, b]). pos [b]: where each anchor's positive sits
    along ``dim``; tau, log_u, seen [b]: the anchor's temperature and state before the step.
    Writes ``scale * d(sum of terms)/d sim`` into ``grad`` (sim's shape; added to it when
    ``accumulate``): ``scale * w_ij`` for a negative and ``-scale * sum_j w_ij`` at the positive.

    Per block of anchors: with m the largest logit l_ij = h_ij / tau_i and e_ij = exp(l_ij - m),
    g = sum e * exp(m) / (B-1), w = e * exp(m - log u), so one exponential serves g, the weights,
    their sum, the entropy term and the surrogate's value.
    """
    n_anchors, n_neg = sim.shape[1 - dim], sim.shape[dim] - 1
    step = max(1, _BLOCK_FLOATS // sim.shape[dim])
    parts = []
    for a0 in range(0, n_anchors, step):
        a1 = min(a0 + step, n_anchors)
        anchors = slice(a0, a1)
        index = (slice(None), anchors) if dim == 0 else (anchors, slice(None))
        p = pos[anchors].unsqueeze(dim)  # [c, 1] or [1, c]
        logits = sim[index].clone()
        logits.sub_(logits.gather(dim, p)).div_(tau[anchors].unsqueeze(dim))  # h_ij / tau_i
        logits.scatter_(dim, p, -math.inf)  # the positive is no negative
        top = logits.amax(dim, keepdim=True)
        e = F.threshold_(torch.exp(logits - top), _NEGLIGIBLE, 0.0)
        log_g = torch.log(e.sum(dim)) + top.squeeze(dim) - math.log(n_neg)
        if gamma >= 1.0:
            log_u_new = log_g
        else:
            moving = torch.logaddexp(log_u[anchors] + math.log1p(-gamma), log_g + math.log(gamma))
            log_u_new = torch.where(seen[anchors], moving, log_g)
        to_w = torch.exp(top.squeeze(dim) - log_u_new)  # w = e * to_w
        logits.scatter_(dim, p, 0.0)  # e is 0 there: no -inf * 0 in the sums below
        sum_wl = (e * logits).sum(dim) * to_w  # sum_j w_ij l_ij
        sum_w = e.sum(dim) * to_w
        entropy = (sum_wl - log_u_new * sum_w) / n_neg  # sum_j w log w = sum_j w (l - log u)
        terms = tau[anchors] * sum_wl / n_neg  # sum_j w h / (B-1) with h = tau * l
        F.threshold_(e.mul_((to_w * scale).unsqueeze(dim)), _NEGLIGIBLE, 0.0)
        e.scatter_(dim, p, (-scale * sum_w).unsqueeze(dim).to(e.dtype))
        if accumulate:
            grad[index].add_(e)
        else:
            grad[index].copy_(e)
        parts.append((terms, log_g, log_u_new, entropy))
    return _AnchorTerms(*(torch.cat(column) for column in zip(*parts, strict=True)))


class _Surrogate(torch.autograd.Function):
    """The GCL surrogate's value, whose gradient with respect to the similarity matrices was
    computed alongside it (``_gcl_anchor_terms``): the backward only scales those by the
    incoming gradient, and the similarity products' own backward takes it to the features."""

    @staticmethod
    def forward(ctx, value, sim_img, grad_img, sim_txt=None, grad_txt=None):
        ctx.save_for_backward(grad_img, grad_txt)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        grad_img, grad_txt = ctx.saved_tensors
        return None, grad_img * grad_value, None, None if grad_txt is None else grad_txt * grad_value, None


def gamma_at(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """SogCLR moving-average weight for a 0-based epoch (ALGORITHMS.md 2)."""
    if schedule == "constant":
        return gamma
    if schedule == "cosine":
        if epoch >= decay_epochs:
            return gamma
        return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
    raise ValueError(f"unknown --gamma_schedule {schedule!r}; use 'constant' or 'cosine'")


class GCLLoss(ContrastiveLoss):
    """The global contrastive loss core (ALGORITHMS.md 2): the moving estimate ``u`` of every
    sample's negative term and the weighted surrogate.

    Variants change only where the temperature of an anchor comes from (``_anchor_tau``) and
    how it learns (``_update_tau``).
    """

    def __init__(self, data_size: int, gamma: GammaSchedule) -> None:
        super().__init__(data_size)
        self.gamma, self.gamma_schedule, self.gamma_decay_epochs = (
            gamma.sogclr_gamma,
            gamma.gamma_schedule,
            gamma.gamma_decay_epochs,
        )
        gamma_at(0, self.gamma, self.gamma_schedule, self.gamma_decay_epochs)  # validates the schedule name
        for side in ("I", "T"):
            self._sample_state(f"log_u_{side}", torch.zeros(data_size))
            self._sample_state(f"seen_{side}", torch.zeros(data_size, dtype=torch.bool))

    @property
    def gamma_t(self) -> float:
        return gamma_at(self.epoch, self.gamma, self.gamma_schedule, self.gamma_decay_epochs)

    def _anchor_tau(self, side: str, state: dict, feat: torch.Tensor) -> torch.Tensor:
        """Temperature [b] of each local anchor of one side ("I" or "T"; ``state``: the
        per-sample state at the anchors, features [b, d]); differentiable where the temperature
        is learned by back-propagation."""
        raise NotImplementedError

    def _update_tau(
        self, side: str, idx: torch.Tensor, tau: torch.Tensor, anchors: _AnchorTerms, state: dict, stats: dict
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """How the temperature learns from the anchors of one side (indices [b], ``state`` at
        them): its new per-sample state, and a term added to the loss whose gradient reaches
        learned temperature parameters (a 0-dim tensor, or None). A fixed temperature: neither."""
        return {}, None

    def _schedule_stats(self) -> dict[str, float]:
        return {"gamma": self.gamma_t}

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        _check_shapes(image_feat, text_feat, image_idx, text_idx)
        batch = _gather_similarities(image_feat, text_feat)
        gamma = self.gamma_t
        b = image_feat.shape[0]
        scale = 1.0 / ((batch.sim_img.shape[1] - 1) * b)  # d(mean_i of terms)/d(sum_j w_ij h_ij)
        # one process: the text anchors are the columns of the one similarity matrix, and one
        # gradient matrix holds both directions; several: each direction has its own rows
        one_matrix = parallel.world_size() == 1
        sim_txt = batch.sim_img if one_matrix else batch.sim_txt
        grad_img = torch.empty_like(batch.sim_img)
        grad_txt = grad_img if one_matrix else torch.empty_like(sim_txt)
        new_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        stats: dict[str, torch.Tensor | float] = dict(self._schedule_stats())
        value = image_feat.new_zeros((), dtype=torch.float32)
        directions = (
            ("I", batch.sim_img, 1, grad_img, image_idx, False),
            ("T", sim_txt, 0 if one_matrix else 1, grad_txt, text_idx, one_matrix),
        )
        tau_terms = []
        state = self._fetch(image_idx, text_idx)
        for side, sim, dim, grad, idx, accumulate in directions:
            tau = self._anchor_tau(side, state, image_feat if side == "I" else text_feat)
            log_u, seen = state[f"log_u_{side}"], state[f"seen_{side}"]
            anchors = _gcl_anchor_terms(
                sim.detach(), dim, batch.pos, tau.detach(), log_u, seen, gamma, grad, scale, accumulate
            )
            value = value + anchors.terms.mean()
            new_state[f"log_u_{side}"] = (idx, anchors.log_u)
            new_state[f"seen_{side}"] = (idx, torch.ones_like(anchors.log_u))
            tau_state, tau_term = self._update_tau(side, idx, tau, anchors, state, stats)
            new_state.update(tau_state)
            if tau_term is not None:
                tau_terms.append(tau_term)
            stats[f"tau_{side}"] = tau.detach().mean()
            stats[f"gcl_{side}"] = (tau.detach() * anchors.log_u).mean()  # tau * log(global mean of exp(h/tau))
        if one_matrix:
            loss = _Surrogate.apply(value, batch.sim_img, grad_img)
        else:
            loss = _Surrogate.apply(value, batch.sim_img, grad_img, batch.sim_txt, grad_txt)
        for term in tau_terms:
            loss = loss + term
        return LossOutput(loss, stats, self._state_update(new_state, image_feat.device))


class SogCLRLoss(GCLLoss):
    """SogCLR: the GCL core with one fixed temperature (ALGORITHMS.md 2)."""

    HParams = SogCLRHParams

    def __init__(self, data_size: int, hp: SogCLRHParams = SogCLRHParams(), epochs: int = 1) -> None:
        super().__init__(data_size, hp)
        self.temp = float(hp.temp)

    def _anchor_tau(self, side, state, feat):
        return torch.full(feat.shape[:1], self.temp, device=feat.device)


def eta_at(epoch: int, eta_init: float, schedule: str, eta_min: float, eta_exp_base: float, epochs: int) -> float:
    """Temperature learning rate for a 0-based epoch (ALGORITHMS.md 3)."""
    if schedule == "const":
        return eta_init
    if schedule == "cosine":
        return eta_min + (eta_init - eta_min) * math.cos(math.pi * epoch / (2 * epochs))
    if schedule == "exp":
        return (eta_init - eta_min) * eta_exp_base**epoch + eta_min
    raise ValueError(f"unknown --eta_sched {schedule!r}; use 'const', 'cosine' or 'exp'")


class _TemperatureTable(GCLLoss):
    """The GCL core with a temperature per sample (``tau_I``, ``tau_T`` buffers of length N, in
    [tau_min, tau_max]) and the KL-DRO radius rho per modality (ALGORITHMS.md 3)."""

    def __init__(self, data_size: int, hp: IndividualTemperature) -> None:
        super().__init__(data_size, hp)
        self.tau_min, self.tau_max = hp.tau_min, hp.tau_max
        self.rho = {
            "I": hp.rho_init if hp.rho_I is None else hp.rho_I,
            "T": hp.rho_init if hp.rho_T is None else hp.rho_T,
        }
        for side in ("I", "T"):
            self._sample_state(f"tau_{side}", torch.full((data_size,), float(hp.tau_init)))

    def _anchor_tau(self, side, state, feat):
        return state[f"tau_{side}"]

    def temperatures(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Learned temperatures of the samples seen so far that this rank holds, on the host:
        {"image"/"text": (dataset indices [n], tau [n])}; replicated every rank holds them all,
        owner-sharded its own indices only (nothing is gathered: engine/temperatures.py)."""
        out = {}
        for side, name in (("I", "image"), ("T", "text")):
            seen, tau = getattr(self, f"seen_{side}"), getattr(self, f"tau_{side}")
            if self.shards is None:
                slots = seen.nonzero().flatten()
                out[name] = (slots.cpu(), tau[slots].cpu())
            else:  # the scratch slot is not an index
                slots = seen[: self.shards.slots].nonzero().flatten()
                idx = slots * self.shards.world + self.shards.rank
                out[name] = (idx.cpu(), tau[slots].cpu())
        return out


class ISogCLRLoss(_TemperatureTable):
    """Robust GCL with a learned temperature per sample (ALGORITHMS.md 3): each tau moves by
    momentum SGD on its own gradient G.

    ``epochs``: the run's length, which the cosine eta schedule spans.
    """

    HParams = ISogCLRHParams

    def __init__(self, data_size: int, hp: ISogCLRHParams = ISogCLRHParams(), epochs: int = 1) -> None:
        super().__init__(data_size, hp)
        self.eta = dict(
            eta_init=hp.eta_init,
            schedule=hp.eta_sched,
            eta_min=hp.eta_min,
            eta_exp_base=hp.eta_exp_base,
            epochs=epochs,
        )
        self.beta = hp.beta_u
        eta_at(0, **self.eta)  # validates the schedule name
        for side in ("I", "T"):
            self._sample_state(f"m_{side}", torch.zeros(data_size))

    @property
    def eta_t(self) -> float:
        return eta_at(self.epoch, **self.eta)

    def _schedule_stats(self) -> dict[str, float]:
        return {"gamma": self.gamma_t, "eta": self.eta_t}

    def _update_tau(self, side, idx, tau, anchors, state, stats):
        grad_tau = anchors.tau_gradient(self.rho[side])  # d/dtau of the KL-DRO objective at u
        stats[f"grad_tau_{side}"] = grad_tau.mean()
        m_new = (1 - self.beta) * state[f"m_{side}"] + self.beta * grad_tau.clamp(-5.0, 5.0)
        tau_new = (tau - self.eta_t * m_new).clamp(self.tau_min, self.tau_max)
        return {f"m_{side}": (idx, m_new), f"tau_{side}": (idx, tau_new)}, None


class FastCLIPv2Loss(_TemperatureTable):
    """FastCLIP-v2 (ALGORITHMS.md 5): the iSogCLR objective, each tau moved by Adam on its own
    gradient G (clipped to [-5, 5]) with moments per sample (``m``, ``v``) and the bias correction
    of the sample's own update count ``n``; the cosine gamma schedule comes with the name."""

    HParams = FastCLIPv2HParams
    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, data_size: int, hp: FastCLIPv2HParams = FastCLIPv2HParams(), epochs: int = 1) -> None:
        super().__init__(data_size, hp)
        self.lr_tau = hp.lr_tau
        for side in ("I", "T"):
            self._sample_state(f"m_{side}", torch.zeros(data_size))
            self._sample_state(f"v_{side}", torch.zeros(data_size))
            self._sample_state(f"n_{side}", torch.zeros(data_size))

    def _update_tau(self, side, idx, tau, anchors, state, stats):
        grad_tau = anchors.tau_gradient(self.rho[side]).clamp(-5.0, 5.0)
        stats[f"grad_tau_{side}"] = grad_tau.mean()
        (b1, b2), n = self.BETAS, state[f"n_{side}"] + 1
        m = b1 * state[f"m_{side}"] + (1 - b1) * grad_tau
        v = b2 * state[f"v_{side}"] + (1 - b2) * grad_tau.square()
        step = (m / (1 - b1**n)) / ((v / (1 - b2**n)).sqrt() + self.EPS)
        tau_new = (tau - self.lr_tau * step).clamp(self.tau_min, self.tau_max)
        return {
            f"m_{side}": (idx, m),
            f"v_{side}": (idx, v),
            f"n_{side}": (idx, n),
            f"tau_{side}": (idx, tau_new),
        }, None


class TempNetLoss(_TemperatureTable):
    """iSogCLR with temperatures from a small network per modality (ALGORITHMS.md 4):
    ``tau = tau_min + (tau_max - tau_min) * sigmoid(MLP(stopgrad(feature)))``, the MLP
    ``d -> M -> 1`` (ReLU, dropout) learning from ``mean_i stopgrad(G_i) * tau_i`` added to the
    loss. ``tau_I`` / ``tau_T`` record each sample's last predicted temperature (for analysis;
    the networks predict one for any image or caption).
    """

    HParams = TempNetHParams

    def __init__(self, data_size: int, hp: TempNetHParams = TempNetHParams(), epochs: int = 1, dim: int = 256) -> None:
        super().__init__(data_size, hp)
        self.lr_tempnet = hp.lr_tempnet
        self.nets = nn.ModuleDict({side: self._network(dim, hp) for side in ("I", "T")})

    @staticmethod
    def _network(dim: int, hp: TempNetHParams) -> nn.Sequential:
        net = nn.Sequential(
            nn.Linear(dim, hp.tempnet_hidden),
            nn.ReLU(),
            nn.Dropout(hp.tempnet_dropout),
            nn.Linear(hp.tempnet_hidden, 1),
        )
        with torch.no_grad():  # start near tau_init: sigmoid(bias) = (tau_init - tau_min) / (tau_max - tau_min)
            share = (hp.tau_init - hp.tau_min) / (hp.tau_max - hp.tau_min)
            net[-1].bias.fill_(math.log(share / (1 - share)) if 0 < share < 1 else 0.0)
        return net

    def _anchor_tau(self, side, state, feat):
        net = self.nets[side]
        if feat.shape[1] != net[0].in_features:
            raise ValueError(
                f"isogclr_tempnet was built for {net[0].in_features}-dim features, got {feat.shape[1]}; "
                "build it with dim=--embed_dim"
            )
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(net(feat.detach()).squeeze(1))

    def _update_tau(self, side, idx, tau, anchors, state, stats):
        grad_tau = anchors.tau_gradient(self.rho[side])
        stats[f"grad_tau_{side}"] = grad_tau.mean()
        return {f"tau_{side}": (idx, tau.detach())}, (grad_tau * tau).mean()

    def param_groups(self) -> list[dict]:
        group = {"params": list(self.nets.parameters()), "weight_decay": 0.0}
        return [group if self.lr_tempnet is None else {**group, "lr": self.lr_tempnet}]


class _GlobalTemperatureGCL(GCLLoss):
    """The GCL core with one learned temperature for all samples (``tau``, a parameter with its
    own learning rate ``--lr_tau``, kept in ``TAU_RANGE``), whose gradient is ``SIDE_WEIGHT``
    times the sum over both modalities of the batch mean of G_i (ALGORITHMS.md 3) at rho
    ``self.rho_tau``."""

    TAU_RANGE = (0.01, 1.0)
    SIDE_WEIGHT = 1.0

    def __init__(self, data_size: int, hp, rho: float) -> None:
        super().__init__(data_size, hp)
        self.tau = nn.Parameter(torch.tensor(float(hp.temp)))
        self.lr_tau, self.rho_tau = hp.lr_tau, rho

    def compute(self, image_feat, text_feat, image_idx, text_idx) -> LossOutput:
        with torch.no_grad():  # the projection of the previous optimiser step back into the range
            self.tau.clamp_(*self.TAU_RANGE)
        return super().compute(image_feat, text_feat, image_idx, text_idx)

    def _anchor_tau(self, side, state, feat):
        return self.tau.expand(feat.shape[:1])

    def _update_tau(self, side, idx, tau, anchors, state, stats):
        grad_tau = anchors.tau_gradient(self.rho_tau)
        stats[f"grad_tau_{side}"] = grad_tau.mean()
        return {}, self.SIDE_WEIGHT * grad_tau.mean() * tau[0]

    def param_groups(self) -> list[dict]:
        return [{"params": [self.tau], "lr": self.lr_tau, "weight_decay": 0.0}]


class FastCLIPv0Loss(_GlobalTemperatureGCL):
    """FastCLIP-v0 (ALGORITHMS.md 5): SogCLR with its global temperature learned, as CLIP learns
    its own, by the gradient of the GCL objective ``sum_sides mean_i tau log u_i`` (G at rho 0)."""

    HParams = FastCLIPv0HParams

    def __init__(self, data_size: int, hp: FastCLIPv0HParams = FastCLIPv0HParams(), epochs: int = 1) -> None:
        super().__init__(data_size, hp, rho=0.0)


class FastCLIPv3Loss(_GlobalTemperatureGCL):
    """FastCLIP-v3, RGCL-g (ALGORITHMS.md 5): the global temperature learns from
    ``1/(2B) sum_i (GI_i + GT_i)`` at ``--rho``, the robust objective's gradient."""

    HParams = FastCLIPv3HParams
    SIDE_WEIGHT = 0.5

    def __init__(self, data_size: int, hp: FastCLIPv3HParams = FastCLIPv3HParams(), epochs: int = 1) -> None:
        super().__init__(data_size, hp, rho=hp.rho)


LOSSES: dict[str, type[ContrastiveLoss]] = {
    "clip": CLIPLoss,
    "sogclr": SogCLRLoss,
    "isogclr": ISogCLRLoss,
    "isogclr_tempnet": TempNetLoss,
    "fastclip_v0": FastCLIPv0Loss,
    "fastclip_v2": FastCLIPv2Loss,
    "fastclip_v3": FastCLIPv3Loss,
    "siglip": SigLIPLoss,
    "cyclip": CyCLIPLoss,
    "vicreg": VICRegLoss,
}


def loss_hparam_fields() -> dict[str, dataclasses.Field]:
    """Every loss hyperparameter by name (each declared once, shared by the losses that use it)."""
    fields: dict[str, dataclasses.Field] = {}
    for cls in LOSSES.values():
        for f in dataclasses.fields(cls.HParams):
            fields.setdefault(f.name, f)
    return fields


def resolve_loss_name(name: str) -> str:
    """The canonical ``--ita_type`` name (aliases resolved); ValueError listing the valid ones."""
    key = LOSS_ALIASES.get(name, name)
    if key not in LOSSES:
        valid = sorted([*LOSSES, *LOSS_ALIASES])
        raise ValueError(f"unknown loss (--ita_type) {name!r}; valid names: {', '.join(valid)}")
    return key


def build_loss(name: str, data_size: int, epochs: int = 1, embed_dim: int = 256, **hp: Any) -> ContrastiveLoss:
    """Build a loss by its ``--ita_type`` name; hyperparameters not in ``hp`` take the name's
    presets (``LOSS_PRESETS``), then their defaults.

    ``hp`` may hold any loss's hyperparameters (the flags of every loss): each loss takes its
    own (``LOSSES[name].HParams``) and ignores those of the others; a name that is no loss's
    hyperparameter is refused. ``epochs``: the run's length, for schedules that span it;
    ``embed_dim``: the features' dimension d, for losses with networks on them (tempnet).
    """
    cls = LOSSES[resolve_loss_name(name)]
    unknown = sorted(set(hp) - set(loss_hparam_fields()))
    if unknown:
        raise ValueError(f"unknown loss hyperparameter(s) {', '.join(unknown)}; known: {sorted(loss_hparam_fields())}")
    hp = {**LOSS_PRESETS.get(name, {}), **hp}
    own = {f.name for f in dataclasses.fields(cls.HParams)}
    extra = {"dim": embed_dim} if cls is TempNetLoss else {}
    return cls(data_size, cls.HParams(**{k: v for k, v in hp.items() if k in own}), epochs=epochs, **extra)
