"""Cross-validation in one process: the ``cv`` command's job.

The dataset is loaded once (and torch started once); each fold is then split from it with the
run's seed and trained and scored by the code ``train`` uses (``fit_and_score``, refit included,
then the test metrics), so fold ``uK`` gives exactly what ``train --split uK`` gives with the
same settings. The result is one JSON-ready dict: a row per fold, then mean and sample standard
deviation (ddof=1) of test RMSE, test MAE and seconds.

Folds may run two (``jobs``) at a time, on threads of this process: the compiled kernels and
torch's operations release the GIL, and on small data a fold's steps are short enough that one
fold leaves the second core mostly idle. Each fold's numbers are the same either way (its own
seeded generators; the kernels' split of the work does not depend on the threads); only the
times change. Measured on the 2-core machine, two at a time against one at a time: the shipped
ML-100K recipe's five folds (lazy-adam) in 3.2 s against 3.9 s (medians of six alternated runs);
``--optimizer adam`` on ML-100K's ``kfold:2`` in 15.0 s against 31.9 s; ``train``'s defaults on
ML-100K in 27 s against 31 s and on a generated 0.9M-rating problem (``kfold:5``) in 126 s
against 158 s, with the process's peak memory 743 MB against 641 MB (these two with one torch
thread per fold, an earlier version).
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch

from recsys_flowadam import kernel_pool
from recsys_flowadam.artifact import ArtifactError, check_artifact_target
from recsys_flowadam.data import load_dataset, split_ratings
from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.data.splits import CANONICAL, Split
from recsys_flowadam.train.config import DataConfig, TrainConfig
from recsys_flowadam.train.context import parse_context, time_bin_edges, with_time_contexts
from recsys_flowadam.train.pipeline import ARTIFACT_COMPANIONS, Fit, evaluate_ratings, fit_and_score, refit_restored
from recsys_flowadam.train.trainer import NonFiniteLossError, training_device

# what the summary gives mean and std of
SUMMARIZED = ("test_rmse", "test_mae", "seconds")
# the most ratings for which folds run two at a time unasked: above, a fold's steps already keep both
# cores busy (the kernels split each batch in two) and a second fold would double the memory
CONCURRENT_FOLDS_MAX_RATINGS = 2_000_000


class CrossValidationError(ValueError):
    """A fold could not be split or trained; the message names the fold."""


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def fold_dir_name(fold: str) -> str:
    """A folder name for a fold's artifact: ``kfold:5:1`` -> ``kfold-5-1``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", fold)


def check_folds_available(ratings: Ratings, folds: list[str]) -> None:
    """Refuse, before any training, canonical folds whose ``.base``/``.test`` files are absent."""
    for fold in folds:
        if fold not in CANONICAL:
            continue
        if ratings.source_dir is None:
            raise CrossValidationError(f"fold {fold}: {ratings.name} has no source folder holding {fold}.base/"
                                       f"{fold}.test (ML-100K's canonical folds); use kfold:K for other data")
        for ext in ("base", "test"):
            path = Path(ratings.source_dir) / f"{fold}.{ext}"
            if not path.is_file():
                raise CrossValidationError(f"fold {fold}: {path} not found (canonical ML-100K split file)")


def check_save_targets(save_models: Path | None, folds: list[str]) -> None:
    """Refuse, before any work, fold artifact folders that hold something else (never a user's folder)."""
    if save_models is None:
        return
    try:
        for fold in folds:
            check_artifact_target(save_models / fold_dir_name(fold), ARTIFACT_COMPANIONS)
    except ArtifactError as exc:
        raise CrossValidationError(f"--save-models: {exc}") from None


def warm_up(config: TrainConfig) -> float:
    """Pay the process's one-time start-up before the first fold, so that fold times compare: build
    the configured optimizer once on a dummy parameter (torch's optimizers import ``torch._dynamo``
    on their first construction, seconds on a small CPU; lazy-adam imports nothing). Returns the
    seconds it took."""
    import torch

    from recsys_flowadam.train.optimizers import build_optimizer

    t0 = time.perf_counter()
    try:
        build_optimizer(config.optimizer, [torch.zeros(1, requires_grad=True)], config.lr, **config.optimizer_kwargs)
    except ValueError:  # a bad setting: the first fold reports it, with its context
        pass
    return time.perf_counter() - t0


