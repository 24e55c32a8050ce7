"""The losses beyond clip / sogclr / isogclr (ALGORITHMS.md 4-6, 12), one process, against the
naive float64 loops of loss_reference.py: value, gradients with respect to the features and to
the loss's own parameters, and the per-sample state over steps with first visits and revisits.
"""

from __future__ import annotations

import io
import math
from functools import partial

import numpy as np
import pytest
import torch

from engine.optim import build_optimizer
from loss_reference import GCLReference, assert_matches, clip_loss, cyclip_loss, gamma_at, siglip_loss, vicreg_loss
from models.losses import LOSS_ALIASES, LOSSES, build_loss
from test_losses import EPOCHS, HP, IMAGE_IDX, TEXT_IDX, N, check_step, rtol_for, run_module, run_reference, unit_rows

DIM = 6
# a cosine gamma schedule that moves within the test's epochs (values the presets keep)
PLAIN_GAMMA = {"gamma_schedule": "cosine", "sogclr_gamma": 0.3, "gamma_decay_epochs": 4}


def gamma_of(hp: dict, epoch: int) -> float:
    return gamma_at(epoch, hp["sogclr_gamma"], hp["gamma_schedule"], hp["gamma_decay_epochs"])


def check_gcl_state(loss_fn, ref: GCLReference, keys: tuple[str, ...], rtol: float, what: str) -> None:
    """seen exactly, log u where seen, and the named per-sample arrays ("tau", "m", "v", "n")."""
    state = loss_fn.state_dict()
    for side, suffix in (("image", "I"), ("text", "T")):
        want = ref.state[side]
        assert np.array_equal(state[f"seen_{suffix}"].numpy(), want.seen), f"{what}: seen_{suffix}"
        mask = torch.from_numpy(want.seen)
        want_log_u = torch.log(torch.from_numpy(want.u[want.seen]))
        assert_matches(state[f"log_u_{suffix}"][mask], want_log_u, rtol, f"{what} log_u_{suffix}", scale_floor=1.0)
        for key in keys:
            values = torch.from_numpy(getattr(want, key))
            got = state[f"{key}_{suffix}"]
            if key == "tau" and ref.rule == "network":  # a record of seen samples only
                got, values = got[mask], values[mask]
            # moments average G, an O(1) difference of O(1/tau) terms: ~1e-7/tau^2 in float32
            tol = rtol if key in ("tau", "n") else max(rtol, 1e-7 / ref.tau_min**2)
            assert_matches(got, values, tol, f"{what} {key}_{suffix}", scale_floor=1.0)


# ---- siglip ------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (1.0, 0.0), (30.0, -3.0)])
def test_siglip_matches_reference(scale, bias):
    image, text = unit_rows(300, 9, DIM), unit_rows(301, 9, DIM)
    loss_fn = build_loss("siglip", data_size=N, siglip_scale_init=scale, siglip_bias_init=bias)
    got = run_module(loss_fn, image, text, list(range(9)), list(range(9)))
    log_scale = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    ref_bias = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    want = run_reference(lambda e, f: siglip_loss(e, f, log_scale, ref_bias), image, text)
    check_step(got, want, 1e-5, f"siglip t={scale} b={bias}")
    assert_matches(loss_fn.log_scale.grad.reshape(()), log_scale.grad, 1e-5, "d loss / d log t")
    assert_matches(loss_fn.bias.grad.reshape(()), ref_bias.grad, 1e-5, "d loss / d b")
    assert got[3]["scale"] == pytest.approx(scale, rel=1e-6) and got[3]["bias"] == pytest.approx(bias)


def test_siglip_starts_at_the_papers_values():
    loss_fn = build_loss("siglip", data_size=N)
    assert loss_fn.log_scale.item() == pytest.approx(math.log(10.0))
    assert loss_fn.bias.item() == -10.0
    assert {"log_scale", "bias"} <= loss_fn.state_dict().keys()


