"""FlowAdam's everyday preset "E": its cost (one closure call per step), its noise-aware trigger
(rare under pure noise, firing on a plateau or a jump), its Euler flow, its state, its place as
the default of ``train`` and ``make_optimizer`` while reproduce and the class keep preset B."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_flowadam.optim import FlowAdam, count_closure, make_optimizer
from recsys_flowadam.optim.everyday import (
    NoiseAwareStats,
    TriggerMailbox,
    departure_parts,
    gradient_departure,
    variance_beta,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread, no intra-op synchronisation


def _sequence_run(grad_at, steps: int, dim: int, **kwargs):
    """Feed FlowAdam a given gradient sequence (whatever the parameters); return the optimizer and
    the 0-based steps that took the ODE branch, with their (plateau, stiff) bits."""
    x = torch.zeros(dim, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=1e-3, **kwargs)
    k = [0]

    def closure():
        x.grad = grad_at(k[0])
        return torch.zeros((), dtype=F64)

    fired = {}
    for k[0] in range(steps):
        before = opt.diagnostics()
        opt.step(closure)
        after = opt.diagnostics()
        if after["ode_triggers"] > before["ode_triggers"]:
            fired[k[0]] = (after["plateau_triggers"] > before["plateau_triggers"],
                           after["stiff_triggers"] > before["stiff_triggers"])
    return opt, fired


def _noise(dim: int, seed: int, mean: float = 0.0, heavy: bool = False):
    gen = torch.Generator().manual_seed(seed)

    def grad_at(_k):
        g = torch.randn(dim, generator=gen, dtype=F64)
        if heavy:  # Student t with 3 degrees of freedom: occasional large gradients
            g = g / torch.randn(3, generator=gen, dtype=F64).pow(2).mean().sqrt()
        return mean + g

    return grad_at


# ------------------------------------------------------------------------ cost: one closure call


def test_preset_e_takes_exactly_one_closure_call_per_step_even_when_it_fires_every_step():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=gen, dtype=F64), torch.randn(40, generator=gen, dtype=F64)
    x = torch.zeros(8, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.01, mode="E", switch_sensitivity=1e30, warmup_steps=0)  # plateau on every step

    def closure():
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        return loss

    counted = count_closure(closure)
    first = float(closure().detach())
    for _ in range(50):
        opt.step(counted)
    d = opt.diagnostics()
    assert counted.calls == 50 == d["grad_evals"] == d["steps"]
    assert d["ode_triggers"] == 48 and d["ode_evals"] == 0 and d["fallbacks"] == 0  # decided at 1, used from 2
    assert float(closure().detach()) < first
    assert "g_prev" not in opt.state[x]  # no copy of the previous gradient is kept


def test_euler_flow_step_is_one_clipped_gradient_step_and_soft_injection():
    """A forced trigger: theta <- theta - lr * t_scale * clip(g); m <- (1-gamma) m + gamma s v; v, step kept."""
    lr, t_scale = 0.1, 0.5
    x = torch.tensor([3.0, -0.2, 0.05], dtype=F64, requires_grad=True)
    target = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    opt = FlowAdam([x], lr=lr, mode="E", switch_sensitivity=1e30, warmup_steps=2, weight_decay=0.1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((x - target) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)  # warm-up: two Adam steps; the second posts the decision for the third
    st = opt.state[x]
    m0, s0, theta0 = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), x.detach().clone()
    opt.step(closure)
    assert opt.diagnostics()["ode_triggers"] == 1
    v = t_scale * (theta0 - target).clamp(-1.0, 1.0)
    assert torch.allclose(x.detach(), (theta0 - lr * v) * (1 - lr * 0.1), rtol=1e-12)
    s = min(1.0, 5 * float(m0.norm()) / (float(v.norm()) + 1e-8))
    assert torch.allclose(st["exp_avg"], 0.5 * m0 + 0.5 * s * v, rtol=1e-10)
    assert torch.equal(st["exp_avg_sq"], s0) and float(st["step"]) == 2


def test_e_with_a_solver_reevaluates_like_the_other_presets():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.01, mode="E", ode_method="rk4", switch_sensitivity=1e30, warmup_steps=0)

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    d = opt.diagnostics()
    assert d["ode_triggers"] == 3 and d["ode_evals"] == 3 * 3 and d["grad_evals"] == 5 + 3 * 3


# ------------------------------------------------------------------------------ the trigger rule


@pytest.mark.parametrize("dim,mean", [(1, 0.0), (2, 1.0), (10, 0.0), (1000, 1.0)])
def test_pure_noise_rarely_triggers(dim, mean):
    opt, fired = _sequence_run(_noise(dim, seed=dim, mean=mean), 1500, dim, mode="E")
    assert len(fired) <= 0.003 * 1500, fired  # about z = 3 standard deviations: a few in a thousand at most
    assert not any(p for p, _ in fired.values())  # a fluctuating norm is not a plateau


def test_heavy_tailed_noise_triggers_on_few_steps():
    _, fired = _sequence_run(_noise(20, seed=5, heavy=True), 1500, 20, mode="E")
    assert len(fired) <= 0.02 * 1500  # only the outliers (a gradient many times the usual) count as stiff


def test_preset_b_fires_on_most_steps_of_the_same_noise():
    """Why E has its own rule: B's tests (raw values, curvature 0.1) are set off by noise alone."""
    opt, fired = _sequence_run(_noise(10, seed=10), 300, 10, mode="B", ode_method="euler")
    assert len(fired) > 0.8 * 290


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.1])
def test_a_collapse_of_the_gradient_norm_is_a_plateau_and_fires_the_next_step(sigma):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(50, generator=gen, dtype=F64)
    u = u / u.norm()

    def grad_at(k):
        return (1.0 if k < 150 else 0.1) * u + sigma / math.sqrt(50) * torch.randn(50, generator=gen, dtype=F64)

    _, fired = _sequence_run(grad_at, 300, 50, mode="E")
    assert min(fired) == 151 and fired[151][0]  # the plateau bit, one step after the drop (the decision's lag)
    assert all(150 < k < 160 for k in fired)  # the burst inflates the variance, which damps what follows


