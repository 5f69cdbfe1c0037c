"""End-to-end jobs behind the CLI: load -> split -> train -> evaluate -> write the artifact,
and evaluating an artifact on a dataset's test split. Bench scripts call these too."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.train.export import artifact_payload, write_history
from recsys_flowadam.train.checkpoint import CHECKPOINT_NAME
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.context import parse_context, time_bin_edges, with_time_contexts
from recsys_flowadam.train.metrics import Predictor, evaluate_predictor
from recsys_flowadam.train.trainer import resolve_device, train_model


@dataclass
class DataSettings:
    """Which ratings to train on: dataset name, its split, loader options, context."""

    dataset: str
    split: str = "random"
    data_dir: str | None = None
    offline: bool = False
    clip_ratings: bool = False
    data_options: dict[str, Any] = field(default_factory=dict)
    context: str | None = None  # "time:N" for cp on MovieLens


def concat_ratings(a: Ratings, b: Ratings) -> Ratings:
    """Ratings of two parts of one dataset (same ID arrays) as one."""
    def cat(x, y):
        return None if x is None or y is None else np.concatenate([x, y])

    return replace(a, name=a.name, users=np.concatenate([a.users, b.users]), items=np.concatenate([a.items, b.items]),
                   values=np.concatenate([a.values, b.values]), timestamps=cat(a.timestamps, b.timestamps),
                   contexts=cat(a.contexts, b.contexts))


def default_out_dir(dataset: str, model: str, optimizer: str, root: str | Path = "models") -> Path:
    """``models/<dataset>-<model>-<optimizer>/`` with unsafe characters of the name replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_") or "dataset"
    return Path(root) / f"{safe}-{model}-{optimizer}"


def load_split(data: DataSettings, seed: int, context_edges: list[float] | None = None):
    """``(split, context_edges)``: the dataset split by ``data.split`` with ``seed``; for
    ``--context time:N`` the bin edges come from the whole dataset (or are given)."""
    from recsys_flowadam.data import load_dataset, split_ratings

    ratings = load_dataset(data.dataset, data.data_dir, offline=data.offline, clip=data.clip_ratings,
                           **data.data_options)
    split = split_ratings(ratings, data.split, seed)
    n_bins = parse_context(data.context)
    if n_bins is not None:
        edges = context_edges if context_edges is not None else time_bin_edges(ratings, n_bins)
        split = replace(split, **{part: with_time_contexts(getattr(split, part), edges)
                                  for part in ("train", "val", "test")})
        context_edges = edges
    return ratings, split, context_edges


def _metric_block(prefix: str, m: dict) -> dict[str, Any]:
    out = {f"{prefix}_rmse": m["rmse"], f"{prefix}_mae": m["mae"], f"n_{prefix}": m["n"]}
    for cold in ("cold_users", "cold_items"):
        if cold in m:
            out[f"{prefix}_{cold}"] = m[cold]
    return out


def evaluate_ratings(predictor: Predictor, ratings: Ratings, device: torch.device, *, clip: bool = True,
                     use_contexts: bool = False, breakdown: bool = True) -> dict:
    """RMSE/MAE/n (and cold breakdown) of ``predictor`` on ``ratings`` (indices shared with train)."""
    users = torch.from_numpy(ratings.users).to(device)
    items = torch.from_numpy(ratings.items).to(device)
    values = torch.from_numpy(ratings.values).to(device=device, dtype=torch.float64)
    contexts = torch.from_numpy(ratings.contexts).to(device) if use_contexts and ratings.contexts is not None else None
    return evaluate_predictor(predictor, users, items, values, contexts, clip=clip, breakdown=breakdown)