# ---- cyclip ------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.05, 0.01, 0.005])
def test_cyclip_matches_reference(tau):
    image, text = unit_rows(310, 8, DIM), unit_rows(311, 8, DIM)
    hp = {"temp": tau, "cyclip_lambda_in": 0.25, "cyclip_lambda_cross": 0.5}
    loss_fn = build_loss("cyclip", data_size=N, **hp)
    got = run_module(loss_fn, image, text, list(range(8)), list(range(8)))
    want = run_reference(lambda e, f: cyclip_loss(e, f, tau, 0.25, 0.5), image, text)
    check_step(got, want, rtol_for(tau), f"cyclip tau={tau}")


def test_cyclip_without_its_terms_is_clip():
    image, text = unit_rows(312, 8, DIM), unit_rows(313, 8, DIM)
    loss_fn = build_loss("cyclip", data_size=N, temp=0.02, cyclip_lambda_in=0.0, cyclip_lambda_cross=0.0)
    got = run_module(loss_fn, image, text, list(range(8)), list(range(8)))
    check_step(got, run_reference(lambda e, f: clip_loss(e, f, 0.02), image, text), 1e-5, "cyclip at lambda 0")
    assert build_loss("cyclip", data_size=N).lambda_in == 0.25 == build_loss("cyclip", data_size=N).lambda_cross


# ---- vicreg ------------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_vicreg_matches_reference(spread):
    """Unnormalised features: with spread 0.3 every dimension's std is below 1 (the hinge is
    active), with 3.0 above it (the hinge is 0)."""
    gen = torch.Generator().manual_seed(320)
    x, y = spread * torch.randn(10, DIM, generator=gen), spread * torch.randn(10, DIM, generator=gen)
    loss_fn = build_loss("vicreg", data_size=N, vicreg_sim=25.0, vicreg_std=25.0, vicreg_cov=1.0)
    assert loss_fn.normalized_features is False
    got = run_module(loss_fn, x, y, list(range(10)), list(range(10)))
    want = run_reference(lambda a, b: vicreg_loss(a, b, 25.0, 25.0, 1.0), x, y)
    check_step(got, want, 1e-5, f"vicreg spread {spread}")
    assert (got[3]["variance"] > 0) == (spread < 1)


def test_vicreg_gets_unnormalised_features_from_the_model():
    from engine.step import ContrastiveStep
    from models.model_clip import CLIPModel

    seen = {}

    class Recorder(torch.nn.Module):
        def compute(self, image_feat, text_feat, image_idx, text_idx):
            seen["norms"] = image_feat.norm(dim=1), text_feat.norm(dim=1)

    class Tower(torch.nn.Module):
        num_features = 4

        def forward(self, x):
            return x.flatten(1)[:, :4] * 7.0

    class TextTower(torch.nn.Module):
        config = type("Config", (), {"hidden_size": 4, "_attn_implementation": "sdpa"})()

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": input_ids[:, :, None].float().expand(-1, -1, 4) * 5.0})()

    model = CLIPModel(Tower(), TextTower(), embed_dim=4)
    for normalized in (True, False):
        recorder = Recorder()
        recorder.normalized_features = normalized
        ContrastiveStep(model, recorder, None)(
            torch.full((3, 3, 2, 2), 200, dtype=torch.uint8),
            torch.ones(3, 2, dtype=torch.long),
            torch.ones(3, 2),
            None,
            None,
        )
        unit = all(torch.allclose(n, torch.ones(3)) for n in seen["norms"])
        assert unit == normalized


# ---- GCL variants over several steps ----------------------------------------------------


