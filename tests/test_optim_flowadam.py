"""FlowAdam: the Adam branch, the trigger rule, the ODE branch and injection, fallbacks, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from recsys_flowadam.optim import FlowAdam
from recsys_flowadam.optim.flowadam import inject_momentum

F64 = torch.float64
NEVER = dict(switch_sensitivity=0.0, curvature_sensitivity=math.inf)  # triggers that cannot fire
ALWAYS = dict(switch_sensitivity=1e30, curvature_sensitivity=0.0)  # plateau holds at every step


def _least_squares(seed: int = 0, dtype=F64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(60, 12, generator=gen, dtype=dtype).to(device)
    b = torch.randn(60, generator=gen, dtype=dtype).to(device)
    x0 = torch.randn(12, generator=gen, dtype=dtype).to(device)
    return a, b, x0


def _run_ls(make_opt, steps: int, seed: int = 0, dtype=F64, device="cpu"):
    a, b, x0 = _least_squares(seed, dtype, device)
    x = x0.clone().requires_grad_(True)
    opt = make_opt([x])

    def closure():
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return x.detach(), opt


def _mf_problem(seed: int = 0, dtype=F64):
    """A small masked matrix factorization: the kind of problem where preset B's triggers fire."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randn(20, 3, generator=gen, dtype=dtype) @ torch.randn(3, 15, generator=gen, dtype=dtype)
    mask = torch.rand(20, 15, generator=gen) < 0.4
    u0 = 0.1 * torch.randn(20, 4, generator=gen, dtype=dtype)
    v0 = 0.1 * torch.randn(15, 4, generator=gen, dtype=dtype)
    return truth, mask, u0, v0


def _mf_closure(opt, u, v, truth, mask):
    def closure():
        opt.zero_grad()
        pred = u @ v.T
        loss = ((pred - truth)[mask] ** 2).mean() + 1e-5 * (u.pow(2).sum() + v.pow(2).sum())
        loss.backward()
        return loss

    return closure


# ------------------------------------------------------------------------- Adam branch


@pytest.mark.parametrize("never", [NEVER, dict(warmup_steps=10**9)])
def test_adam_branch_matches_torch_adam(never):
    ref, _ = _run_ls(lambda p: torch.optim.Adam(p, lr=0.01), 200)
    got, opt = _run_ls(lambda p: FlowAdam(p, lr=0.01, **never), 200)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0.0)
    d = opt.diagnostics()
    assert d["steps"] == 200 and d["grad_evals"] == 200 and d["ode_triggers"] == 0 and d["ode_evals"] == 0
    assert float(opt.state[next(iter(opt.state))]["step"]) == 200


def test_decoupled_weight_decay_matches_torch_adamw():
    ref, _ = _run_ls(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), 200)
    got, _ = _run_ls(lambda p: FlowAdam(p, lr=0.01, weight_decay=0.1, **NEVER), 200)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0.0)