def test_a_jump_of_the_gradient_is_stiff():
    u = torch.ones(8, dtype=F64) / math.sqrt(8)
    gen = torch.Generator().manual_seed(4)
    _, fired = _sequence_run(lambda k: (5.0 if k >= 100 else 1.0) * u + 0.01 * torch.randn(8, generator=gen, dtype=F64),
                             200, 8, mode="E")
    assert 101 in fired and fired[101] == (False, True)


def test_a_real_plateau_fires_the_plateau_trigger_in_training():
    """softplus(50 (x - 1)) / 50 per coordinate: slope 1 above x = 1, flat below. Adam walks down
    the slope at about lr per step; where the slope ends the gradient norm collapses."""
    x = torch.full((10,), 3.0, dtype=F64, requires_grad=True)
    opt = FlowAdam([x], lr=0.05, mode="E")
    plateau_at = []

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(50 * (x - 1)).sum() / 50
        loss.backward()
        return loss

    for k in range(120):
        before = opt.diagnostics()["plateau_triggers"]
        x_before = float(x.detach().mean())
        opt.step(closure)
        if opt.diagnostics()["plateau_triggers"] > before:
            plateau_at.append((k, x_before))
    assert plateau_at, "the plateau should trigger"
    assert all(x_k < 1.2 for _, x_k in plateau_at)  # never on the slope, only where it flattens


# ------------------------------------------------------------------------------ training


