"""The optimizer registry and closure counting."""

from __future__ import annotations

import pytest
import torch

from recsys_flowadam.optim import FlowAdam, OPTIMIZERS, count_closure, make_optimizer, optimizer_names

LRS = {"flowadam": 0.05, "adam": 0.05, "adamw": 0.05, "sgd": 0.01, "lbfgs": 0.5, "lion": 0.01, "adabelief": 0.05}


def _problem():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=gen)
    b = torch.randn(40, generator=gen)
    return a, b


def test_names():
    assert optimizer_names() == ["flowadam", "adam", "adamw", "lazy-adam", "sgd", "lbfgs", "lion", "adabelief"]
    assert set(OPTIMIZERS) == set(optimizer_names())


@pytest.mark.parametrize("name", list(LRS))
def test_every_optimizer_builds_steps_and_counts_gradient_evaluations(name):
    a, b = _problem()
    x = torch.zeros(8, requires_grad=True)
    opt = make_optimizer(name, [x], lr=LRS[name])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == LRS[name]

    def closure():
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).mean()
        loss.backward()
        return loss

    counted = count_closure(closure)
    first = float(closure().detach())
    for _ in range(30):
        opt.step(counted)
    final = float(closure().detach())
    assert final < 0.9 * first
    if name == "lbfgs":
        assert counted.calls > 30  # line-search evaluations are counted too
    elif name == "flowadam":
        assert counted.calls == opt.diagnostics()["grad_evals"] >= 30
    else:
        assert counted.calls == 30


def test_defaults_and_kwargs_are_passed_through():
    x = torch.zeros(2, requires_grad=True)
    assert make_optimizer("sgd", [x], lr=0.1).param_groups[0]["momentum"] == 0.9
    assert make_optimizer("sgd", [x], lr=0.1, momentum=0.0).param_groups[0]["momentum"] == 0.0
    fa = make_optimizer("FlowAdam", [x], lr=0.1, mode="A", ode_method="rk4")
    assert isinstance(fa, FlowAdam) and fa.defaults["ode_method"] == "rk4" and fa.defaults["switch_sensitivity"] == 0.4


def test_unknown_name_lists_the_valid_names():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as err:
        make_optimizer("adagrad", [x], lr=0.1)
    for name in optimizer_names():
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["adam", "lion", "adabelief", "flowadam"])
def test_unknown_kwargs_are_named(name):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="momentun"):
        make_optimizer(name, [x], lr=0.1, momentun=0.9)