def test_param_groups_with_their_own_lr_match_torch_adam():
    def run(make):
        a, b, x0 = _least_squares(3)
        x1 = x0[:6].clone().requires_grad_(True)
        x2 = x0[6:].clone().requires_grad_(True)
        opt = make([{"params": [x1]}, {"params": [x2], "lr": 0.05, "betas": (0.8, 0.99)}])

        def closure():
            opt.zero_grad()
            loss = ((a @ torch.cat([x1, x2]) - b) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(100):
            opt.step(closure)
        return torch.cat([x1, x2]).detach()

    ref = run(lambda g: torch.optim.Adam(g, lr=0.01))
    got = run(lambda g: FlowAdam(g, lr=0.01, **NEVER))
    assert torch.allclose(got, ref, rtol=1e-6, atol=0.0)


def test_float32_runs_and_stays_close_to_adam():
    ref, _ = _run_ls(lambda p: torch.optim.Adam(p, lr=0.01), 50, dtype=torch.float32)
    got, _ = _run_ls(lambda p: FlowAdam(p, lr=0.01, **NEVER), 50, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_at_most_one_item_per_step_and_none_during_warmup(monkeypatch):
    calls = [0]
    original = torch.Tensor.item

    def counting_item(self):
        calls[0] += 1
        return original(self)

    a, b, x0 = _least_squares()
    x = x0.clone().requires_grad_(True)
    opt = FlowAdam([x], lr=0.01, switch_sensitivity=0.0, curvature_sensitivity=1e30, warmup_steps=5)

    def closure():
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        return loss

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    for _ in range(5):
        opt.step(closure)
    assert calls[0] == 0
    for _ in range(10):
        opt.step(closure)
    assert calls[0] == 10  # the trigger decision, once per step; it never fires here
    assert opt.diagnostics()["ode_triggers"] == 0


# ------------------------------------------------------------------------ trigger rule


def _rule(grads, switch, curvature, warmup, beta=0.9):
    """The issue's rule in plain Python floats: list of (plateau, stiff) per step, None = Adam."""
    out, prev, n_bar, c_bar = [], [0.0] * len(grads[0]), None, None
    for k, g in enumerate(grads, start=1):
        n = math.sqrt(sum(x * x for x in g))
        c = math.sqrt(sum((x - y) ** 2 for x, y in zip(g, prev)))
        n_bar = n if n_bar is None else beta * n_bar + (1 - beta) * n
        c_bar = c if c_bar is None else beta * c_bar + (1 - beta) * c
        plateau, stiff = n < switch * n_bar, c > curvature * c_bar
        out.append((plateau, stiff) if k > warmup and (plateau or stiff) else None)
        prev = list(g)
    return out


def test_trigger_rule_fires_exactly_where_the_rule_says():
    # Steps 1-5 constant (no trigger), 2: a dip during warm-up (suppressed), 6: a drop in the
    # norm (plateau, not stiff), 8: a large jump (stiff, not plateau), 9: a drop back after the
    # jump (stiff and plateau), then constant again until the EMAs settle.
    seq = [[1.0, 0.0], [0.2, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.5, 0.0],
           [0.5, 4.0], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0]]
    switch, curvature, warmup = 0.9, 3.0, 3
    expected = _rule(seq, switch, curvature, warmup)
    # The hand-derived positions (1-based steps), checked against the reference above.
    fired = {k + 1: e for k, e in enumerate(expected) if e is not None}
    assert fired[6] == (True, False) and fired[8] == (False, True) and fired[9] == (True, True)
    assert 2 not in fired and all(k > warmup for k in fired)

    x = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.01, switch_sensitivity=switch, curvature_sensitivity=curvature,
                   warmup_steps=warmup, ode_method="euler", injection="none")
    current = [None]

    def closure():
        x.grad = current[0].clone()  # the gradient sequence, whatever the parameters
        return torch.zeros((), dtype=F64)

    got = []
    for g in seq:
        current[0] = torch.tensor(g, dtype=F64)
        before = opt.diagnostics()
        opt.step(closure)
        after = opt.diagnostics()
        if after["ode_triggers"] == before["ode_triggers"]:
            got.append(None)
        else:
            got.append((after["plateau_triggers"] > before["plateau_triggers"],
                        after["stiff_triggers"] > before["stiff_triggers"]))
    assert got == expected


def test_presets_and_overrides():
    x = torch.zeros(2, requires_grad=True)
    b = FlowAdam([x])
    assert (b.defaults["switch_sensitivity"], b.defaults["curvature_sensitivity"], b.defaults["ode_t_scale"]) == (0.9, 0.1, 0.5)
    a = FlowAdam([x], mode="A")
    assert (a.defaults["switch_sensitivity"], a.defaults["curvature_sensitivity"], a.defaults["ode_t_scale"]) == (0.4, 3.0, 2.0)
    o = FlowAdam([x], mode="A", curvature_sensitivity=5.0)
    assert (o.defaults["switch_sensitivity"], o.defaults["curvature_sensitivity"]) == (0.4, 5.0)


# ---------------------------------------------------------------- ODE branch, injection


def test_inject_momentum_hand_computed():
    m = [torch.tensor([3.0, 4.0], dtype=F64)]  # ||m|| = 5
    v = torch.tensor([6.0, 8.0], dtype=F64)  # ||v|| = 10: s = min(1, 25/10) = 1, cap inactive
    inject_momentum(m, [v.clone()], 0.5, "soft")
    assert torch.allclose(m[0], torch.tensor([4.5, 6.0], dtype=F64), rtol=1e-12)

    m = [torch.tensor([0.3, 0.4], dtype=F64)]  # ||m|| = 0.5: s = 5 * 0.5 / 10 = 0.25, cap active
    inject_momentum(m, [v.clone()], 0.5, "soft")
    assert torch.allclose(m[0], torch.tensor([0.15 + 0.75, 0.2 + 1.0], dtype=F64), rtol=1e-7)

    m = [torch.tensor([0.3, 0.4], dtype=F64)]
    inject_momentum(m, [v.clone()], 0.25, "soft")  # gamma: 0.75 * m + 0.25 * 0.25 * v
    assert torch.allclose(m[0], torch.tensor([0.225 + 0.375, 0.3 + 0.5], dtype=F64), rtol=1e-7)

    m = [torch.tensor([0.3, 0.4], dtype=F64)]
    inject_momentum(m, [v.clone()], 0.5, "hard")
    assert torch.equal(m[0], v)

    m = [torch.tensor([0.3, 0.4], dtype=F64)]
    inject_momentum(m, [v.clone()], 0.5, "none")
    assert torch.equal(m[0], torch.tensor([0.3, 0.4], dtype=F64))

    # Per tensor: each parameter gets its own s.
    m = [torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([0.3, 0.4], dtype=F64)]
    inject_momentum(m, [v.clone(), v.clone()], 0.5, "soft")
    assert torch.allclose(m[0], torch.tensor([4.5, 6.0], dtype=F64), rtol=1e-7)
    assert torch.allclose(m[1], torch.tensor([0.9, 1.2], dtype=F64), rtol=1e-7)


