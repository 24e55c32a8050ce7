"""Single-process tests of models.losses against the naive float64 references in loss_reference.py."""

from __future__ import annotations

import contextlib
import copy
import io
from functools import partial

import numpy as np
import pytest
import torch

from loss_reference import GCLReference, assert_matches, clip_loss, eta_at, gamma_at
from models.losses import build_loss

N = 16
TAUS = [1.0, 0.05, 0.01, 0.005]

# Every hyperparameter the CLI passes; each loss must ignore the ones that do not concern it.
HP = {
    "temp": 0.01,
    "learnable_temp": False,
    "sogclr_gamma": 0.8,
    "gamma_schedule": "constant",
    "gamma_decay_epochs": 3,
    "tau_init": 0.01,
    "tau_min": 0.005,
    "tau_max": 1.0,
    "rho_I": 6.0,
    "rho_T": 6.0,
    "eta_init": 0.03,
    "eta_sched": "const",
    "eta_min": 1e-4,
    "eta_exp_base": 0.8,
    "beta_u": 0.9,
    "epochs": 10,
}

# Five steps over N = 16 samples: first-seen indices, indices repeated across steps, and
# indices repeated inside one batch (first-seen and already seen), different for each modality.
IMAGE_IDX = [
    [0, 1, 2, 3, 3, 4, 5, 6],
    [2, 7, 0, 8, 8, 1, 9, 2],
    [10, 3, 3, 11, 5, 12, 7, 13],
    [0, 0, 0, 14, 15, 6, 9, 1],
    [4, 13, 2, 8, 15, 10, 11, 3],
]
TEXT_IDX = [
    [0, 1, 2, 3, 4, 5, 6, 7],
    [8, 9, 10, 11, 12, 13, 14, 15],
    [0, 0, 1, 2, 3, 9, 9, 9],
    [15, 4, 7, 7, 2, 1, 0, 10],
    [5, 6, 11, 12, 3, 3, 8, 14],
]
EPOCHS = [0, 1, 1, 2, 4]


def rtol_for(tau: float) -> float:
    """Float32 rounding of a similarity (~2e-7 here) is amplified by 1/tau in exp(h / tau)."""
    return max(1e-5, 2e-7 / tau)


def unit_rows(seed: int, batch: int, dim: int) -> torch.Tensor:
    """[batch, dim] float32 rows of unit L2 norm."""
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


def run_module(loss_fn, image, text, image_idx, text_idx):
    """One forward/backward of the module -> (loss, d loss/d image, d loss/d text, stats)."""
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    loss, stats = loss_fn(image, text, torch.tensor(image_idx), torch.tensor(text_idx))
    loss.backward()
    return loss.detach(), image.grad, text.grad, stats


def run_reference(loss_of, image, text):
    """``loss_of(image64, text64)`` with its gradients; the inputs are the module's exact values."""
    image64 = image.detach().double().requires_grad_(True)
    text64 = text.detach().double().requires_grad_(True)
    loss = loss_of(image64, text64)
    loss.backward()
    return loss.detach(), image64.grad, text64.grad


def check_step(got, want, rtol: float, what: str) -> None:
    loss, grad_image, grad_text = got[:3]
    ref_loss, ref_grad_image, ref_grad_text = want
    # The surrogate can be near zero by cancellation of O(1) terms, hence the floor of 1.
    assert_matches(loss, ref_loss, rtol, f"{what} loss", scale_floor=1.0)
    assert_matches(grad_image, ref_grad_image, rtol, f"{what} d/d image")
    assert_matches(grad_text, ref_grad_text, rtol, f"{what} d/d text")


def buffers(loss_fn) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loss_fn.state_dict().items()}