def _mf_minibatch_run(optimizer: str, **kwargs):
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, rank = 60, 50, 3
    truth = torch.randn(n_users, rank, generator=gen) @ torch.randn(rank, n_items, generator=gen) / math.sqrt(rank)
    mask = torch.rand(n_users, n_items, generator=gen) < 0.5
    users, items = mask.nonzero(as_tuple=True)
    values = truth[users, items] + 0.05 * torch.randn(len(users), generator=gen)
    u = (0.1 * torch.randn(n_users, 5, generator=gen)).requires_grad_(True)
    v = (0.1 * torch.randn(n_items, 5, generator=gen)).requires_grad_(True)
    opt = make_optimizer(optimizer, [u, v], lr=0.02, **kwargs)
    batch = [torch.arange(0)]

    def closure():
        opt.zero_grad()
        i = batch[0]
        loss = ((u[users[i]] * v[items[i]]).sum(1) - values[i]).pow(2).mean() + 1e-4 * (u.pow(2).sum() + v.pow(2).sum())
        loss.backward()
        return loss

    counted = count_closure(closure)
    steps = 0
    for _ in range(40):  # epochs of 6 batches of 250 ratings
        perm = torch.randperm(len(values), generator=gen)
        for start in range(0, len(values) - 249, 250):
            batch[0] = perm[start : start + 250]
            opt.step(counted)
            steps += 1
    with torch.no_grad():
        rmse = float((u @ v.T - truth)[~mask].pow(2).mean().sqrt())
    return rmse, float(truth[~mask].pow(2).mean().sqrt()), counted.calls, steps, opt


def test_minibatch_training_with_e_converges_at_adams_cost():
    rmse, zero_rmse, calls, steps, opt = _mf_minibatch_run("flowadam")
    adam_rmse, *_ = _mf_minibatch_run("adam")
    assert opt.defaults["mode"] == "E"
    assert calls == steps  # one gradient evaluation per step
    assert rmse < 0.5 * zero_rmse and rmse < 1.05 * adam_rmse
    assert opt.diagnostics()["ode_triggers"] <= 0.02 * steps  # batch noise does not keep it flowing


# --------------------------------------------------------------------------------- state


def test_state_dict_round_trip_resumes_exactly_including_the_pending_decision():
    def make(x):
        return FlowAdam([x], lr=0.05, mode="E", warmup_steps=3, switch_sensitivity=0.95, curvature_sensitivity=1.1)

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, generator=gen, dtype=F64) * (1 + (k % 7 == 0) * 4) for k in range(40)]

    def run(opt, x, ks):
        for k in ks:
            def closure(k=k):
                x.grad = grads[k] + x.detach()
                return torch.zeros((), dtype=F64)
            opt.step(closure)

    x_full = torch.zeros(6, dtype=F64, requires_grad=True)
    full = make(x_full)
    run(full, x_full, range(40))
    assert full.diagnostics()["ode_triggers"] > 0, "the case should exercise the flow"

    x_a = torch.zeros(6, dtype=F64, requires_grad=True)
    first = make(x_a)
    run(first, x_a, range(20))
    sd = first.state_dict()
    x_b = x_a.detach().clone().requires_grad_(True)
    second = make(x_b)
    second.load_state_dict(sd)
    run(second, x_b, range(20, 40))
    assert torch.equal(x_b.detach(), x_full.detach())
    assert second.diagnostics() == full.diagnostics()


def test_an_older_state_dict_without_the_noise_statistics_loads():
    x = torch.zeros(3, requires_grad=True)
    sd = FlowAdam([x], mode="E").state_dict()
    del sd["flowadam"]["noise"]
    FlowAdam([x], mode="E").load_state_dict(sd)


# ------------------------------------------------------------------------- pure functions