@pytest.mark.parametrize("injection", ["soft", "hard", "none"])
def test_ode_step_end_to_end_with_euler(injection):
    """Forced trigger, one Euler step: theta_T = theta_0 - T clip(g); v = t_scale * clip(g)."""
    lr, t_scale = 0.1, 0.5
    x = torch.tensor([3.0, -0.2, 0.05], dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=lr, ode_t_scale=t_scale, ode_method="euler", injection=injection,
                   warmup_steps=2, **ALWAYS)
    target = torch.tensor([0.0, 0.0, 1.0], dtype=F64)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((x - target) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)  # warm-up: two Adam steps
    st = opt.state[x]
    m0, s0, theta0 = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), x.detach().clone()
    g = theta0 - target
    opt.step(closure)
    d = opt.diagnostics()
    assert (d["ode_triggers"], d["ode_evals"], d["grad_evals"], d["fallbacks"]) == (1, 0, 3, 0)
    clipped = g.clamp(-1.0, 1.0)
    assert torch.allclose(x.detach(), theta0 - lr * t_scale * clipped, rtol=1e-12)
    v = t_scale * clipped
    if injection == "soft":
        s = min(1.0, 5 * float(m0.norm()) / (float(v.norm()) + 1e-8))
        expected_m = 0.5 * m0 + 0.5 * s * v
    elif injection == "hard":
        expected_m = v
    else:
        expected_m = m0
    assert torch.allclose(st["exp_avg"], expected_m, rtol=1e-10)
    assert torch.equal(st["exp_avg_sq"], s0)  # second moment untouched
    assert float(st["step"]) == 2  # Adam's step count untouched


def test_dopri5_ode_step_costs_eight_gradient_evaluations():
    truth, mask, u0, v0 = _mf_problem()
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    opt = FlowAdam([u, v], lr=0.01, warmup_steps=0, **ALWAYS)
    closure = _mf_closure(opt, u, v, truth, mask)
    for _ in range(3):
        opt.step(closure)
    d = opt.diagnostics()
    assert d["ode_triggers"] == 3 and d["fallbacks"] == 0
    assert d["ode_evals"] == 3 * 7 and d["grad_evals"] == 3 * 8  # probe + 6 stages, plus g at t=0


def test_param_groups_follow_the_flow_to_their_own_horizon():
    x1 = torch.tensor([5.0, -5.0], dtype=F64, requires_grad=True)
    x2 = torch.tensor([5.0, 0.3], dtype=F64, requires_grad=True)
    opt = FlowAdam([{"params": [x1]}, {"params": [x2], "lr": 0.01}], lr=0.1, ode_method="rk4",
                   ode_steps=4, warmup_steps=0, injection="none", **ALWAYS)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (x1.pow(2).sum() + x2.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    # |x| > 1 stays clipped: x moves by exactly T = lr * 0.5; x2[1] (0.3) decays as exp(-T).
    assert torch.allclose(x1.detach(), torch.tensor([5.0 - 0.05, -5.0 + 0.05], dtype=F64), rtol=1e-12)
    assert torch.allclose(x2.detach()[0], torch.tensor(5.0 - 0.005, dtype=F64), rtol=1e-12)
    assert torch.allclose(x2.detach()[1], torch.tensor(0.3 * math.exp(-0.005), dtype=F64), rtol=1e-9)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_nan_mid_integration_restores_and_takes_an_adam_step(method):
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    x = x0.clone().requires_grad_(True)
    opt = FlowAdam([x], lr=0.01, ode_method=method, warmup_steps=0, **ALWAYS)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = (x**2).sum()
        if calls[0] >= 3:  # finite at t=0 and at the first stage, NaN afterwards
            loss = loss * math.nan
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)  # the first evaluation's loss is returned
    d = opt.diagnostics()
    assert d["fallbacks"] == 1 and d["ode_triggers"] == 1 and d["grad_evals"] == calls[0] >= 3
    # The result is exactly one Adam step from x0 with the gradient at x0.
    y = x0.clone().requires_grad_(True)
    ref = torch.optim.Adam([y], lr=0.01)
    y.grad = 2 * x0
    ref.step()
    assert torch.allclose(x.detach(), y.detach(), rtol=1e-12)
    assert float(opt.state[x]["step"]) == 1


