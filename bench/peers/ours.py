"""Ours (``recsys_flowadam.Recommender``, the Python path of ``train``) on the bench's train/test files.

Not a peer: the runner that puts ours under the same protocol as the peers (a process of its own,
the same files, the same scoring, one JSON line). It runs in the project's environment.

The modules ``fit`` would import lazily (torch, the trainer, numba with the compiled kernels' modules,
and ``torch._dynamo``, which every ``torch.optim`` optimizer imports when it is built: 1.5 s on an idle
machine, up to 8 s under load) are imported before the clock starts, as the peers' libraries are, and
so is numba's own start-up, which any numba program pays at its first compiled call (its CPU target's
lowering registries, whose import pulls in scipy.linalg: 0.3-0.5 s); loading our kernels' compiled code
from numba's cache stays in fit. The time is measured and reported (``import_seconds``), and the
process's wall time counts it.

Timed like the peers: "prep" turns the DataFrames into ``Ratings`` (indexing the raw IDs and checking
for duplicated pairs: what ``Recommender.fit`` does first with DataFrames; the peers' Dataset
construction is their prep), and "fit" is ``Recommender.fit`` on those ``Ratings``: everything
``train`` does after loading the data (the path choice, training, validation, the artifact).

Settings: ``train``'s defaults (no tuning flags: what a user runs), plus ``--optimizer`` when given;
nothing is tuned here. Like ``train``, ours early-stops on a validation part: a seeded 1/8 of the training file
(the share ``train``'s splits hold out). Held-out ratings of users or items absent from the other 7/8 are
left out of the validation part (a handful). Ours then fits what ``train`` would: on the automatic
mini-batch path (from 3M ratings) all but 100k of the validation ratings join the one training run
(``pipeline.fold_validation``: 99% of the peers' ratings at 10M); below, an early-stopped run on 7/8
and a refit on all of it.

``--trace``: the measurement run for "time to reach a target RMSE". The same training ratings and
seed, but the *test* file is given as the validation part, so the history's held-out RMSE at each
evaluation is the test RMSE along the run's trajectory. Its early stopping then looks at test data,
so its final numbers are never reported as ours' RMSE; only its history is used. On the automatic
mini-batch path ``train`` validates on a fixed sample of the held-out ratings; the trace scores all
of the test file instead (the training trajectory is the same; the bench checks the losses).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

import json
import sys
import time

from peer_io import SCALE, Stopwatch, arg_parser, emit, read_ratings, rmse

VAL_SHARE = 0.125  # as train's u1..u5 and kfold splits carve validation out of a fixed train part


def carve_validation(train, seed: int):
    """``(fit_part, val_part)``: a seeded random 1/8 of the training rows held out for early stopping."""
    perm = np.random.default_rng(seed).permutation(len(train))
    n_val = int(round(VAL_SHARE * len(train)))
    return train.iloc[np.sort(perm[n_val:])], train.iloc[np.sort(perm[:n_val])]


def warm_only(held_out, fit_part):
    """``held_out`` without ratings of users or items absent from ``fit_part``.

    Ours indexes the IDs of the training and validation frames together, so a cold ID there would
    change the index and with it the initial factors; with warm held-out parts the main run and the
    trace run share one index and train identically (the bench checks the training losses)."""
    warm = held_out["user"].isin(fit_part["user"].unique()) & held_out["item"].isin(fit_part["item"].unique())
    return held_out[warm.to_numpy()]


def as_main_run_fits(fit_part, val_part, settings: dict):
    """The ratings the main run (``settings``) trains on: ``fit_part`` plus, where ``train`` folds most
    of a large validation part into its one run (``pipeline.fold_validation``), the same rows of
    ``val_part``, in the same order; so the trace run follows the main run's trajectory."""
    from recsys_flowadam.train.config import training_config
    from recsys_flowadam.train.pipeline import validation_fold

    rows = validation_fold(len(fit_part), len(val_part), training_config(settings))
    return fit_part if rows is None else pd.concat([fit_part, val_part.iloc[rows[1]]], ignore_index=True)