def run_gcl_steps(name: str, hp: dict, ref: GCLReference, eta_of, rtol: float, keys: tuple[str, ...], param=None):
    loss_fn = build_loss(name, data_size=N, embed_dim=DIM, **hp)
    if ref.rule == "network":  # the reference computes with the module's initial networks
        ref.nets = {
            side: tuple(
                t.detach().double().clone().requires_grad_(True)
                for t in (net[0].weight, net[0].bias, net[3].weight[0], net[3].bias[0])
            )
            for side, net in (("image", loss_fn.nets["I"]), ("text", loss_fn.nets["T"]))
        }
    for step, (image_idx, text_idx, epoch) in enumerate(zip(IMAGE_IDX, TEXT_IDX, EPOCHS, strict=True)):
        loss_fn.set_epoch(epoch)
        loss_fn.zero_grad()
        image, text = unit_rows(400 + step, 8, DIM), unit_rows(500 + step, 8, DIM)
        got = run_module(loss_fn, image, text, image_idx, text_idx)
        if ref.rule == "network":
            for tensors in ref.nets.values():
                for t in tensors:
                    t.grad = None
        reference_step = partial(
            ref.step, image_idx=image_idx, text_idx=text_idx, gamma=gamma_of(hp, epoch), eta=eta_of(epoch)
        )
        want = run_reference(reference_step, image, text)
        what = f"{name} step {step}"
        check_step(got, want, rtol, what)
        check_gcl_state(loss_fn, ref, keys, rtol, what)
        # these gradients carry G, an O(1) difference of O(1/tau) terms: ~1e-7/tau^2 in float32
        g_rtol = max(rtol, 1e-7 / (ref.tau if ref.rule == "global" else ref.tau_min) ** 2)
        if param == "tau":
            assert_matches(loss_fn.tau.grad.reshape(()), torch.tensor(ref.grad_tau), g_rtol, f"{what} d/d tau")
        if param == "nets":
            for side, suffix in (("image", "I"), ("text", "T")):
                net = loss_fn.nets[suffix]
                got_grads = (net[0].weight.grad, net[0].bias.grad, net[3].weight.grad[0], net[3].bias.grad[0])
                for k, (g, t) in enumerate(zip(got_grads, ref.nets[side], strict=True)):
                    assert_matches(g, t.grad, g_rtol, f"{what} d/d tempnet {side} parameter {k}", scale_floor=1e-6)
    return loss_fn


@pytest.mark.parametrize("tau", [0.05, 0.01])
@pytest.mark.parametrize("name", ["fastclip_v0", "fastclip_v3"])
def test_global_temperature_variants(name, tau):
    """tau 0.005 lies outside FastCLIP's range [0.01, 1] (and is projected to 0.01)."""
    rho = 0.0 if name == "fastclip_v0" else 6.5
    hp = {**HP, **PLAIN_GAMMA, "temp": tau}
    ref = GCLReference(N, tau, rule="global", rho_I=rho, rho_T=rho, side_weight=1.0 if name == "fastclip_v0" else 0.5)
    loss_fn = run_gcl_steps(name, hp, ref, lambda epoch: 0.0, rtol_for(tau), (), param="tau")
    assert [g["lr"] for g in loss_fn.param_groups()] == [2e-4]


def test_global_temperature_is_kept_in_range():
    loss_fn = build_loss("fastclip_v3", data_size=N, **{**HP, **PLAIN_GAMMA})
    with torch.no_grad():
        loss_fn.tau.fill_(1e-4)  # as if an optimiser step had left the range
    stats = run_module(loss_fn, unit_rows(600, 8, DIM), unit_rows(601, 8, DIM), IMAGE_IDX[0], TEXT_IDX[0])[3]
    assert stats["tau_I"] == pytest.approx(0.01) and loss_fn.tau.item() == pytest.approx(0.01)