def test_closure_error_mid_integration_restores_parameters():
    x0 = torch.tensor([1.0, -2.0], dtype=F64)
    x = x0.clone().requires_grad_(True)
    opt = FlowAdam([x], lr=0.1, ode_method="rk4", warmup_steps=0, **ALWAYS)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(x.detach(), x0)


# ----------------------------------------------------------------------- state round trip


def _mf_run(opt_kwargs, steps, state=None):
    truth, mask, u0, v0 = _mf_problem()
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    if state is not None:
        with torch.no_grad():
            u.copy_(state["u"])
            v.copy_(state["v"])
    opt = FlowAdam([u, v], **opt_kwargs)
    if state is not None:
        opt.load_state_dict(state["opt"])
    closure = _mf_closure(opt, u, v, truth, mask)
    for _ in range(steps):
        opt.step(closure)
    return u.detach().clone(), v.detach().clone(), opt


@pytest.mark.parametrize("method", ["dopri5", "heun"])
def test_state_dict_round_trip_50_plus_50_equals_100(method):
    kw = dict(lr=0.02, ode_method=method, warmup_steps=5)
    u100, v100, full = _mf_run(kw, 100)
    u50, v50, half = _mf_run(kw, 50)
    assert half.diagnostics()["ode_triggers"] > 0  # the EMA statistics matter in this run
    buf = io.BytesIO()
    torch.save({"u": u50, "v": v50, "opt": half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    u, v, resumed = _mf_run(kw, 50, state=saved)
    assert torch.equal(u, u100) and torch.equal(v, v100)
    assert resumed.diagnostics() == full.diagnostics()


def test_load_state_dict_rejects_a_plain_adam_state():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="flowadam"):
        FlowAdam([x]).load_state_dict(torch.optim.Adam([x]).state_dict())


# ------------------------------------------------------------------------ bad input


def test_step_requires_a_closure():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        FlowAdam([x]).step()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(mode="C"), "mode"),
        (dict(switch_sensitivity=-1.0), "switch_sensitivity"),
        (dict(curvature_sensitivity=math.nan), "curvature_sensitivity"),
        (dict(ode_t_scale=0.0), "ode_t_scale"),
        (dict(ode_method="rk45"), "ode_method"),
        (dict(ode_steps=0), "ode_steps"),
        (dict(ode_tol=0.0), "ode_tol"),
        (dict(ode_clip=0.0), "ode_clip"),
        (dict(momentum_blend_gamma=1.5), "momentum_blend_gamma"),
        (dict(injection="soft-ish"), "injection"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(stat_beta=1.0), "stat_beta"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        FlowAdam([x], **kwargs)


def test_group_values_are_checked_and_global_options_stay_global():
    x, y = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        FlowAdam([{"params": [x]}, {"params": [y], "lr": -1.0}])
    with pytest.raises(ValueError, match="ode_method"):
        FlowAdam([{"params": [x]}, {"params": [y], "ode_method": "euler"}])


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        FlowAdam([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = FlowAdam(emb.parameters())

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu_and_syncs_at_most_once_per_adam_step():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kw = dict(lr=0.01, warmup_steps=5)
    cpu, cpu_opt = _run_ls(lambda p: FlowAdam(p, **kw), 40, dtype=torch.float32)
    gpu, gpu_opt = _run_ls(lambda p: FlowAdam(p, **kw), 40, dtype=torch.float32, device="cuda")
    assert gpu.device.type == "cuda"
    assert gpu_opt.diagnostics()["ode_triggers"] > 0
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    # Adam-branch steps: the trigger decision is the only synchronisation.
    a, b, x0 = _least_squares(1, torch.float32, "cuda")
    x = x0.clone().requires_grad_(True)
    opt = FlowAdam([x], lr=0.01, switch_sensitivity=0.0, curvature_sensitivity=1e30, warmup_steps=2)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    torch.cuda.synchronize()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                opt.step(closure)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 5