def given(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as settings (VALUE parsed as JSON when it is, else kept as text)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run_summary(rec, fit_seconds: float) -> dict:
    """What the fitted Recommender reports about its run."""
    meta = rec.artifact_.meta
    return {"optimizer": rec.config_.optimizer, "fit_seconds": fit_seconds, "loop_seconds": rec.train_seconds_,
            "steps": meta.metrics.get("steps"), "best_step": meta.metrics.get("best_step"),
            "stopped": meta.metrics.get("stopped"), "grad_evals": rec.grad_evals_,
            "representation": meta.train_config.get("representation_used"),
            "device": meta.train_config.get("device_used"), "best_val_rmse": rec.best_val_rmse_,
            "ode_triggers": meta.optimizer.diagnostics.get("ode_triggers"),
            "optimizer_params": meta.optimizer.params,
            "path_choice": (meta.train_config.get("path_choice") or {}).get("reason"),
            "reg": meta.train_config.get("reg"), "lr": meta.train_config.get("lr")}


def warm_up() -> dict:
    """Build numba's on-disk cache of the compiled kernels that a large fit runs, from a small
    generated problem sent down the same automatic mini-batch path (its thresholds lowered in this
    process only), with the default optimizer and Adam; the result names the seconds it took.

    Why: the kernels are compiled once per installation (about 6 s on this machine), and a cold
    cache would put that into the first timed fit, where a peer's Cython was compiled when it was
    installed. ``bench_scale.py`` runs this once before the contenders and prints its time."""
    from recsys_flowadam import Recommender
    from recsys_flowadam.models import path_choice
    from recsys_flowadam.optim import fused_adam

    t0 = time.perf_counter()
    n_users, n_items, rank = 21_000, 1_500, 50  # (rank 50 x 22.5k rows: past fused_adam.MIN_ELEMENTS)
    assert (n_users + n_items) * rank >= fused_adam.MIN_ELEMENTS
    rng = np.random.default_rng(0)
    pairs = np.unique(rng.integers(0, n_users, 200_000) * n_items + rng.integers(0, n_items, 200_000))
    frame = pd.DataFrame({"user": pairs // n_items, "item": pairs % n_items,
                          "rating": rng.integers(1, 11, len(pairs)).astype(np.float32) / 2})
    path_choice.MINIBATCH_MIN_RATINGS, path_choice.EVAL_SAMPLE = 50_000, 5_000
    path_choice.MIN_AUTO_BATCH = 20_000  # (two kernel halves from fused_cpu.PARALLEL_MIN_RATINGS)
    for optimizer in (None, "adam"):
        rec = Recommender(steps=12, **({"optimizer": optimizer} if optimizer else {}))
        rec.fit(frame.iloc[40_000:], frame.iloc[:40_000], scale=SCALE)
        assert rec.config_ is not None and rec.artifact_.meta.train_config["representation_used"] == "minibatch"
        rec.predict(frame["user"].to_numpy()[:1000], frame["item"].to_numpy()[:1000])
    return {"name": "ours (warm-up)", "warm_up_seconds": time.perf_counter() - t0}


def main() -> None:
    if sys.argv[1:] == ["--warm-up"]:
        emit(warm_up())
        return
    ap = arg_parser(__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default=None, help="unset: train's default optimizer")
    ap.add_argument("--trace", action="store_true", help="test file as the validation part; report the history")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training setting (value read as JSON, else a string): NOT train's defaults any more")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: an import, not training)

    import recsys_flowadam
    import recsys_flowadam.serve.scorer  # noqa: F401
    import recsys_flowadam.train.pipeline  # noqa: F401  (fit imports these lazily)
    from recsys_flowadam import kernel_pool
    from recsys_flowadam.models import fused_cpu, row_sparse

    fused_cpu.available(), row_sparse._kernels()  # numba and the kernels' modules (compiled code loads in fit)
    from recsys_flowadam.optim import fused_adam

    if fused_adam.kernels() is not None:  # numba's own start-up (see the module doc): its registries, not our code
        from numba.core.registry import cpu_target

        cpu_target.typing_context.refresh()
        cpu_target.target_context.refresh()
    from recsys_flowadam import Recommender
    from recsys_flowadam.recommender import _as_ratings  # what fit does first with DataFrames

    import_seconds = time.perf_counter() - t0

    if args.threads:
        torch.set_num_threads(args.threads)
        kernel_pool.KERNEL_THREADS = min(2, args.threads)  # the compiled kernels' threads too
    train, test = read_ratings(args.train), read_ratings(args.test)
    fit_part, val_part = carve_validation(train, args.seed)
    settings = {"seed": args.seed} | ({"optimizer": args.optimizer} if args.optimizer else {}) | given(args.set)
    if args.trace:  # score the whole test file at every evaluation, not train's fixed sample of it
        from recsys_flowadam.models import path_choice

        fit_part = as_main_run_fits(fit_part, warm_only(val_part, fit_part), settings)
        path_choice.EVAL_SAMPLE = 1 << 62  # (and so nothing of the test file is folded into training)
    # the trace needs the first run's trajectory only: no refit (on the test file) after it
    rec = Recommender(**settings, **({"refit": False} if args.trace else {}))
    held_out = warm_only(test if args.trace else val_part, fit_part)
    with Stopwatch() as prep:
        fit_ratings, held_ratings, _ = _as_ratings(fit_part, held_out, SCALE, "error")
    with Stopwatch() as fit:
        rec.fit(fit_ratings, held_ratings)
    label = (args.optimizer or "default") + "".join(f", {p}" for p in args.set)
    out = {"name": f"ours ({label})", "version": recsys_flowadam.__version__,
           "settings": settings, "threads": torch.get_num_threads(), "n_fit": len(fit_part),
           "prep_seconds": prep.seconds, "import_seconds": import_seconds,
           "n_held_out": len(held_out), "n_cold_dropped": len(test if args.trace else val_part) - len(held_out),
           **run_summary(rec, fit.seconds)}
    held_out = "test_rmse" if args.trace else "val_rmse"
    out["history"] = [{"step": h["step"], "seconds": h["seconds"], "train_loss": h["train_loss"],
                       held_out: h.get("val_rmse"), **({"phase": h["phase"]} if "phase" in h else {})}
                      for h in rec.history_]
    if not args.trace:
        with Stopwatch() as pred:
            scores = rec.predict(test["user"].to_numpy(), test["item"].to_numpy())
        out.update(test_rmse=rmse(scores, test["rating"].to_numpy()), predict_seconds=pred.seconds)
    emit(out)


if __name__ == "__main__":
    main()