def fold_jobs(n_ratings: int, config: TrainConfig, n_folds: int, jobs: int | None = None) -> int:
    """How many folds run at a time: ``jobs`` where given (at most the folds), else two on the CPU
    for data of at most ``CONCURRENT_FOLDS_MAX_RATINGS`` ratings where the process may use two cores
    (``kernel_pool.KERNEL_THREADS``) and torch runs on at most two threads (``--threads``; its
    default is one a core: on a larger machine a fold's full-batch steps fill its cores already, and
    two folds were only measured on two cores), else one. One, too, when a memory budget is given:
    each fold keeps to it, so two at once could take twice what was asked. Raises ValueError for
    ``jobs`` < 1."""
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        return max(1, min(jobs, n_folds))
    if (n_ratings > CONCURRENT_FOLDS_MAX_RATINGS or config.memory_budget_gb is not None
            or torch.get_num_threads() > 2 or training_device(config).type != "cpu"):
        return 1
    return max(1, min(kernel_pool.KERNEL_THREADS, n_folds))


class _Dropped(Exception):
    """A fold not started because an earlier one failed (never raised past :func:`run_folds`: the
    failed fold's error is)."""


def run_folds(run: Callable[[str], dict[str, Any]], folds: list[str], jobs: int,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """``[run(fold) for fold in folds]``, ``jobs`` folds at a time on threads; ``on_row(row)`` is
    called for each row in the order of ``folds`` as soon as it and those before it are ready.

    Once a fold fails, no other fold starts; the error of the first failing fold in ``folds``
    order is raised once the folds then running have ended (a thread cannot be stopped). An
    interrupt (Ctrl-C) is raised at once: the folds running finish in the background, and the
    command ends without waiting for them. Torch keeps its thread count in every fold (so a fold
    runs as it would alone); the compiled kernels' two halves run one after the other in each
    fold (``kernel_pool.kernel_threads(1)``: the folds fill the cores instead), which changes no
    number (the kernels split their work in two whatever the setting)."""
    if jobs <= 1:
        rows = []
        for fold in folds:
            rows.append(run(fold))
            if on_row is not None:
                on_row(rows[-1])
        return rows
    failed = threading.Event()

    def guarded(fold: str) -> dict[str, Any]:
        if failed.is_set():
            raise _Dropped(fold)
        try:
            return run(fold)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="recsys-cv-fold")
    wait = True
    try:
        with kernel_pool.kernel_threads(1):
            futures = [pool.submit(guarded, fold) for fold in folds]
            rows = []
            for future in futures:
                # (folds start in this order, so a dropped fold comes after the failed one, whose
                # error is raised first)
                rows.append(future.result())
                if on_row is not None:
                    on_row(rows[-1])
            return rows
    except BaseException as exc:
        failed.set()
        wait = isinstance(exc, Exception)  # a fold's error: let the running folds end; an interrupt: go now
        raise
    finally:
        pool.shutdown(wait=wait, cancel_futures=True)


def load_ratings(data: DataConfig) -> tuple[Ratings, list[float] | None]:
    """``(ratings, context_edges)``: the dataset as ``train`` loads it; for ``--context time:N``
    the time-bin edges of the whole dataset, which every fold then shares (as ``train`` does)."""
    ratings = load_dataset(data.dataset, data.data_dir, offline=data.offline, clip=data.clip_ratings,
                           **data.data_options)
    n_bins = parse_context(data.context)
    return ratings, (time_bin_edges(ratings, n_bins) if n_bins is not None else None)


def split_fold(ratings: Ratings, fold: str, seed: int, edges: list[float] | None) -> Split:
    """The fold's train/val/test parts, as ``train --split FOLD --seed SEED`` makes them."""
    split = split_ratings(ratings, fold, seed)
    if edges is None:
        return split
    return replace(split, **{part: with_time_contexts(getattr(split, part), edges)
                             for part in ("train", "val", "test")})