def train_and_save(
    data: DataSettings,
    config: TrainConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The ``train`` command: returns the summary ``--json`` prints.

    Under ``torch.distributed`` every rank trains (on its shard); rank 0 alone evaluates and
    writes the artifact, the other ranks return ``{"rank": r, "world_size": N, "out": ...}``.
    """
    from recsys_flowadam.artifact import save_artifact
    from recsys_flowadam.train.distributed import current as current_distributed

    t_start = time.perf_counter()
    out_dir = Path(out) if out is not None else default_out_dir(data.dataset, config.model, config.optimizer)
    ratings, split, edges = load_split(data, config.seed)
    result = train_model(split.train, split.val, config, checkpoint_path=out_dir / CHECKPOINT_NAME,
                         resume=resume, progress=progress, on_step=on_step)
    dctx = current_distributed()
    main = dctx is None or dctx.is_main
    device = torch.device(result.device)
    is_cp = config.model == "cp"
    metrics: dict[str, Any] = {"n_train": len(split.train)}
    if not main:
        pass  # rank 0 evaluates
    elif len(split.val):
        metrics.update(_metric_block("val", evaluate_ratings(result.predictor, split.val, device,
                                                             clip=config.clip_predictions, use_contexts=is_cp)))
    else:
        metrics.update({"val_rmse": None, "val_mae": None, "n_val": 0})
    fit_ratings = split.train
    if config.refit and len(split.val):
        # second run on train + val for the early-stopped step count; val metrics above stay the first run's
        fit_ratings = concat_ratings(split.train, split.val)
        first = result
        result = train_model(fit_ratings, None, replace(config, steps=max(first.best_step, 1), epochs=None,
                                                        patience=0, checkpoint_every=0), progress=progress)
        result.grad_evals += first.grad_evals
        result.diagnostics = {k: v + first.diagnostics[k] if isinstance(v, (int, float)) and not isinstance(v, bool)
                              and isinstance(first.diagnostics.get(k), (int, float)) else v
                              for k, v in result.diagnostics.items()}  # counters of both runs
        result.train_seconds += first.train_seconds
        result.history = first.history + [{**h, "phase": "refit"} for h in result.history]
        result.extra["refit"] = {"steps": result.steps, "n_ratings": len(fit_ratings)}
        result.best_step, result.stopped, result.steps = first.best_step, first.stopped, first.steps + result.steps
        metrics["n_train_refit"] = len(fit_ratings)
    if not main:
        return {"rank": dctx.rank, "world_size": dctx.world_size, "out": str(out_dir)}
    metrics.update(_metric_block("test", evaluate_ratings(result.predictor, split.test, device,
                                                          clip=config.clip_predictions, use_contexts=is_cp)))
    metrics.update({"steps": result.steps, "best_step": result.best_step, "grad_evals": result.grad_evals,
                    "stopped": result.stopped, "train_seconds": result.train_seconds,
                    "final_train_loss": result.history[-1]["train_loss"] if result.history else None})
    train_config = {**config.to_dict(), "dataset": data.dataset, "split": data.split, "data_dir": None,
                    "data_options": data.data_options, "clip_ratings": data.clip_ratings,
                    "context": data.context, "context_edges": edges, "representation_used": result.representation,
                    "device_used": result.device,
                    "objective": "mean loss over training ratings + reg*(||U||^2+||V||^2[+||W||^2]) "
                                 "+ bias_reg*(||b_u||^2+||b_i||^2)"}
    tensors, meta = artifact_payload(result, fit_ratings, dataset_name=data.dataset, split=data.split,
                                     seed=config.seed, metrics=metrics, train_config=train_config)
    save_artifact(out_dir, tensors, meta)
    write_history(out_dir, result.history)
    diag = result.diagnostics
    return {
        "dataset": data.dataset, "model": config.model, "optimizer": config.optimizer, "split": data.split,
        "seed": config.seed, "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
        "val_rmse": metrics.get("val_rmse"), "val_mae": metrics.get("val_mae"),
        "test_rmse": metrics["test_rmse"], "test_mae": metrics["test_mae"],
        "steps": result.steps, "best_step": result.best_step, "stopped": result.stopped,
        "grad_evals": result.grad_evals, "ode_triggers": int(diag.get("ode_triggers", 0) or 0),
        "train_seconds": round(result.train_seconds, 4), "total_seconds": round(time.perf_counter() - t_start, 4),
        "device": result.device, "representation": result.representation,
        "resumed_from": result.resumed_from, "refit": bool(result.extra.get("refit")), "out": str(out_dir),
        "world_size": 1 if dctx is None else dctx.world_size,
    }


def predictor_from_artifact(artifact, device: torch.device) -> tuple[Predictor, int, int]:
    """A :class:`Predictor` over an artifact's tensors plus one extra "unknown" row per mode,
    so raw IDs the artifact does not know map to index ``n_users`` / ``n_items`` (cold)."""
    from recsys_flowadam.data.ratings import RatingScale

    meta = artifact.meta
    t = artifact.tensors
    params: dict[str, torch.Tensor] = {}
    for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
        if name in t:
            arr = np.asarray(t[name], dtype=np.float32)
            pad = np.zeros((1,) + arr.shape[1:], dtype=np.float32)
            params[name] = torch.from_numpy(np.concatenate([arr, pad])).to(device)
    if "context_factors" in t:
        params["context_factors"] = torch.from_numpy(np.array(t["context_factors"], dtype=np.float32)).to(device)
    indptr = np.asarray(t["train_indptr"])
    seen_users = np.append(np.diff(indptr) > 0, False)
    seen_items = np.zeros(meta.n_items + 1, dtype=bool)
    seen_items[np.asarray(t["train_items"])] = True
    predictor = Predictor(params, meta.prediction_offset, meta.global_mean,
                          RatingScale(meta.rating_scale.min, meta.rating_scale.max),
                          torch.from_numpy(seen_users).to(device), torch.from_numpy(seen_items).to(device))
    return predictor, meta.n_users, meta.n_items


def evaluate_artifact(
    directory: str | Path,
    *,
    dataset: str | None = None,
    split: str | None = None,
    seed: int | None = None,
    data_dir: str | None = None,
    offline: bool = False,
    clip: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """The ``evaluate`` command: the artifact's predictions on a test split (by default the
    one it was trained with), with raw IDs mapped through the artifact's ID lists."""
    import pandas as pd

    from recsys_flowadam.artifact import load_artifact

    art = load_artifact(directory)
    meta = art.meta
    cfg = meta.train_config
    same_data = dataset is None or dataset == meta.dataset.name
    data = DataSettings(dataset=dataset or meta.dataset.name, split=split or meta.dataset.split,
                        data_dir=data_dir, offline=offline,
                        clip_ratings=bool(cfg.get("clip_ratings", False)) if same_data else False,
                        data_options=dict(cfg.get("data_options") or {}) if same_data else {},
                        context=cfg.get("context") if meta.model_type == "cp" else None)
    seed = meta.dataset.seed if seed is None else seed
    ratings, sp, _ = load_split(data, seed, cfg.get("context_edges") if meta.model_type == "cp" else None)
    warnings = []
    if same_data and meta.dataset.source_files and dict(ratings.source_files) != meta.dataset.source_files:
        warnings.append("the dataset's source files differ from those the model was trained on (sha256)")
    dev = resolve_device(device)
    predictor, n_users, n_items = predictor_from_artifact(art, dev)
    test = sp.test
    u_idx = pd.Index(meta.user_ids).get_indexer(test.user_ids[test.users].astype(str))
    i_idx = pd.Index(meta.item_ids).get_indexer(test.item_ids[test.items].astype(str))
    u_idx = np.where(u_idx < 0, n_users, u_idx)
    i_idx = np.where(i_idx < 0, n_items, i_idx)
    contexts = None
    if meta.model_type == "cp" and test.contexts is not None:
        contexts = torch.from_numpy(np.minimum(test.contexts, meta.n_contexts - 1)).to(dev)
    m = evaluate_predictor(predictor, torch.from_numpy(u_idx).to(dev), torch.from_numpy(i_idx).to(dev),
                           torch.from_numpy(test.values).to(device=dev, dtype=torch.float64), contexts,
                           clip=clip, breakdown=True)
    return {"artifact": str(directory), "dataset": data.dataset, "split": data.split, "seed": seed,
            "clipped": clip, **m, "warnings": warnings}
