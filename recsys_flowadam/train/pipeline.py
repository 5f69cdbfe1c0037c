"""End-to-end jobs behind the CLI: load -> split -> train -> evaluate -> write the artifact,
and evaluating an artifact on a dataset's test split. Bench scripts call these too."""

from __future__ import annotations

import re
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.artifact import check_artifact_target
from recsys_flowadam.kernel_pool import in_background
from recsys_flowadam.page_policy import small_pages
from recsys_flowadam.train.checkpoint import CHECKPOINT_NAME
from recsys_flowadam.train.export import HISTORY_NAME, artifact_payload, train_csr, write_history
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.context import parse_context, time_bin_edges, with_time_contexts
from recsys_flowadam.train.metrics import Predictor, evaluate_predictor
from recsys_flowadam.train.trainer import resolve_device, train_model

# what `train` writes beside an artifact's two files, and so may replace with it
ARTIFACT_COMPANIONS = (CHECKPOINT_NAME, HISTORY_NAME)

if TYPE_CHECKING:
    from recsys_flowadam.data.splits import Split
    from recsys_flowadam.train.distributed import DistContext
    from recsys_flowadam.train.trainer import TrainResult


# which ratings to train on: the validated data settings model, under its former name
from recsys_flowadam.train.config import DataConfig as DataSettings  # noqa: E402


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


def metric_block(prefix: str, m: dict) -> dict[str, Any]:
    """An evaluation's figures under ``<prefix>_rmse``/``_mae``/``n_<prefix>`` (and its cold breakdown)."""
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
    if predictor.time is not None:  # time-mf reads the timestamps (none: it predicts at its `now`)
        contexts = None if ratings.timestamps is None else torch.from_numpy(ratings.timestamps).to(device)
    return evaluate_predictor(predictor, users, items, values, contexts, clip=clip, breakdown=breakdown)


def _merge_refit(first: TrainResult, refit: TrainResult, n_fit: int) -> TrainResult:
    """The refit run's result carrying both runs' counters, time and history; the step counts
    and stopping point of the first (early-stopped) run."""
    refit.grad_evals += first.grad_evals
    refit.diagnostics = {k: v + first.diagnostics[k] if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and isinstance(first.diagnostics.get(k), (int, float)) else v
                         for k, v in refit.diagnostics.items()}  # counters of both runs
    refit.train_seconds += first.train_seconds
    refit.history = first.history + [{**h, "phase": "refit"} for h in refit.history]
    refit.extra["refit"] = {"steps": refit.steps, "n_ratings": n_fit}
    if "objective_guard" in refit.extra:  # the refit ended on an earlier, lower-objective step
        refit.extra["refit"]["restored"] = refit.extra.pop("objective_guard")
    refit.best_step, refit.stopped, refit.steps = first.best_step, first.stopped, first.steps + refit.steps
    refit.best_val_rmse, refit.resumed_from = first.best_val_rmse, first.resumed_from  # the refit has no val
    return refit


def _refit(first: TrainResult, train: Ratings, val: Ratings | None, config: TrainConfig,
           progress: bool) -> tuple[TrainResult, Ratings]:
    """``(result, fit_ratings)``: with ``config.refit`` and a validation part, a second run on
    train + val for the early-stopped step count; otherwise the first run on train."""
    if not (config.refit and val is not None and len(val)):
        return first, train
    fit_ratings = concat_ratings(train, val)
    refit = train_model(fit_ratings, None, replace(config, steps=max(first.best_step, 1), epochs=None,
                                                   patience=0, checkpoint_every=0), progress=progress,
                        path_choice=first.path_choice or None,  # the first run's path and schedule
                        keep_lowest_objective=True)  # no validation: never end on a loss-raising step
    return _merge_refit(first, refit, len(fit_ratings)), fit_ratings


