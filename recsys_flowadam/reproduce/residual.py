"""MovieLens residualised protocol: biases first (mu + b_u + b_i), then a factor model on the residuals.

Stage 1 uses the product trainer (``train_model``) with ``biased-mf`` of rank 1 and factors
initialised to exactly 0: their gradients (G V and G^T U) are then exactly 0 for ever, so
Adam never moves them and the model *is* mu + b_u + b_i, with the trainer's early stopping
on validation. Stage 2 is an ordinary experiment task whose targets are the residuals.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recsys_flowadam.models import Coords, ModelSpec, coords_from_ratings
from recsys_flowadam.reproduce.compare import Scenario
from recsys_flowadam.reproduce.tasks import Task, rmse

BIAS_LR = 0.01
BIAS_REG = 1e-5


def fit_biases(split, seed: int, device: torch.device, progress: bool = False, max_steps: int = 3000):
    """Stage 1: mu + b_u + b_i by Adam with early stopping; returns a function coords -> bias prediction."""
    from recsys_flowadam.train import TrainConfig, train_model

    # every setting that shapes the run is pinned, so later changes of train's defaults leave it alone
    cfg = TrainConfig(model="biased-mf", rank=1, init_std=0.0, reg=BIAS_REG, bias_reg=BIAS_REG, reg_weighting="uniform",
                      optimizer="adam", lr=BIAS_LR, steps=max_steps, eval_every=10, patience=10, seed=seed,
                      device=str(device), center=True, refit=False, tune=False)
    res = train_model(split.train, split.val, cfg, progress=progress)
    bu, bi, mu = res.params["user_bias"], res.params["item_bias"], res.objective.offset

    def baseline(c: Coords) -> torch.Tensor:
        return mu + bu[c.users] + bi[c.items]

    return baseline, {"bias_steps": res.steps, "bias_best_step": res.best_step, "bias_val_rmse": res.best_val_rmse}


def _scorer(coords: Coords, base: torch.Tensor, key: str, scale, residual_key: str | None):
    resid_target = coords.values - base

    def score(params):
        with torch.no_grad():
            U, V = params["user_factors"].detach(), params["item_factors"].detach()
            r = (U[coords.users] * V[coords.items]).sum(dim=1)
            final = (base + r).clamp(scale.min, scale.max)
            out = {key: rmse(final - coords.values)}
            if residual_key:
                out[residual_key] = rmse(r - resid_target)
        return out

    return score


def residual_scenario(name: str, data_dir: str | Path | None, device: torch.device, *, rank: int = 20,
                      progress: bool = False, bias_steps: int = 3000) -> Scenario:
    """The scenario whose task for a seed is: split, fit biases, factor model on the residuals."""
    from recsys_flowadam.data import load_dataset, split_ratings

    ratings = load_dataset(name, data_dir, offline=True)

    def build(seed: int, with_val: bool) -> Task:
        split = split_ratings(ratings, "random:0.7,0.1,0.2", seed)
        baseline, info = fit_biases(split, seed, device, progress, bias_steps)
        tr, va, te = (coords_from_ratings(p, device=device) for p in (split.train, split.val, split.test))
        with torch.no_grad():
            b_tr, b_va, b_te = baseline(tr), baseline(va), baseline(te)
        resid = Coords(tr.users, tr.items, (tr.values - b_tr).to(tr.values.dtype))
        spec = ModelSpec("mf", ratings.n_users, ratings.n_items, rank)
        info.update({"n_train": len(tr), "n_val": len(va), "n_test": len(te), "seed": seed})
        return Task(name, spec, resid, _scorer(te, b_te, "test", ratings.scale, "residual"),
                    _scorer(va, b_va, "val", ratings.scale, None), info=info)

    label = f"{name}: {ratings.n_users} users x {ratings.n_items} items, {len(ratings)} ratings (residualised)"
    return Scenario(name, label, build, metric="test RMSE")