def check_state(loss_fn, ref: GCLReference, individual_tau: bool, rtol: float, what: str, tau_floor: float) -> None:
    """Module buffers vs reference state: seen exactly, log u where seen, tau and m everywhere."""
    state = loss_fn.state_dict()
    for side, suffix in (("image", "I"), ("text", "T")):
        want = ref.state[side]
        seen = state[f"seen_{suffix}"]
        assert seen.dtype == torch.bool, f"seen_{suffix} should be bool, is {seen.dtype}"
        assert np.array_equal(seen.numpy(), want.seen), f"{what}: seen_{suffix} {seen} != {want.seen}"
        mask = torch.from_numpy(want.seen)
        log_u = state[f"log_u_{suffix}"][mask]
        # log u carries the 1/tau-amplified error of h / tau as an absolute error, hence the floor.
        want_log_u = torch.log(torch.from_numpy(want.u[want.seen]))
        assert_matches(log_u, want_log_u, rtol, f"{what} log_u_{suffix}", scale_floor=1.0)
        if individual_tau:
            assert_matches(state[f"tau_{suffix}"], torch.from_numpy(want.tau), rtol, f"{what} tau_{suffix}")
            # m averages G, which after the first visit is ill-conditioned in float32: G is an
            # O(1) difference of O(1/tau) terms, so a logit error of ~2e-7/tau becomes ~1e-7/tau^2
            # in G (about 4e-3 at tau 0.005; a wrong formula is off by O(1)).
            want_m = torch.from_numpy(want.m)
            m_rtol = max(rtol, 1e-7 / tau_floor**2)
            assert_matches(state[f"m_{suffix}"], want_m, m_rtol, f"{what} m_{suffix}", scale_floor=1.0)


@pytest.mark.parametrize("tau", TAUS)
def test_clip_fixed_temperature(tau):
    image, text = unit_rows(0, 10, 12), unit_rows(1, 10, 12)
    loss_fn = build_loss("clip", data_size=N, **{**HP, "temp": tau})
    got = run_module(loss_fn, image, text, list(range(10)), list(range(10)))
    want = run_reference(lambda e, f: clip_loss(e, f, tau), image, text)
    check_step(got, want, rtol_for(tau), f"clip tau={tau}")
    assert list(loss_fn.parameters()) == [], "fixed temperature must not be a parameter"


@pytest.mark.parametrize("tau", [0.5, 0.05, 0.01, 0.005])
def test_clip_learnable_temperature(tau):
    image, text = unit_rows(2, 9, 7), unit_rows(3, 9, 7)
    loss_fn = build_loss("clip", data_size=N, **{**HP, "temp": tau, "learnable_temp": True})
    assert isinstance(loss_fn.temp, torch.nn.Parameter)
    assert loss_fn.temp.item() == pytest.approx(tau, rel=1e-6)
    got = run_module(loss_fn, image, text, list(range(9)), list(range(9)))
    ref_tau = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    want = run_reference(lambda e, f: clip_loss(e, f, ref_tau), image, text)
    check_step(got, want, rtol_for(tau), f"learnable clip tau={tau}")
    assert_matches(loss_fn.temp.grad.reshape(()), ref_tau.grad, rtol_for(tau), "d loss / d temp")
    assert "temp" in loss_fn.state_dict()


def test_clip_learnable_temperature_is_kept_in_range():
    # Features close together keep |h| <= ~0.1, so the reference stays finite at tau = 0.001.
    base = unit_rows(4, 1, 6)
    image = torch.nn.functional.normalize(base + 0.03 * unit_rows(5, 8, 6), dim=1)
    text = torch.nn.functional.normalize(base + 0.03 * unit_rows(6, 8, 6), dim=1)
    loss_fn = build_loss("clip", data_size=N, **{**HP, "learnable_temp": True})
    for pushed_to, used in ((0.9, 0.5), (1e-5, 0.001)):
        with torch.no_grad():
            loss_fn.temp.fill_(pushed_to)  # as if an optimiser step had left the range
        loss, _ = loss_fn(image, text, torch.arange(8), torch.arange(8))
        want = clip_loss(image.double(), text.double(), used)
        # 2e-4: float32 similarity rounding amplified by 1 / 0.001.
        assert_matches(loss.detach(), want, 2e-4, f"clip loss, temp pushed to {pushed_to}", scale_floor=1.0)


@pytest.mark.parametrize("tau", TAUS)
def test_sogclr_first_step(tau):
    image, text = unit_rows(7, 10, 16), unit_rows(8, 10, 16)
    idx = list(range(3, 13))
    loss_fn = build_loss("sogclr", data_size=N, **{**HP, "temp": tau})
    ref = GCLReference(N, tau, individual_tau=False)
    got = run_module(loss_fn, image, text, idx, idx)
    want = run_reference(partial(ref.step, image_idx=idx, text_idx=idx, gamma=0.8), image, text)
    check_step(got, want, rtol_for(tau), f"sogclr tau={tau}")
    check_state(loss_fn, ref, False, rtol_for(tau), f"sogclr tau={tau}", tau)


