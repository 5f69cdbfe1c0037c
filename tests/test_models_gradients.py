"""Every fast loss/gradient path equals the autograd reference (float64, 1e-5 relative)."""

from __future__ import annotations

import pytest
import torch

from recsys_flowadam.models import (
    AutogradPath,
    Coords,
    DensePath,
    DuplicateRatingsError,
    ModelSpec,
    Objective,
    SparsePath,
    choose_representation,
    estimate_bytes,
    init_params,
    predict,
)

CASES = [
    ("mf", None, "mse"), ("mf", None, "huber"), ("biased-mf", None, "mse"), ("biased-mf", None, "huber"),
    ("cp", False, "mse"), ("cp", True, "huber"),
]


def _problem(model: str, biases, n_users=37, n_items=23, n_contexts=5, rank=4, n=350, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nc = n_contexts if model == "cp" else 0
    spec = ModelSpec(model, n_users, n_items, rank, nc, biases=biases)
    cells = n_users * n_items * max(nc, 1)
    lin = torch.randperm(cells, generator=gen)[:n]  # distinct cells
    if nc:
        users, items, ctx = lin // (n_items * nc), (lin // nc) % n_items, lin % nc
    else:
        users, items, ctx = lin // n_items, lin % n_items, None
    values = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    params = init_params(spec, init_std=0.7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return spec, Coords(users, items, values, ctx), params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("path_cls", [DensePath, SparsePath])
@pytest.mark.parametrize("model,biases,loss", CASES)
def test_fast_paths_match_autograd(path_cls, model, biases, loss):
    spec, coords, params = _problem(model, biases)
    obj = Objective(reg=0.013, bias_reg=0.004, loss=loss, huber_delta=0.8, offset=0.37)
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params)
    got_loss, got_grads = path_cls(spec, coords, obj).loss_and_grad(params)
    assert set(got_grads) == set(params) == set(ref_grads)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in params:
        assert got_grads[name].shape == params[name].shape
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("path_cls", [DensePath, SparsePath])
@pytest.mark.parametrize("model,biases", [("biased-mf", None), ("cp", True)])
def test_frequency_weighted_penalty_matches_autograd(path_cls, model, biases):
    spec, coords, params = _problem(model, biases)
    n = len(coords)
    weights = {"user": torch.bincount(coords.users, minlength=spec.n_users).double() / n,
               "item": torch.bincount(coords.items, minlength=spec.n_items).double() / n}
    if model == "cp":
        weights["context"] = torch.bincount(coords.contexts, minlength=spec.n_contexts).double() / n
    obj = Objective(reg=0.2, bias_reg=0.05, offset=0.1, weights=weights)
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params)
    got_loss, got_grads = path_cls(spec, coords, obj).loss_and_grad(params)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in params:
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name
    # and the weighting really changes the objective
    assert float(ref_loss) != pytest.approx(float(AutogradPath(coords, Objective(reg=0.2, bias_reg=0.05, offset=0.1))
                                                  .loss_and_grad(params)[0]))


def test_huber_differs_from_mse_only_beyond_delta():
    obj_m, obj_h = Objective(loss="mse"), Objective(loss="huber", huber_delta=1.0)
    r = torch.tensor([-3.0, -0.5, 0.0, 0.9, 2.0], dtype=torch.float64)
    assert torch.equal(obj_h.rho(r)[1:4], obj_m.rho(r)[1:4])
    assert torch.allclose(obj_h.rho(r)[[0, 4]], torch.tensor([5.0, 3.0], dtype=torch.float64))
    assert torch.allclose(obj_h.psi(r), torch.tensor([-2.0, -1.0, 0.0, 1.8, 2.0], dtype=torch.float64))


