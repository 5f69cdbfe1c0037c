"""The reproduce package: protocols really differ, tuning/compute matching/statistics do what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_flowadam.reproduce import (
    Contender,
    RunSpec,
    Scenario,
    compare,
    fair_tuned,
    make_robust_matrix,
    paper_fixed,
    robust_task,
    run_one,
    synthetic_task,
    wilcoxon_vs,
)
from recsys_flowadam.reproduce.tasks import full_prediction

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, with_val: bool = False, **kw):
    args = dict(shape=(20, 30), rank=3, density=0.4, noise=0.1, extra_rank=2)
    args.update(kw)
    return synthetic_task("tiny", args["shape"], args["rank"], args["density"], args["noise"], args["extra_rank"], seed,
                          with_val=with_val, device=CPU, dtype=torch.float64)


def test_paper_adam_coupled_decay_is_half_the_explicit_l2_of_flowadam():
    # torch's coupled weight_decay=lam adds lam*theta to the gradient: the same as minimising
    # loss + (lam/2)||theta||^2, i.e. half of FlowAdam's explicit lam*||theta||^2 in the paper protocol.
    lam = 0.05
    task = tiny()
    contenders = {c.label: c for c in paper_fixed(lam)}
    adam = contenders["Adam"]
    assert adam.reg == 0.0 and adam.kwargs["weight_decay"] == lam
    assert contenders["FlowAdam"].reg == lam and "weight_decay" not in contenders["FlowAdam"].kwargs
    paper = run_one(task, RunSpec("adam", 0.01, adam.reg, adam.kwargs, steps=60), 0)
    half = run_one(task, RunSpec("adam", 0.01, lam / 2, {}, steps=60), 0)
    full = run_one(task, RunSpec("adam", 0.01, lam, {}, steps=60), 0)
    assert paper.scores["test"] == pytest.approx(half.scores["test"], rel=1e-9)
    assert abs(paper.scores["test"] - full.scores["test"]) > 1e-6


def test_fair_protocol_gives_every_optimizer_the_identical_objective():
    lam = 1e-3
    cont = fair_tuned(lam, lbfgs_evals=50)
    assert {c.reg for c in cont} == {lam}
    assert all("weight_decay" not in c.kwargs for c in cont)
    tuned = [c for c in cont if c.match is None and c.max_grad_evals is None]
    assert len({len(c.grid) for c in tuned}) == 1 and len(tuned[0].grid) > 1
    assert {c.label for c in cont if c.match} == {"Adam (compute-matched)", "Lion (compute-matched)"}
    custom = {c.label: c for c in fair_tuned(lam, grid=(1e-4, 1e-3))}
    assert custom["Adam"].lr_grid == custom["FlowAdam"].lr_grid == (1e-4, 1e-3)
    assert custom["Lion"].lr_grid == pytest.approx((1e-5, 1e-4))


def test_synthetic_test_error_is_rmse_over_unobserved_cells_against_truth():
    from recsys_flowadam.data import make_low_rank_matrix

    task = tiny(seed=3)
    prob = make_low_rank_matrix(20, 30, 3, 0.4, 0.1, 3)
    gen = torch.Generator().manual_seed(1)
    params = {"user_factors": torch.randn(20, 5, generator=gen, dtype=torch.float64),
              "item_factors": torch.randn(30, 5, generator=gen, dtype=torch.float64)}
    pred = params["user_factors"].numpy() @ params["item_factors"].numpy().T
    expected = np.sqrt(np.mean((pred - prob.truth)[~prob.mask] ** 2))
    assert task.score_test(params)["test"] == pytest.approx(expected, rel=1e-10)
    assert task.info["n_test"] == int((~prob.mask).sum())


def test_fair_validation_holdout_is_seeded_and_disjoint_from_training():
    a, b = tiny(seed=5, with_val=True), tiny(seed=5, with_val=True)
    full = tiny(seed=5)
    assert len(a.train) + round(0.1 * len(full.train)) == len(full.train)
    assert torch.equal(a.train.users, b.train.users) and torch.equal(a.train.items, b.train.items)
    assert a.score_val is not None
    # validation RMSE of the zero model is the RMS of the held-out observed values, none of which is trained on
    zero = {"user_factors": torch.zeros(20, 5, dtype=torch.float64),
            "item_factors": torch.zeros(30, 5, dtype=torch.float64)}
    train_cells = set(zip(a.train.users.tolist(), a.train.items.tolist()))
    full_cells = dict(zip(zip(full.train.users.tolist(), full.train.items.tolist()), full.train.values.tolist()))
    held = [v for cell, v in full_cells.items() if cell not in train_cells]
    assert a.score_val(zero)["val"] == pytest.approx(math.sqrt(np.mean(np.square(held))), rel=1e-6)


def test_tuning_keeps_the_lowest_validation_error_and_compute_matching_spends_flowadams_evaluations():
    scen = Scenario("tiny", "tiny", lambda seed, with_val: tiny(seed, with_val))
    cont = [Contender("Adam", "adam", 1e-4, (1e-3, 3e-2)),
            Contender("FlowAdam", "flowadam", 1e-4, (1e-2,), {"mode": "B"}),
            Contender("Adam (compute-matched)", "adam", 1e-4, (), match="FlowAdam", lr_from="Adam")]
    out = compare([scen], cont, [0, 1], steps=40, with_val=True, progress=False)
    rows = out[0]["rows"]
    tuning = rows["Adam"]["tuning"]
    best = min(tuning, key=lambda t: t["val"])
    assert [t["lr"] for t in tuning] == [1e-3, 3e-2]
    assert rows["Adam"]["runs"][0]["lr"] == best["lr"] and rows["Adam"]["runs"][1]["lr"] == best["lr"]
    assert rows["Adam"]["runs"][0]["scores"]["test"] == best["test"]
    for flow, matched in zip(rows["FlowAdam"]["runs"], rows["Adam (compute-matched)"]["runs"]):
        assert flow["grad_evals"] > flow["steps"]  # FlowAdam's ODE stages cost extra evaluations
        assert matched["grad_evals"] == flow["grad_evals"] == matched["steps"]
        assert matched["lr"] == best["lr"]
    summary = rows["FlowAdam"]["summary"]
    tests = [r["scores"]["test"] for r in rows["FlowAdam"]["runs"]]
    assert summary["mean"] == pytest.approx(np.mean(tests)) and summary["std"] == pytest.approx(np.std(tests, ddof=1))
    assert "curve" in rows["FlowAdam"]["runs"][0] and "curve" not in rows["FlowAdam"]["runs"][1]


def test_lbfgs_runs_to_its_gradient_evaluation_budget():
    task = tiny()
    res = run_one(task, RunSpec("lbfgs", 1.0, 1e-4, {"line_search_fn": "strong_wolfe"}, steps=None,
                                max_grad_evals=60), 0)
    assert 60 <= res.grad_evals <= 60 + 30 or res.curve[-1]["grad_evals"] == res.grad_evals
    assert res.scores["test"] < run_one(task, RunSpec("adam", 1e-3, 1e-4, steps=5), 0).scores["test"]


def test_a_diverging_run_is_marked_and_never_wins_tuning():
    task = tiny(with_val=True)
    res = run_one(task, RunSpec("sgd", 1e6, 0.0, {"momentum": 0.9}, steps=50), 0, eval_every=5)
    assert res.diverged and math.isnan(res.scores["test"]) and res.scores["val"] == math.inf


def test_wilcoxon_handles_too_few_seeds_and_ties():
    p, note = wilcoxon_vs([0.1], [0.2])
    assert p is None and note.startswith("n/a")
    p, note = wilcoxon_vs([0.1, 0.2], [0.1, 0.2])
    assert p is None and "identical" in note
    # six seeds all better: the exact two-sided p is 2 / 2^6
    p, _ = wilcoxon_vs([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.15, 0.27, 0.31, 0.48, 0.52, 0.7])
    assert p == pytest.approx(2 / 64)


def test_robust_matrix_has_the_requested_outliers_and_a_low_rank_part():
    m, low = make_robust_matrix(100, 120, 4, 0.2, 5.0, 0.0, seed=0)
    assert np.linalg.matrix_rank(low) == 4
    outliers = np.abs(m - low) > 0
    assert outliers.mean() == pytest.approx(0.2, abs=0.02)
    assert np.abs(m - low).max() <= 5.0
    task = robust_task("r", 30, 40, 3, 0.2, 4.0, 0.05, 3, 0, with_val=False, device=CPU)
    assert task.loss == "huber" and len(task.train) == 30 * 40
    zero = {"user_factors": torch.zeros(30, 6), "item_factors": torch.zeros(40, 6)}
    _m, low_small = make_robust_matrix(30, 40, 3, 0.2, 4.0, 0.05, seed=0)
    assert task.score_test(zero)["test"] == pytest.approx(np.sqrt(np.mean(low_small ** 2)), rel=1e-5)


def test_cp_tensor_task_predicts_the_full_tensor():
    task = synthetic_task("t", (6, 7, 8), 2, 0.3, 0.1, 1, 0, with_val=False, device=CPU)
    spec = task.spec  # rank 2 + 1 extra, 8 contexts
    assert (spec.model_type, spec.n_users, spec.n_items, spec.n_contexts, spec.rank) == ("cp", 6, 7, 8, 3)
    params = {"user_factors": torch.randn(6, 3), "item_factors": torch.randn(7, 3),
              "context_factors": torch.randn(8, 3)}
    full = full_prediction(params)
    i, j, k = 2, 3, 4
    assert full[i, j, k] == pytest.approx(float((params["user_factors"][i] * params["item_factors"][j]
                                                 * params["context_factors"][k]).sum()), rel=1e-5)
    assert math.isfinite(task.score_test(params)["test"])


@pytest.mark.cuda
def test_runs_on_cuda_like_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    cpu_task = tiny(seed=2)
    gpu_task = synthetic_task("tiny", (20, 30), 3, 0.4, 0.1, 2, 2, with_val=False, device=cuda, dtype=torch.float64)
    spec = RunSpec("flowadam", 0.01, 1e-4, {"mode": "B"}, steps=40)
    a, b = run_one(cpu_task, spec, 0), run_one(gpu_task, spec, 0)
    assert b.scores["test"] == pytest.approx(a.scores["test"], rel=1e-3)


def test_paper_jester_rows_share_their_baselines_objective():
    from recsys_flowadam.reproduce.experiments import jester_paper_contenders

    rows = {c.label: c for c in jester_paper_contenders(100, quick=False)}
    for label in ("Adam", "Lion"):
        matched = rows[f"{label} (compute-matched)"]
        assert matched.lr_from == label and matched.reg == rows[label].reg and matched.kwargs == rows[label].kwargs
    assert len(rows["AdamW"].grid) == 9 and len(rows["Adam"].grid) == 6 and len(rows["FlowAdam"].grid) == 3


def test_variant_experiments_fair_protocol_says_what_it_does():
    from recsys_flowadam.reproduce.experiments import ExperimentOptions, gamma

    result = gamma(ExperimentOptions(quick=True, steps=5, progress=False))
    paper, fair = (p["protocol"] for p in result["protocols"])
    assert "lr is tuned" not in fair["summary"] and "fixed lr 0.01, untuned" in fair["summary"]
    assert {c["l2_in_objective"] for c in fair["contenders"]} == {1e-5}
    assert all(c["grid_size"] == 1 and c["compute_matched_to"] is None for c in fair["contenders"])
    assert paper["summary"].startswith("The paper's set-up")