@pytest.mark.parametrize("tau", TAUS)
def test_isogclr_first_step(tau):
    image, text = unit_rows(9, 10, 5), unit_rows(10, 10, 5)
    idx = list(range(10))
    loss_fn = build_loss("isogclr", data_size=N, **{**HP, "tau_init": tau})
    ref = GCLReference(N, tau, individual_tau=True)
    got = run_module(loss_fn, image, text, idx, idx[::-1])
    reference_step = partial(ref.step, image_idx=idx, text_idx=idx[::-1], gamma=0.8, eta=0.03)
    want = run_reference(reference_step, image, text)
    check_step(got, want, rtol_for(tau), f"isogclr tau_init={tau}")
    check_state(loss_fn, ref, True, rtol_for(tau), f"isogclr tau_init={tau}", tau)


GCL_CASES = {
    "sogclr-constant": ("sogclr", {"temp": 0.05}),
    "sogclr-cosine": ("sogclr", {"temp": 0.01, "gamma_schedule": "cosine", "sogclr_gamma": 0.2}),
    "isogclr-const": ("isogclr", {"tau_init": 0.03}),
    "isogclr-cosine": ("isogclr", {"eta_sched": "cosine", "eta_init": 0.5, "epochs": 4}),
    "isogclr-exp": ("isogclr", {"eta_sched": "exp", "eta_init": 0.5, "gamma_schedule": "cosine"}),
    # Large steps drive tau_I to tau_max (rho_I = 0 makes G <= 0) and tau_T to tau_min
    # (rho_T = 8 makes G > 5, so the clip of G at 5 is exercised too).
    "isogclr-clipped": ("isogclr", {"eta_init": 2.0, "rho_I": 0.0, "rho_T": 8.0, "tau_init": 0.05}),
}


@pytest.mark.parametrize("case", list(GCL_CASES))
def test_gcl_state_over_steps(case):
    name, overrides = GCL_CASES[case]
    hp = {**HP, **overrides}
    individual_tau = name == "isogclr"
    loss_fn = build_loss(name, data_size=N, **hp)
    ref = GCLReference(
        N,
        hp["tau_init"] if individual_tau else hp["temp"],
        individual_tau,
        rho_I=hp["rho_I"],
        rho_T=hp["rho_T"],
        beta=hp["beta_u"],
        tau_min=hp["tau_min"],
        tau_max=hp["tau_max"],
    )
    # Per-sample taus spread over [tau_min, tau_max]; the smallest one sets the tolerance.
    rtol = rtol_for(hp["tau_min"] if individual_tau else hp["temp"])
    for step, (image_idx, text_idx, epoch) in enumerate(zip(IMAGE_IDX, TEXT_IDX, EPOCHS, strict=True)):
        loss_fn.set_epoch(epoch)
        gamma = gamma_at(epoch, hp["sogclr_gamma"], hp["gamma_schedule"], hp["gamma_decay_epochs"])
        eta = eta_at(epoch, hp["eta_init"], hp["eta_sched"], hp["eta_min"], hp["eta_exp_base"], hp["epochs"])
        image, text = unit_rows(100 + step, 8, 6), unit_rows(200 + step, 8, 6)
        got = run_module(loss_fn, image, text, image_idx, text_idx)
        reference_step = partial(ref.step, image_idx=image_idx, text_idx=text_idx, gamma=gamma, eta=eta)
        want = run_reference(reference_step, image, text)
        check_step(got, want, rtol, f"{case} step {step}")
        tau_floor = hp["tau_min"] if individual_tau else hp["temp"]
        check_state(loss_fn, ref, individual_tau, rtol, f"{case} step {step}", tau_floor)
    if case == "isogclr-clipped":
        assert ref.state["image"].tau.max() == hp["tau_max"], "case should reach tau_max"
        assert ref.state["text"].tau.min() == hp["tau_min"], "case should reach tau_min"


@pytest.mark.parametrize("name", ["clip", "sogclr", "isogclr"])
def test_stats_are_a_dict_of_floats(name):
    loss_fn = build_loss(name, data_size=N, **HP)
    stats = run_module(loss_fn, unit_rows(25, 8, 6), unit_rows(26, 8, 6), IMAGE_IDX[0], TEXT_IDX[0])[3]
    assert isinstance(stats, dict) and stats, f"stats should be a non-empty dict, got {stats!r}"
    not_floats = {k: type(v).__name__ for k, v in stats.items() if not isinstance(v, float)}
    assert not not_floats, f"INTERFACE.md: stats is a dict of floats; these are not: {not_floats}"