def _fold_row(fold: str, split: Split, fit: Fit, test: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One fold's figures, under the names ``train --json`` uses for them."""
    result = fit.result
    return {
        "fold": fold, "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
        "val_rmse": fit.metrics.get("val_rmse"), "val_mae": fit.metrics.get("val_mae"),
        "test_rmse": test["rmse"], "test_mae": test["mae"],
        "steps": result.steps, "best_step": result.best_step, "stopped": result.stopped,
        "grad_evals": result.grad_evals, "ode_triggers": int(result.diagnostics.get("ode_triggers", 0) or 0),
        "train_seconds": round(result.train_seconds, 4), "seconds": round(seconds, 4),
        "refit": bool(result.extra.get("refit")), "refit_restored": refit_restored(result),
        "representation": result.representation,
        "path_choice": result.path_choice, "device": result.device,
        "reg": fit.config.reg, "bias_reg": fit.config.bias_reg, "reg_search": fit.reg_search,
    }


def run_fold(ratings: Ratings, fold: str, data: DataConfig, config: TrainConfig, edges: list[float] | None, *,
             save_to: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Split, train (refit as ``config`` says), score on the test part; optionally save the
    fold's artifact to ``save_to`` (as ``train --out`` would). Returns the fold's row."""
    t0 = time.perf_counter()
    split = split_fold(ratings, fold, config.seed, edges)
    fit = fit_and_score(split.train, split.val, config, progress=progress, artifact=save_to is not None)
    test = evaluate_ratings(fit.result.predictor, split.test, torch.device(fit.result.device),
                            clip=config.clip_predictions, use_contexts=config.model == "cp")
    row = _fold_row(fold, split, fit, test, time.perf_counter() - t0)
    if save_to is not None:
        _save_fold(save_to, replace(data, split=fold), fit, test, edges)
        row["artifact"] = str(save_to)
    return row


def _save_fold(out_dir: Path, data: DataConfig, fit: Fit, test: dict[str, Any], edges: list[float] | None) -> None:
    """Write the fold's artifact and metric history, with the metadata ``train`` records."""
    from recsys_flowadam.train.export import artifact_payload
    from recsys_flowadam.train.pipeline import artifact_train_config, metric_block, run_metrics, save_or_rescue

    metrics = {**fit.metrics, **metric_block("test", test), **run_metrics(fit.result)}
    tensors, meta = artifact_payload(fit.result, fit.fit_ratings, csr=fit.training_csr(),
                                     dataset_name=data.dataset, split=data.split, seed=fit.config.seed,
                                     metrics=metrics,
                                     train_config=artifact_train_config(data, fit.config, fit.result, edges,
                                                                        fit.reg_search))
    save_or_rescue(out_dir, tensors, meta, fit.result.history)


def cross_validate(data: DataConfig, config: TrainConfig, folds: list[str], *, save_models: Path | None = None,
                   progress: bool = False, on_fold: Callable[[dict[str, Any]], None] | None = None,
                   jobs: int | None = None, on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Load ``data`` once and run every fold of ``folds`` (split specs) in this process; return the
    report: settings, one row per fold, mean and std of test RMSE, test MAE and seconds (a fold's
    split, training and scoring, which overlap when folds run at once; the data load and the
    one-time warm-up are reported apart). ``jobs``: folds at a time (None: :func:`fold_jobs`
    decides; the progress bar shows only with one at a time). ``on_start(jobs)`` is called once the
    data is loaded, ``on_fold(row)`` as each fold finishes, in the order of ``folds``;
    ``save_models``: a folder for each fold's artifact."""
    t0 = time.perf_counter()
    check_save_targets(save_models, folds)
    try:
        ratings, edges = load_ratings(data)
        check_folds_available(ratings, folds)
        jobs = fold_jobs(len(ratings), config, len(folds), jobs)
    except ValueError as exc:  # DataError, a context the data cannot give, or a device that is not there
        raise CrossValidationError(str(exc)) from None
    load_seconds = time.perf_counter() - t0
    if on_start is not None:
        on_start(jobs)
    warm_up_seconds = warm_up(config)

    def run(fold: str) -> dict[str, Any]:
        save_to = save_models / fold_dir_name(fold) if save_models is not None else None
        try:
            return run_fold(ratings, fold, data, config, edges, save_to=save_to, progress=progress and jobs == 1)
        except (NonFiniteLossError, ValueError) as exc:
            raise CrossValidationError(f"fold {fold}: {exc}") from None

    rows = run_folds(run, folds, jobs, on_fold)
    summary = {key: mean_std([row[key] for row in rows]) for key in SUMMARIZED}
    return {
        "dataset": data.dataset, "model": config.model, "optimizer": config.optimizer, "seed": config.seed,
        "folds": list(folds), "n_folds": len(rows), "jobs": jobs, **summary, "per_fold": rows,
        "load_seconds": round(load_seconds, 4), "warm_up_seconds": round(warm_up_seconds, 4),
        "total_seconds": round(time.perf_counter() - t0, 4),
        "settings": {**config.to_dict(), **{k: v for k, v in asdict(data).items() if k not in ("split", "data_dir")}},
    }