@pytest.mark.parametrize("tau", [0.03, 0.01, 0.005])
def test_fastclip_v2_adam_temperatures(tau):
    # lr 0.01 moves tau by up to 0.01 per visit: tau_min is reached (0.005 needs tau_min 0.005)
    hp = {**HP, **PLAIN_GAMMA, "tau_init": tau, "tau_min": min(tau, 0.01), "lr_tau": 0.01, "rho_I": 2.0}
    ref = GCLReference(N, tau, rule="adam", rho_I=2.0, rho_T=6.0, tau_min=hp["tau_min"])
    # Adam divides by the size of G, so G's float32 error (~1e-7/tau^2, see check_gcl_state)
    # reaches tau, and through it the next steps, undamped; a wrong update is off by O(1)
    rtol = max(rtol_for(hp["tau_min"]), 1e-7 / hp["tau_min"] ** 2)
    run_gcl_steps("fastclip_v2", hp, ref, lambda epoch: 0.01, rtol, ("tau", "m", "v", "n"))
    assert ref.state["text"].n.max() >= 2, "some sample should be revisited"


@pytest.mark.parametrize("tau", [0.05, 0.01, 0.005])
def test_tempnet_matches_reference(tau):
    hp = {**HP, "tau_init": tau, "tempnet_hidden": 5, "rho_I": 4.0}
    torch.manual_seed(7)
    ref = GCLReference(N, tau, rule="network", rho_I=4.0, rho_T=6.0)
    loss_fn = run_gcl_steps("isogclr_tempnet", hp, ref, lambda epoch: 0.0, rtol_for(0.005), ("tau",), param="nets")
    taus = loss_fn.temperatures()
    assert set(taus) == {"image", "text"} and len(taus["image"][0]) == int(loss_fn.seen_I.sum())