def test_gradient_departure_is_the_norms_of_g_and_g_minus_m():
    gen = torch.Generator().manual_seed(2)
    gs = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)]
    ms = [torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)]
    parts = departure_parts(gs, ms)
    assert isinstance(parts, np.ndarray) and parts.dtype == np.float64 and parts.shape == (6,)  # CPU: on the host
    flat_g = torch.cat([g.reshape(-1) for g in gs])
    flat_m = torch.cat([m.reshape(-1) for m in ms])
    expected = np.array([float(flat_g.norm()), float((flat_g - flat_m).norm())])
    np.testing.assert_allclose(gradient_departure(parts), expected, rtol=1e-12)
    np.testing.assert_allclose(gradient_departure(torch.from_numpy(parts)).numpy(), expected, rtol=1e-12)
    same = gradient_departure(departure_parts(gs, gs))
    assert same[1] == pytest.approx(0.0, abs=1e-6)  # clamped at 0, never NaN
    mixed = departure_parts([gs[0].float(), gs[1]], [ms[0].float(), ms[1]])  # parameters of two dtypes
    np.testing.assert_allclose(gradient_departure(mixed), expected, rtol=1e-6)


def test_the_rule_on_host_arrays_and_on_tensors_gives_the_same_codes():
    """The CPU computes the rule in numpy, an accelerator in float64 tensors: one code, two kinds."""
    gen = torch.Generator().manual_seed(8)
    spikes = torch.where(torch.arange(400) % 97 == 0, 4.0, 1.0)[:, None].to(F64)
    xs = (torch.rand(400, 2, generator=gen, dtype=F64) + 0.5) * spikes
    host, dev = NoiseAwareStats(), NoiseAwareStats()
    codes = []
    for x in xs:
        a = int(host.code(x.numpy(), 0.8, 1.5, 2.0, 0.98))
        b = int(dev.code(x, 0.8, 1.5, 2.0, 0.98))
        host.update(x.numpy(), 0.9, 0.98)
        dev.update(x, 0.9, 0.98)
        codes.append(a)
        assert a == b
    assert set(codes) >= {0, 2}  # the spikes fire the stiff bit
    np.testing.assert_allclose(host.mean, dev.mean.numpy(), rtol=1e-12)
    restored = NoiseAwareStats()
    restored.load(host.state())  # CPU tensors in the state dict, numpy again at the next use
    assert int(restored.code(xs[0].numpy(), 0.8, 1.5, 2.0, 0.98)) == int(host.code(xs[0].numpy(), 0.8, 1.5, 2.0, 0.98))


def test_noise_aware_code_hand_computed():
    stats = NoiseAwareStats()
    beta, beta_var = 0.9, variance_beta(0.9)
    assert beta_var == pytest.approx(0.98)
    for x in ([1.0, 1.0], [1.2, 0.8]):
        stats.update(torch.tensor(x, dtype=F64), beta, beta_var)
    # mean = (1.02, 0.98); one residual (0.2, -0.2): sd = 0.2 after the bias correction
    assert torch.allclose(stats.mean, torch.tensor([1.02, 0.98], dtype=F64))
    sd = float((stats.sq[0] / (1 - beta_var)).sqrt())
    assert sd == pytest.approx(0.2)
    code = lambda n, c, z: int(stats.code(torch.tensor([n, c], dtype=F64), 0.5, 2.0, z, beta_var))  # noqa: E731
    assert code(0.5 * 1.02 - 0.2 * 3 - 1e-9, 0.0, 3.0) == 1  # plateau: n < 0.5 mu_n - 3 sd
    assert code(0.5 * 1.02 - 0.2 * 3 + 1e-9, 0.0, 3.0) == 0
    assert code(1.0, 2 * 0.98 + 0.2 * 3 + 1e-9, 3.0) == 2  # stiff: c > 2 mu_c + 3 sd
    assert code(0.4, 2.0, 0.0) == 3  # both, with no margin
    assert int(stats.code(torch.tensor([0.0, 1e9], dtype=F64), 0.0, math.inf, 0.0, beta_var)) == 0  # disabled