def test_loss_is_mean_plus_penalty_by_hand():
    spec = ModelSpec("mf", 2, 2, 1)
    params = {"user_factors": torch.tensor([[1.0], [2.0]], dtype=torch.float64),
              "item_factors": torch.tensor([[3.0], [-1.0]], dtype=torch.float64)}
    coords = Coords(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2.0, 0.0], dtype=torch.float64))
    obj = Objective(reg=0.5)
    # residuals: 1*3-2 = 1, 2*(-1)-0 = -2 -> mean sq 2.5; penalty 0.5*(1+4+9+1) = 7.5
    loss, _ = DensePath(spec, coords, obj).loss_and_grad(params)
    assert float(loss) == pytest.approx(10.0)


def test_dense_rejects_duplicate_cells_and_sparse_accepts_them():
    spec = ModelSpec("mf", 3, 3, 2)
    coords = Coords(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    obj = Objective()
    with pytest.raises(DuplicateRatingsError, match="sparse"):
        DensePath(spec, coords, obj)
    params = init_params(spec, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    loss, _ = SparsePath(spec, coords, obj).loss_and_grad(params)
    ref, _ = AutogradPath(coords, obj).loss_and_grad(params)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert choose_representation(spec, 3, torch.device("cpu"), budget_bytes=1 << 30, duplicates=True) == "sparse"


def test_representation_follows_memory_budget_and_density():
    spec = ModelSpec("mf", 10_000, 500, 16)
    cpu = torch.device("cpu")
    n = 1_100_000  # 22% observed: dense is the faster path (and needs more memory than CSR)
    dense, sparse = estimate_bytes("dense", spec, n), estimate_bytes("sparse", spec, n)
    assert choose_representation(spec, n, cpu, budget_bytes=dense) == "dense"
    assert choose_representation(spec, n, cpu, budget_bytes=dense - 1) == "sparse"
    assert choose_representation(spec, n, cpu, budget_bytes=sparse - 1) == "minibatch"
    n = 200_000  # 4% observed (like ML-100K): CSR is faster on the CPU even though the grid fits
    assert choose_representation(spec, n, cpu, budget_bytes=1 << 40) == "sparse"
    assert choose_representation(spec, n, cpu, budget_bytes=estimate_bytes("sparse", spec, n) - 1) == "minibatch"


def test_cp_prediction_without_context_is_mean_over_contexts():
    spec, coords, params = _problem("cp", False)
    u, i = torch.tensor([3, 5]), torch.tensor([1, 7])
    per_ctx = torch.stack([predict(params, u, i, torch.full((2,), c), offset=1.0) for c in range(spec.n_contexts)])
    assert torch.allclose(predict(params, u, i, None, offset=1.0), per_ctx.mean(dim=0))


def test_model_spec_rejects_bad_combinations():
    with pytest.raises(ValueError, match="unknown model"):
        ModelSpec("svd", 2, 2, 1)
    with pytest.raises(ValueError, match="third mode"):
        ModelSpec("cp", 2, 2, 1, 0)
    with pytest.raises(ValueError, match="rank"):
        ModelSpec("mf", 2, 2, 0)
    assert set(ModelSpec("biased-mf", 2, 3, 4).shapes()) == {"user_factors", "item_factors", "user_bias", "item_bias"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path_cls", [DensePath, SparsePath])
@pytest.mark.parametrize("model,biases,loss", CASES)
def test_fast_paths_match_autograd_on_cuda(path_cls, model, biases, loss):
    spec, coords, params = _problem(model, biases)
    dev = torch.device("cuda")
    coords = Coords(coords.users.to(dev), coords.items.to(dev), coords.values.to(dev),
                    None if coords.contexts is None else coords.contexts.to(dev))
    params = {k: v.detach().to(dev).requires_grad_(True) for k, v in params.items()}
    obj = Objective(reg=0.013, bias_reg=0.004, loss=loss, huber_delta=0.8, offset=0.37)
    ref_loss, ref_grads = AutogradPath(coords, obj).loss_and_grad(params)
    got_loss, got_grads = path_cls(spec, coords, obj).loss_and_grad(params)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in params:
        assert got_grads[name].device.type == "cuda"
        assert _rel(got_grads[name], ref_grads[name]) <= 1e-5, name