def test_tempnet_starts_at_tau_init_and_has_its_own_learning_rate():
    loss_fn = build_loss("isogclr_tempnet", data_size=N, embed_dim=DIM, tau_init=0.03, lr_tempnet=0.05)
    with torch.no_grad():
        for net in loss_fn.nets.values():
            net[3].weight.zero_()
    stats = run_module(loss_fn, unit_rows(610, 8, DIM), unit_rows(611, 8, DIM), IMAGE_IDX[0], TEXT_IDX[0])[3]
    assert stats["tau_I"] == pytest.approx(0.03, rel=1e-5) and stats["tau_T"] == pytest.approx(0.03, rel=1e-5)
    model = torch.nn.Linear(3, 3)
    optimizer = build_optimizer("adamw", model, loss_fn, lr=1e-3, weight_decay=0.1)
    groups = [(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(1, 1e-3, 0.1), (1, 1e-3, 0.0), (8, 0.05, 0.0)]
    default = build_loss("isogclr_tempnet", data_size=N, embed_dim=DIM)
    assert [g["lr"] for g in build_optimizer("adamw", model, default, 1e-3, 0.1).param_groups] == [1e-3] * 3


def test_tempnet_refuses_features_of_another_width():
    loss_fn = build_loss("isogclr_tempnet", data_size=N, embed_dim=DIM + 1)
    with pytest.raises(ValueError, match=r"built for 7-dim features, got 6; build it with dim=--embed_dim"):
        run_module(loss_fn, unit_rows(620, 4, DIM), unit_rows(621, 4, DIM), [0, 1, 2, 3], [0, 1, 2, 3])


# ---- names, presets, aliases ------------------------------------------------------------


def test_fastclip_v1_is_sogclr_with_the_cosine_schedule():
    image, text = unit_rows(630, 8, DIM), unit_rows(631, 8, DIM)
    results = []
    for name, hp in (
        ("fastclip_v1", {"temp": 0.02}),
        ("sogclr", {"temp": 0.02, "gamma_schedule": "cosine", "sogclr_gamma": 0.2, "gamma_decay_epochs": 18}),
    ):
        loss_fn = build_loss(name, data_size=N, **hp)
        steps = []
        for step, epoch in enumerate((0, 5, 9)):
            loss_fn.set_epoch(epoch)
            steps.append(run_module(loss_fn, image, text, IMAGE_IDX[step], TEXT_IDX[step]))
        results.append((type(loss_fn), [s[:3] for s in steps], [s[3]["gamma"] for s in steps], loss_fn.state_dict()))
    (cls_a, steps_a, gammas_a, state_a), (cls_b, steps_b, gammas_b, state_b) = results
    assert cls_a is cls_b and gammas_a == gammas_b and gammas_a[0] == 1.0 and 0.2 < gammas_a[2] < gammas_a[1] < 1
    assert all(torch.equal(x, y) for a, b in zip(steps_a, steps_b, strict=True) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_presets_leave_values_set_by_the_user():
    assert build_loss("fastclip_v1", data_size=N, sogclr_gamma=0.5).gamma == 0.5
    assert build_loss("fastclip_v2", data_size=N).tau_min == 0.01
    assert build_loss("fastclip_v2", data_size=N, tau_min=0.02).tau_min == 0.02
    assert build_loss("sogclr", data_size=N).gamma_schedule == "constant"  # no preset for sogclr


def test_isogclr_new_is_the_tempnet():
    assert LOSS_ALIASES["isogclr_new"] == "isogclr_tempnet"
    assert type(build_loss("isogclr_new", data_size=N, embed_dim=DIM)).__name__ == "TempNetLoss"


def test_unknown_loss_name_lists_every_valid_name():
    with pytest.raises(ValueError, match="unknown loss") as info:
        build_loss("simclr", data_size=N)
    for valid in [*LOSSES, *LOSS_ALIASES]:
        assert valid in str(info.value)


# ---- every loss: finite, resumable ------------------------------------------------------

ALL = sorted([*LOSSES, "fastclip_v1"])


@pytest.mark.parametrize("name", ALL)
def test_every_loss_is_finite_at_extreme_similarities(name):
    v = unit_rows(640, 1, DIM).expand(8, DIM)
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, -1, -1])[:, None]
    for tau in (0.01, 0.005):
        loss_fn = build_loss(name, data_size=N, embed_dim=DIM, temp=tau, tau_init=tau)
        for step in range(2):
            loss, grad_image, grad_text, stats = run_module(
                loss_fn, v * signs, v.clone(), IMAGE_IDX[step], TEXT_IDX[step]
            )
            what = f"{name} tau={tau} step {step}"
            assert torch.isfinite(loss) and torch.isfinite(grad_image).all() and torch.isfinite(grad_text).all(), what
            assert all(math.isfinite(x) for x in stats.values()), f"{what}: {stats}"
        assert all(torch.isfinite(t).all() for t in loss_fn.state_dict().values()), name


@pytest.mark.parametrize("name", ALL)
def test_every_loss_resumes_exactly(name):
    """The state dict carries every piece of state and learned parameter: a loss rebuilt from it
    continues bit for bit, also after an optimiser step of its parameters."""
    torch.manual_seed(3)
    hp = {"tempnet_hidden": 4}
    loss_fn = build_loss(name, data_size=N, embed_dim=DIM, **hp)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1) if list(loss_fn.parameters()) else None
    for step in range(2):
        run_module(
            loss_fn, unit_rows(650 + step, 8, DIM), unit_rows(660 + step, 8, DIM), IMAGE_IDX[step], TEXT_IDX[step]
        )
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    saved = io.BytesIO()
    torch.save(loss_fn.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(99)  # another initialisation, overwritten by the load
    restored = build_loss(name, data_size=N, embed_dim=DIM, **hp)
    restored.load_state_dict(torch.load(saved))
    image, text = unit_rows(670, 8, DIM), unit_rows(671, 8, DIM)
    for module in (loss_fn, restored):
        module.set_epoch(2)
    a = run_module(loss_fn, image, text, IMAGE_IDX[2], TEXT_IDX[2])
    b = run_module(restored, image, text, IMAGE_IDX[2], TEXT_IDX[2])
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)), name
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in loss_fn.state_dict().items()), name