def test_mailbox_holds_one_code_until_taken():
    box = TriggerMailbox()
    assert box.take() == 0
    box.post(torch.tensor(3, dtype=torch.int32))
    assert box.peek() == 3 and box.take() == 3 and box.take() == 0
    box.put(2)
    assert box.take() == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_steps_never_read_a_device_tensor(monkeypatch):
    x = torch.zeros(1000, device="cuda", requires_grad=True)
    opt = FlowAdam([x], lr=0.01, mode="E", warmup_steps=0, switch_sensitivity=0.99)
    reads = []
    original = torch.Tensor.item

    def item(self):
        if self.device.type == "cuda":
            reads.append(1)
        return original(self)

    def closure():
        opt.zero_grad()
        loss = ((x - 1) ** 2).sum()
        loss.backward()
        return loss

    monkeypatch.setattr(torch.Tensor, "item", item)
    for _ in range(30):
        opt.step(closure)
    assert not reads


# ----------------------------------------------------------------------- who uses which preset


def test_make_optimizer_and_train_build_e_while_the_class_and_reproduce_keep_b():
    from recsys_flowadam.reproduce.protocols import FLOWADAM_B
    from recsys_flowadam.train.config import FlowAdamOptions, split_settings
    from recsys_flowadam.train.optimizers import build_optimizer

    x = torch.zeros(2, requires_grad=True)
    e = make_optimizer("flowadam", [x], lr=0.01)
    assert (e.defaults["mode"], e.defaults["trigger"], e.defaults["ode_method"], e.defaults["warmup_steps"]) == (
        "E", "noise", "euler", 20)
    b = FlowAdam([x])
    assert (b.defaults["mode"], b.defaults["trigger"], b.defaults["ode_method"], b.defaults["warmup_steps"]) == (
        "B", "ema", "dopri5", 10)
    assert make_optimizer("flowadam", [x], lr=0.01, **FLOWADAM_B).defaults["ode_method"] == "dopri5"
    assert FLOWADAM_B == {"mode": "B", "ode_method": "dopri5"}
    config, _ = split_settings({"dataset": "synthetic"})
    assert build_optimizer(config.optimizer, [x], config.lr, **config.optimizer_kwargs).defaults["mode"] == "E"
    config, _ = split_settings({"dataset": "synthetic", "preset": "B"})
    opt = build_optimizer(config.optimizer, [x], config.lr, **config.optimizer_kwargs)
    assert (opt.defaults["mode"], opt.defaults["ode_method"]) == ("B", "dopri5")
    assert FlowAdamOptions().preset == "E" and FlowAdamOptions(preset="e").preset == "e"


def test_options_are_validated():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="trigger"):
        FlowAdam([x], trigger="median")
    with pytest.raises(ValueError, match="noise_z"):
        FlowAdam([x], noise_z=-1.0)
    with pytest.raises(ValueError, match="trigger"):
        FlowAdam([{"params": [x]}, {"params": [torch.zeros(1, requires_grad=True)], "trigger": "ema"}], mode="E")


def test_departure_parts_compiled_pass_matches_the_dot_products(monkeypatch):
    """From FUSED_STATS_MIN_ELEMENTS parameters the three sums come from one numba pass (float64
    sums); they agree with BLAS dot products to float32 rounding, and without numba the dots serve."""
    import numpy as np

    from recsys_flowadam.optim import everyday, fused_stats

    if fused_stats.three_sums_kernel() is None:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 7, generator=gen), torch.randn(11, generator=gen, dtype=torch.float64)]
    moms = [torch.randn(300, 7, generator=gen), torch.randn(11, generator=gen, dtype=torch.float64)]
    dots = everyday.departure_parts(grads, moms)  # small: the dot products
    monkeypatch.setattr(everyday, "FUSED_STATS_MIN_ELEMENTS", 1)
    fused = everyday.departure_parts(grads, moms)
    want = np.array([float((g.double() * g.double()).sum()) for g in grads]
                    + [float((m.double() * m.double()).sum()) for m in moms]
                    + [float((g.double() * m.double()).sum()) for g, m in zip(grads, moms)])
    np.testing.assert_allclose(fused, want, rtol=1e-12)
    np.testing.assert_allclose(dots, want, rtol=1e-5)
    monkeypatch.setattr(fused_stats, "_KERNEL", False)  # as without numba
    np.testing.assert_allclose(everyday.departure_parts(grads, moms), dots, rtol=0)