def test_isogclr_alias():
    image, text = unit_rows(11, 8, 6), unit_rows(12, 8, 6)
    results = []
    for name in ("isogclr", "sogclr_dro"):
        loss_fn = build_loss(name, data_size=N, **{**HP, "eta_init": 0.5})
        steps = [run_module(loss_fn, image, text, IMAGE_IDX[s], TEXT_IDX[s])[:3] for s in range(2)]
        results.append((steps, buffers(loss_fn)))
    (steps_a, state_a), (steps_b, state_b) = results
    for a, b in zip(steps_a, steps_b, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def extreme_features(pattern: str, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose similarities are all +-1, so every h is -2, 0 or +2."""
    v = unit_rows(13, 1, dim).expand(batch, dim)
    if pattern == "identical":
        return v.clone(), v.clone()
    if pattern == "one-opposite":  # anchor 0 sees h = +2 against every negative
        signs = torch.ones(batch, 1)
        signs[0] = -1.0
        return v.clone(), v * signs
    gen = torch.Generator().manual_seed(14)
    image_signs = torch.randint(0, 2, (batch, 1), generator=gen) * 2.0 - 1.0
    text_signs = torch.randint(0, 2, (batch, 1), generator=gen) * 2.0 - 1.0
    return v * image_signs, v * text_signs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["identical", "one-opposite", "random-signs"])
@pytest.mark.parametrize("name", ["clip", "sogclr", "isogclr"])
def test_extreme_similarities_stay_finite(name, pattern, dtype):
    for tau in (1.0, 0.01, 0.005):
        hp = {**HP, "temp": tau, "tau_init": tau, "eta_init": 0.5}
        loss_fn = build_loss(name, data_size=N, **hp)
        ref = GCLReference(N, tau, individual_tau=name == "isogclr")
        for step in range(2):  # first visits, then moving averages
            image, text = extreme_features(pattern, 8, 6)
            image, text = image.to(dtype), text.to(dtype)
            image_idx, text_idx = IMAGE_IDX[step], TEXT_IDX[step]
            loss, grad_image, grad_text, _ = run_module(loss_fn, image, text, image_idx, text_idx)
            what = f"{name} {pattern} {dtype} tau={tau} step {step}"
            assert loss.dtype == torch.float32, f"{what}: loss should be computed in float32"
            assert torch.isfinite(loss), f"{what}: loss {loss}"
            assert torch.isfinite(grad_image).all() and torch.isfinite(grad_text).all(), f"{what}: gradient"
            # The reference sees the same (rounded, not exactly unit) features in float64.
            if name == "clip":
                loss_of = partial(clip_loss, tau=tau)
            else:
                loss_of = partial(ref.step, image_idx=image_idx, text_idx=text_idx, gamma=0.8, eta=0.5)
            want_loss, want_image, want_text = run_reference(loss_of, image, text)
            assert_matches(loss, want_loss, 1e-4, f"{what} loss value", scale_floor=1.0)
            # Gradients come back in the input dtype; those with identical features are 0 up to rounding.
            grad_rtol = 1e-4 if dtype == torch.float32 else 1e-2
            assert_matches(grad_image, want_image, grad_rtol, f"{what} d/d image", scale_floor=1.0)
            assert_matches(grad_text, want_text, grad_rtol, f"{what} d/d text", scale_floor=1.0)
            if name != "clip":
                # log u where seen, tau and m everywhere: finite and equal to the reference.
                check_state(loss_fn, ref, name == "isogclr", 1e-4, what, tau)


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
@pytest.mark.parametrize("bad", [N, -1, 10**9])
def test_index_out_of_range_names_data_size(name, bad):
    loss_fn = build_loss(name, data_size=N, **HP)
    run_module(loss_fn, unit_rows(15, 4, 5), unit_rows(16, 4, 5), [0, 1, 2, 3], [0, 1, 2, 3])
    before = buffers(loss_fn)
    for image_idx, text_idx in (([0, 1, bad, 3], [0, 1, 2, 3]), ([0, 1, 2, 3], [bad, 1, 2, 3])):
        with pytest.raises(ValueError, match="--data_size"):
            loss_fn(unit_rows(17, 4, 5), unit_rows(18, 4, 5), torch.tensor(image_idx), torch.tensor(text_idx))
    after = buffers(loss_fn)
    assert all(torch.equal(before[k], after[k]) for k in before), "a rejected batch must not touch the state"


@pytest.mark.parametrize("name", ["clip", "sogclr", "isogclr"])
def test_batch_of_one_is_rejected(name):
    loss_fn = build_loss(name, data_size=N, **HP)
    with pytest.raises(ValueError, match="at least 2 samples in the global batch"):
        loss_fn(unit_rows(19, 1, 5), unit_rows(20, 1, 5), torch.tensor([0]), torch.tensor([0]))


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(ValueError, match=r"unknown loss hyperparameter\(s\) tempreature; known: .*'temp'"):
        build_loss("clip", data_size=N, tempreature=0.1)


# The schedules at hand-computed points of spec/ALGORITHMS.md (not via the reference's copy):
# cosine gamma, g_min 0.2 over 4 epochs: 0.2 + 0.8 (1 + cos(pi e / 4)) / 2; cosine eta, eta_0 0.03,
# eta_min 1e-4 over 10 epochs: 1e-4 + 0.0299 cos(pi e / 20); exp eta, lambda 0.8: 0.0299 * 0.8^e + 1e-4.
GAMMA_COSINE = [(0, 1.0), (1, 0.882842712), (2, 0.6), (3, 0.317157288), (4, 0.2), (7, 0.2)]
ETA_COSINE = [(0, 0.03), (5, 0.021242493), (10, 0.0001)]
ETA_EXP = [(0, 0.03), (1, 0.02402), (2, 0.019236), (5, 0.009897632)]


@pytest.mark.parametrize(("epoch", "want"), GAMMA_COSINE)
def test_gamma_schedule_by_hand(epoch, want):
    loss_fn = build_loss("sogclr", data_size=N, sogclr_gamma=0.2, gamma_schedule="cosine", gamma_decay_epochs=4)
    loss_fn.set_epoch(epoch)
    assert loss_fn.gamma_t == pytest.approx(want, abs=1e-8)
    stats = run_module(loss_fn, unit_rows(80, 4, 5), unit_rows(81, 4, 5), [0, 1, 2, 3], [0, 1, 2, 3])[3]
    assert stats["gamma"] == pytest.approx(want, abs=1e-8)


@pytest.mark.parametrize(("sched", "points"), [("cosine", ETA_COSINE), ("exp", ETA_EXP)])
def test_eta_schedule_by_hand(sched, points):
    loss_fn = build_loss("isogclr", data_size=N, epochs=10, eta_init=0.03, eta_sched=sched, eta_min=1e-4)
    for epoch, want in points:
        loss_fn.set_epoch(epoch)
        assert loss_fn.eta_t == pytest.approx(want, abs=1e-8), (sched, epoch)
    loss_fn.set_epoch(0)
    assert loss_fn.gamma_t == 0.8  # constant gamma by default


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_loss("simclr", data_size=N, **HP)
    for valid in ("clip", "sogclr", "isogclr"):
        assert valid in str(info.value)


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_non_finite_features_never_reach_the_state(name):
    loss_fn = build_loss(name, data_size=N, **HP)
    run_module(loss_fn, unit_rows(21, 8, 6), unit_rows(22, 8, 6), IMAGE_IDX[0], TEXT_IDX[0])
    before = buffers(loss_fn)
    image = unit_rows(23, 8, 6)
    image[2, 1] = float("nan")
    # Refusing the step with an error is fine; writing NaN into u or tau is not.
    with contextlib.suppress(ValueError, RuntimeError, FloatingPointError):
        loss_fn(image, unit_rows(24, 8, 6), torch.tensor(IMAGE_IDX[1]), torch.tensor(TEXT_IDX[1]))
    after = buffers(loss_fn)
    for key in before:
        assert torch.equal(before[key], after[key]), f"non-finite features changed {key}"


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_state_dict_round_trip(name):
    hp = {**HP, "eta_init": 0.5}
    loss_fn = build_loss(name, data_size=N, **hp)
    for step in range(2):
        run_module(loss_fn, unit_rows(30 + step, 8, 6), unit_rows(40 + step, 8, 6), IMAGE_IDX[step], TEXT_IDX[step])
    expected = {"log_u_I", "log_u_T", "seen_I", "seen_T"}
    if name == "isogclr":
        expected |= {"tau_I", "tau_T", "m_I", "m_T"}
    state = loss_fn.state_dict()
    assert expected <= state.keys(), f"missing buffers: {expected - state.keys()}"
    for key in expected:
        assert state[key].shape == (N,), f"{key} has shape {tuple(state[key].shape)}"
        assert state[key].dtype == (torch.bool if key.startswith("seen") else torch.float32), key

    saved = io.BytesIO()
    torch.save(loss_fn.state_dict(), saved)
    saved.seek(0)
    restored = build_loss(name, data_size=N, **hp)
    restored.load_state_dict(torch.load(saved))
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in state.items())

    image, text = unit_rows(50, 8, 6), unit_rows(51, 8, 6)
    original_step = run_module(loss_fn, image, text, IMAGE_IDX[2], TEXT_IDX[2])
    restored_step = run_module(restored, image, text, IMAGE_IDX[2], TEXT_IDX[2])
    for a, b in zip(original_step[:3], restored_step[:3], strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in loss_fn.state_dict().items())


def test_to_dtype_keeps_flags_and_results():
    loss_fn = build_loss("isogclr", data_size=N, **{**HP, "eta_init": 0.5})
    run_module(loss_fn, unit_rows(60, 8, 6), unit_rows(61, 8, 6), IMAGE_IDX[0], TEXT_IDX[0])
    converted = copy.deepcopy(loss_fn).to(torch.float64)
    assert converted.to("cpu") is converted
    for key in ("seen_I", "seen_T"):
        assert converted.state_dict()[key].dtype == torch.bool, f"{key} must stay bool under .to(dtype)"
    image, text = unit_rows(62, 8, 6), unit_rows(63, 8, 6)
    want = run_module(loss_fn, image, text, IMAGE_IDX[1], TEXT_IDX[1])
    got = run_module(converted, image, text, IMAGE_IDX[1], TEXT_IDX[1])
    # 1e-4: the float32 module rounds log u (up to ~200 here) where the float64 one does not.
    check_step(got, want[:3], 1e-4, "after .to(float64)")
    for key, value in loss_fn.state_dict().items():
        other = converted.state_dict()[key]
        if key.startswith("log_u"):
            seen = loss_fn.state_dict()[f"seen_{key[-1]}"]
            value, other = value[seen], other[seen]
        assert_matches(other, value, 1e-4, f"{key} after .to(float64)")


def test_reference_clip_is_cross_entropy():
    """The reference itself, against torch's cross-entropy in float64."""
    image, text = unit_rows(70, 7, 5).double(), unit_rows(71, 7, 5).double()
    logits = image @ text.T / 0.05
    labels = torch.arange(7)
    want = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert_matches(clip_loss(image, text, 0.05), want, 1e-12, "reference clip")


def test_reference_gcl_gradients_are_those_of_the_dro_objective():
    """The reference itself: on a first visit (u = g) the surrogate's feature gradient is that of
    mean_i tau * log g_i (both sides), and G is d/dtau of tau * log g(tau) + rho * tau (via m = beta * G)."""
    image, text = unit_rows(72, 6, 4).double(), unit_rows(73, 6, 4).double()
    tau, rho, beta, idx = 0.1, 1.0, 0.9, list(range(6))

    def log_mean_exp_objective(e, f, t):
        s = e @ f.T
        off = ~torch.eye(6, dtype=torch.bool)
        h_image = (s - s.diagonal()[:, None])[off].reshape(6, 5)
        h_text = (s - s.diagonal()[None, :]).T[off].reshape(6, 5)
        per_image = t * torch.log(torch.exp(h_image / t).mean(dim=1)) + rho * t
        per_text = t * torch.log(torch.exp(h_text / t).mean(dim=1)) + rho * t
        return per_image, per_text

    ref = GCLReference(N, tau, individual_tau=True, rho_I=rho, rho_T=rho, beta=beta)
    reference_step = partial(ref.step, image_idx=idx, text_idx=idx, gamma=0.8, eta=0.0)
    _, grad_image, grad_text = run_reference(reference_step, image, text)
    _, want_image, want_text = run_reference(
        lambda e, f: sum(x.mean() for x in log_mean_exp_objective(e, f, tau)), image, text
    )
    assert_matches(grad_image, want_image, 1e-10, "surrogate d/d image")
    assert_matches(grad_text, want_text, 1e-10, "surrogate d/d text")

    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    per_image, per_text = log_mean_exp_objective(image, text, t)
    for side, per_anchor in (("image", per_image), ("text", per_text)):
        want_G = torch.stack([torch.autograd.grad(x, t, retain_graph=True)[0] for x in per_anchor])
        assert want_G.abs().max() < 5, "G must stay inside the clip for this check"
        assert_matches(torch.from_numpy(ref.state[side].m[idx]) / beta, want_G, 1e-10, f"G {side}")