@dataclass
class Fit:
    """A finished training job: its result (refit included), the ratings the final model was
    fitted on and the metrics so far; ``main``: this process evaluates and saves (rank 0);
    ``config``: the job's settings with ``reg`` (and ``bias_reg`` when reg was unset) resolved,
    what the artifact records; ``reg_search``: how reg was chosen (``RegSearch.to_dict()``)."""

    result: TrainResult
    fit_ratings: Ratings
    metrics: dict[str, Any]
    main: bool
    config: TrainConfig | None = None
    reg_search: dict[str, Any] | None = None
    pending_csr: Future | None = None  # fit_ratings' CSR, started during training (:func:`fit_and_score`)

    def training_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``fit_ratings``' CSR of training pairs, as the artifact stores it (``export.train_csr``)."""
        return train_csr(self.fit_ratings) if self.pending_csr is None else self.pending_csr.result()


def validation_fold(n_train: int, n_val: int, config: TrainConfig, *,
                    distributed: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """``(held, joined)``: which of ``n_val`` validation rows :func:`fold_validation` keeps held out
    (a seeded ``EVAL_SAMPLE`` of them) and which it trains on, each in row order; None where it
    folds nothing (its docstring says when)."""
    from recsys_flowadam.models.path_choice import EVAL_SAMPLE, takes_auto_minibatch

    if (distributed or not config.refit or n_val <= EVAL_SAMPLE or config.batch_size is not None
            or config.representation != "auto" or not takes_auto_minibatch(n_train, config.optimizer)):
        return None
    order = np.random.default_rng([config.seed, n_val]).permutation(n_val)
    held = np.zeros(n_val, dtype=bool)  # (both parts in row order from a mask: no sort of a million rows)
    held[order[:EVAL_SAMPLE]] = True
    return np.flatnonzero(held), np.flatnonzero(~held)


def fold_validation(train: Ratings, val: Ratings | None, config: TrainConfig, *,
                    distributed: bool = False) -> tuple[Ratings, Ratings | None, dict[str, Any] | None]:
    """``(train, val, folded)``: on the automatic mini-batch path (``models.path_choice``, rule 1) with
    refit on and more than ``EVAL_SAMPLE`` validation ratings, a seeded sample of ``EVAL_SAMPLE`` of
    them stays the validation part and the rest joins the training ratings at once, in one run
    instead of an early-stopped run and a refit on train + val; ``folded`` says how many went
    where (None: nothing changed).

    Why: the refit exists to train on the validation ratings too, and costs a second whole run. On
    that path the evaluations score a fixed sample of ``EVAL_SAMPLE`` validation ratings anyway (its
    RMSE's standard error is about 0.002 at the rating noise of MovieLens), so holding out more buys
    nothing, while one run on train + the rest of val fits as many ratings less ``EVAL_SAMPLE``
    (1% at 10M) in half the time. The reported validation metrics are the held-out sample's, which
    the model never saw. Distributed runs, explicit paths and ``refit=False`` keep the two-run rule.
    """
    from recsys_flowadam.models.path_choice import EVAL_SAMPLE

    rows = None if val is None else validation_fold(len(train), len(val), config, distributed=distributed)
    if rows is None:
        return train, val, None
    held, joined = rows
    folded = {"n_val_held_out": len(held), "n_val_trained_on": len(joined),
              "why": f"{len(train):,} training ratings take the automatic mini-batch path, which validates on "
                     f"{EVAL_SAMPLE:,} ratings: the other {len(joined):,} validation ratings are trained on in "
                     "the one run instead of in a refit"}
    return concat_ratings(train, val.subset(joined, name=val.name)), val.subset(held, name=val.name), folded


def fit_and_score(train: Ratings, val: Ratings | None, config: TrainConfig, *,
                  checkpoint_path: Path | None = None, resume: bool = False, progress: bool = False,
                  on_step: Callable[[int], None] | None = None, data_identity: dict[str, Any] | None = None,
                  artifact: bool = True) -> Fit:
    """Choose an unset ``reg`` on ``val`` (``reg_search``), train (early-stopping on ``val``), score
    the validation part, refit when asked: the part of the ``train`` command after the data is
    loaded, shared with ``cv`` and the Python API. The search's best run is the first run, unless
    checkpoints or ``on_step`` are asked for: then the chosen value is trained again with them.
    Fresh arrays go on small pages where huge pages stall (``page_policy``). ``artifact``: an
    artifact will be built from the fit (its CSR of training pairs may then start during training)."""
    with small_pages():
        return _fit_and_score(train, val, config, checkpoint_path=checkpoint_path, resume=resume, progress=progress,
                              on_step=on_step, data_identity=data_identity, artifact=artifact)


def _fit_and_score(train: Ratings, val: Ratings | None, config: TrainConfig, *, checkpoint_path: Path | None,
                   resume: bool, progress: bool, on_step: Callable[[int], None] | None,
                   data_identity: dict[str, Any] | None, artifact: bool) -> Fit:
    from recsys_flowadam.train.distributed import current as current_distributed
    from recsys_flowadam.train.reg_search import choose_reg

    dctx = current_distributed()
    train, val, folded = fold_validation(train, val, config, distributed=dctx is not None)
    # The training ratings are final here on the folded path (3M ratings and more): their CSR, which
    # only the artifact needs, is built on the kernels' worker thread while this one builds the
    # problem and starts the batches' layout (whose own second halves wait for it), instead of
    # after training (0.1-0.3 s at 10M; it holds its 80 MB during training).
    pending_csr = in_background(lambda: train_csr(train)) if folded is not None and artifact else None
    config, search, chosen = choose_reg(train, val, config, distributed=dctx is not None,
                                        run=lambda c: train_model(train, val, c, progress=progress))
    checkpointing = checkpoint_path is not None and (config.checkpoint_every > 0 or resume)
    if chosen is None or checkpointing or on_step is not None:
        result = train_model(train, val, config, checkpoint_path=checkpoint_path, resume=resume, progress=progress,
                             on_step=on_step, data_identity=data_identity)
    else:
        result = chosen
    main = dctx is None or dctx.is_main
    metrics: dict[str, Any] = {"n_train": len(train)}
    if not main:
        pass  # rank 0 evaluates
    elif val is not None and len(val):
        metrics.update(metric_block("val", evaluate_ratings(result.predictor, val, torch.device(result.device),
                                                             clip=config.clip_predictions,
                                                             use_contexts=config.model == "cp")))
    else:
        metrics.update({"val_rmse": None, "val_mae": None, "n_val": 0})
    # val metrics above stay the first run's
    if folded is not None:  # one run on train + most of val already: nothing to refit
        metrics["validation_folded"] = folded
        result.extra["validation_folded"] = folded
        return Fit(result, train, metrics, main, config, search.to_dict(), pending_csr)
    result, fit_ratings = _refit(result, train, val, config, progress)
    if fit_ratings is not train:
        metrics["n_train_refit"] = len(fit_ratings)
    return Fit(result, fit_ratings, metrics, main, config, search.to_dict())


def run_metrics(result: TrainResult) -> dict[str, Any]:
    """What a run's metrics record of the run itself: steps, stopping, evaluations, time, final loss."""
    return {"steps": result.steps, "best_step": result.best_step, "grad_evals": result.grad_evals,
            "stopped": result.stopped, "train_seconds": result.train_seconds,
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
            "refit_restored": refit_restored(result)}


def refit_restored(result: TrainResult) -> dict[str, Any] | None:
    """Where the refit's objective guard put the parameters back to, if it did (else None)."""
    refit = result.extra.get("refit")
    return refit.get("restored") if isinstance(refit, dict) else None


def _used(result: TrainResult) -> dict[str, Any]:
    """What the artifact records beside the configuration: what the run used, and its objective."""
    return {"representation_used": result.representation, "path_choice": result.path_choice,
            "device_used": result.device,
            "objective": "mean loss over training ratings + reg*(||U||^2+||V||^2[+||W||^2]) "
                         "+ bias_reg*(||b_u||^2+||b_i||^2)"}


def in_memory_artifact(fit: Fit, *, dataset_name: str, split: str, extra_config: dict[str, Any]):
    """The artifact of a fit, checked as a saved one is, held in memory (the Python API's model)."""
    from recsys_flowadam.artifact import make_artifact

    config = fit.config or fit.result.config
    tensors, meta = artifact_payload(fit.result, fit.fit_ratings, csr=fit.training_csr(),
                                     dataset_name=dataset_name, split=split, seed=config.seed,
                                     metrics={**fit.metrics, **run_metrics(fit.result)},
                                     train_config={**config.to_dict(), **extra_config, **_used(fit.result),
                                                   "reg_search": fit.reg_search})
    return make_artifact(tensors, meta)


def artifact_train_config(data: DataSettings, config: TrainConfig, result: TrainResult,
                           edges: list[float] | None, reg_search: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``train_config`` the artifact records: the config (``Fit.config``: reg as chosen) plus
    data settings, what was used, and how reg was chosen (``Fit.reg_search``)."""
    return {**config.to_dict(), "dataset": data.dataset, "split": data.split, "data_dir": None,
            "data_options": data.data_options, "clip_ratings": data.clip_ratings,
            "context": data.context, "context_edges": edges, **_used(result), "reg_search": reg_search}


def _summary(data: DataSettings, fit: Fit, split: Split, metrics: dict[str, Any], out_dir: Path, t_start: float,
             dctx: DistContext | None) -> dict[str, Any]:
    """The summary ``train --json`` prints."""
    config, result = fit.config, fit.result
    diag = result.diagnostics
    return {
        "dataset": data.dataset, "model": config.model, "optimizer": config.optimizer, "split": data.split,
        "seed": config.seed, "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
        "val_rmse": metrics.get("val_rmse"), "val_mae": metrics.get("val_mae"),
        "test_rmse": metrics["test_rmse"], "test_mae": metrics["test_mae"],
        "steps": result.steps, "best_step": result.best_step, "stopped": result.stopped,
        "grad_evals": result.grad_evals, "ode_triggers": int(diag.get("ode_triggers", 0) or 0),
        "train_seconds": round(result.train_seconds, 4), "total_seconds": round(time.perf_counter() - t_start, 4),
        "device": result.device, "representation": result.representation, "path_choice": result.path_choice,
        "resumed_from": result.resumed_from, "refit": bool(result.extra.get("refit")),
        "refit_restored": refit_restored(result), "out": str(out_dir),
        "world_size": 1 if dctx is None else dctx.world_size,
        "reg": config.reg, "bias_reg": config.bias_reg, "reg_search": fit.reg_search,
        "validation_folded": metrics.get("validation_folded"),
    }


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
    from recsys_flowadam.train.distributed import current as current_distributed

    t_start = time.perf_counter()
    out_dir = Path(out) if out is not None else default_out_dir(data.dataset, config.model, config.optimizer)
    dctx = current_distributed()
    if dctx is None or dctx.is_main:
        check_artifact_target(out_dir, ARTIFACT_COMPANIONS)  # before any work: never a user's folder
    _ratings, split, edges = load_split(data, config.seed)
    identity = {k: v for k, v in asdict(data).items() if k not in ("data_dir", "offline")}  # where, not what
    fit = fit_and_score(split.train, split.val, config, checkpoint_path=out_dir / CHECKPOINT_NAME, resume=resume,
                        progress=progress, on_step=on_step, data_identity=identity)
    if not fit.main:
        return {"rank": dctx.rank, "world_size": dctx.world_size, "out": str(out_dir)}
    result, metrics, config = fit.result, fit.metrics, fit.config
    metrics.update(metric_block("test", evaluate_ratings(result.predictor, split.test, torch.device(result.device),
                                                          clip=config.clip_predictions,
                                                          use_contexts=config.model == "cp")))
    metrics.update(run_metrics(result))
    tensors, meta = artifact_payload(result, fit.fit_ratings, csr=fit.training_csr(),
                                     dataset_name=data.dataset, split=data.split, seed=config.seed, metrics=metrics,
                                     train_config=artifact_train_config(data, config, result, edges, fit.reg_search))
    saved = save_or_rescue(out_dir, tensors, meta, result.history)
    return _summary(data, fit, split, metrics, saved, t_start, dctx)


def save_or_rescue(out_dir: Path, tensors: dict[str, Any], meta: dict[str, Any],
                   history: list[dict[str, Any]]) -> Path:
    """Write the artifact and its metric history to ``out_dir``; if that fails (a full disk, a
    folder that changed during training), write them to a new folder beside it (or in the
    temporary folder) and raise ArtifactError naming both: a finished run is never lost."""
    import tempfile

    from recsys_flowadam.artifact import ArtifactError, save_artifact

    try:
        save_artifact(out_dir, tensors, meta, companions=ARTIFACT_COMPANIONS)
        write_history(out_dir, history)
        return out_dir
    except (OSError, ArtifactError) as exc:
        problem = exc
    for parent in (out_dir.parent, Path(tempfile.gettempdir())):
        try:
            rescue = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.unsaved-", dir=parent))
            save_artifact(rescue, tensors, meta)
            write_history(rescue, history)
        except (OSError, ArtifactError):
            continue
        raise ArtifactError(f"{out_dir}: could not save the trained model there ({problem}); it was saved to "
                            f"{rescue} instead")
    raise ArtifactError(f"{out_dir}: could not save the trained model ({problem}), nor in a folder beside it or "
                        "in the temporary folder")


def predictor_from_artifact(artifact, device: torch.device) -> Predictor:
    """The artifact's prediction rule (:func:`rule_from_artifact`) as a :class:`Predictor` on
    ``device``; index -1 stands for a raw ID the artifact does not list (cold)."""
    from recsys_flowadam.data.ratings import RatingScale
    from recsys_flowadam.models.prediction import rule_from_artifact

    rule = rule_from_artifact(artifact)

    def on_device(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(arr)).to(device)  # a writable copy of the (read-only) mapping

    time = None
    if rule.time is not None:
        from recsys_flowadam.models.timeaware import torch_axis

        time = torch_axis(rule.time, device)
    return Predictor({name: on_device(p) for name, p in rule.params.items()}, rule.offset, rule.global_mean,
                     RatingScale(rule.scale.min, rule.scale.max), on_device(rule.seen_users),
                     on_device(rule.seen_items), time=time)


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
    predictor = predictor_from_artifact(art, dev)
    test = sp.test
    # -1 where the artifact does not list the raw ID: the rule's cold start
    u_idx = pd.Index(meta.user_ids).get_indexer(test.user_ids[test.users].astype(str))
    i_idx = pd.Index(meta.item_ids).get_indexer(test.item_ids[test.items].astype(str))
    contexts = None
    if meta.model_type == "cp" and test.contexts is not None:
        contexts = torch.from_numpy(np.minimum(test.contexts, meta.n_contexts - 1)).to(dev)
    if meta.time_axis is not None and test.timestamps is not None:  # time-mf, time-svdpp
        contexts = torch.from_numpy(test.timestamps).to(dev)
    m = evaluate_predictor(predictor, torch.from_numpy(u_idx).to(dev), torch.from_numpy(i_idx).to(dev),
                           torch.from_numpy(test.values).to(device=dev, dtype=torch.float64), contexts,
                           clip=clip, breakdown=True)
    return {"artifact": str(directory), "dataset": data.dataset, "split": data.split, "seed": seed,
            "clipped": clip, **m, "warnings": warnings}
