"""The training loop: full-batch or mini-batch, early stopping, checkpoints, resume.

Every optimizer is driven through ``opt.step(closure)``; the closure writes the analytic
gradients of the chosen path into ``.grad`` and its calls are counted (``grad_evals``), so
FlowAdam's extra ODE evaluations and L-BFGS's line search are reported like Adam's one.

Seeding: ``seed`` draws the initial factors (CPU generator ``seed``, then moved to the
device) and the mini-batch order (a second CPU generator, ``seed + 1``, reshuffled every
epoch). On the CPU the same seed gives bit-identical runs, and a run resumed from a
checkpoint ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.models import (
    AutogradPath,
    ModelSpec,
    Objective,
    choose_representation,
    coords_from_ratings,
    has_duplicates,
    init_params,
    make_path,
)
from recsys_flowadam.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.metrics import Predictor, evaluate_predictor
from recsys_flowadam.train.optimizers import CountingClosure, build_optimizer, optimizer_diagnostics

# config fields that may change between a checkpoint and its resumption
_RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "device")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; names the step and the last good checkpoint."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None, checkpoint_step: int | None):
        self.step = step
        msg = f"training loss is not finite ({loss}) at step {step}"
        if checkpoint is not None and checkpoint_step is not None:
            msg += f"; the last good checkpoint ({checkpoint}, step {checkpoint_step}) is kept"
        else:
            msg += "; no checkpoint was written (try a smaller --lr, or --checkpoint-every N)"
        super().__init__(msg)


@dataclass
class TrainResult:
    """What a run produced: the best parameters and everything the artifact records."""

    spec: ModelSpec
    objective: Objective
    config: TrainConfig
    params: dict[str, torch.Tensor]
    predictor: Predictor
    history: list[dict[str, Any]]
    steps: int
    epochs: float
    grad_evals: int
    diagnostics: dict[str, Any]
    best_step: int
    best_val_rmse: float | None
    train_seconds: float
    representation: str
    device: str
    stopped: str
    global_mean: float
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _fingerprint(config: TrainConfig, train: Ratings) -> dict[str, Any]:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES}
    return {"config": cfg, "n_train": len(train), "n_users": train.n_users, "n_items": train.n_items,
            "values_sum": float(train.values.sum(dtype="float64"))}


def train_model(
    train: Ratings,
    val: Ratings | None,
    config: TrainConfig,
    *,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Fit ``config.model`` to ``train``, early-stopping on ``val``; see the module docstring.

    ``checkpoint_path``: where ``checkpoint_every`` writes (and ``resume`` reads) the state.
    ``on_step(step)`` is called after every completed step (tests use it to kill the process).
    """
    if len(train) == 0:
        raise ValueError("no training ratings")
    device = resolve_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    gen_init = torch.Generator().manual_seed(config.seed)
    gen_shuffle = torch.Generator().manual_seed(config.seed + 1)

    is_cp = config.model == "cp"
    spec = ModelSpec(config.model, train.n_users, train.n_items, config.rank,
                     n_contexts=train.n_contexts if is_cp else 0, biases=config.cp_biases if is_cp else None)
    global_mean = train.mean
    center = spec.has_biases if config.center is None else config.center
    coords = coords_from_ratings(train, device=device, dtype=dtype, use_contexts=is_cp)
    weights = None
    if config.reg_weighting == "frequency":
        weights = {"user": torch.bincount(coords.users, minlength=spec.n_users).to(dtype) / len(coords),
                   "item": torch.bincount(coords.items, minlength=spec.n_items).to(dtype) / len(coords)}
        if is_cp:
            weights["context"] = torch.bincount(coords.contexts, minlength=spec.n_contexts).to(dtype) / len(coords)
    objective = Objective(reg=config.reg, bias_reg=config.effective_bias_reg, loss=config.loss,
                          huber_delta=config.huber_delta, offset=global_mean if center else 0.0, weights=weights)

    # representation: mini-batch when a batch size is given, else dense/sparse by memory budget
    representation = config.representation
    if config.batch_size is not None:
        if representation not in ("auto", "minibatch"):
            raise ValueError(f"batch_size given with representation {representation!r}: mini-batch training "
                             "uses gathered embeddings; drop one of the two")
        representation = "minibatch"
    elif representation == "auto":
        budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * (1 << 30))
        representation = choose_representation(spec, len(coords), device, budget_bytes=budget,
                                                element_size=dtype.itemsize,
                                                duplicates=has_duplicates(spec, coords))
        if representation == "minibatch":
            raise ValueError("the training data fits neither the dense nor the sparse full-batch representation "
                             "within the memory budget: give --batch-size for mini-batch training "
                             "(or a larger --memory-budget)")
    path = make_path(representation, spec, coords, objective)

    params = init_params(spec, init_std=config.init_std, generator=gen_init, device=device, dtype=dtype)
    opt = build_optimizer(config.optimizer, params.values(), config.lr, **config.optimizer_kwargs)

    seen_users = torch.bincount(coords.users, minlength=spec.n_users) > 0
    seen_items = torch.bincount(coords.items, minlength=spec.n_items) > 0
    predictor = Predictor(params, objective.offset, global_mean, train.scale, seen_users, seen_items)
    has_val = val is not None and len(val) > 0
    val_coords = coords_from_ratings(val, device=device, dtype=dtype, use_contexts=is_cp) if has_val else None

    n = len(coords)
    minibatch = representation == "minibatch"
    batch_size = min(config.batch_size or n, n)
    n_batches = math.ceil(n / batch_size) if minibatch else 1
    if config.steps is None and config.epochs is None:
        limit = TrainConfig.DEFAULT_STEPS
    else:
        limit = min(config.steps if config.steps is not None else math.inf,
                    config.epochs * n_batches if config.epochs is not None else math.inf)
    limit = int(limit)

    # loop state (everything a checkpoint must carry)
    st: dict[str, Any] = {"step": 0, "grad_evals": 0, "best_val": math.inf, "best_step": 0, "bad_evals": 0,
                          "history": [], "elapsed": 0.0, "batch_pos": 0, "epoch": 0, "loss_sum": 0.0,
                          "loss_count": 0, "checkpoint_step": None}
    best: dict[str, torch.Tensor] | None = None
    shuffle_state = gen_shuffle.get_state()
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    resumed_from = None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise CheckpointError(f"{ckpt}: no checkpoint to resume from")
        tensors, saved = load_checkpoint(ckpt)
        fp = _fingerprint(config, train)
        if saved.get("fingerprint") != fp:
            old = saved.get("fingerprint", {})
            diff = sorted(k for k in set(fp["config"]) | set(old.get("config", {}))
                          if fp["config"].get(k) != old.get("config", {}).get(k))
            what = f"config fields {diff}" if diff else "training data"
            raise CheckpointError(f"{ckpt}: checkpoint belongs to a different run ({what} differ)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[f"param.{k}"])
        if saved["has_best"]:
            best = {k: tensors[f"best.{k}"].to(device=device, dtype=dtype) for k in params}
        opt.load_state_dict(saved["optimizer"])
        st.update(saved["loop"])
        shuffle_state = saved["shuffle_state"]
        resumed_from = st["step"]

    def full_closure() -> torch.Tensor:
        loss, grads = path.loss_and_grad(params)
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    batch_holder: dict[str, Any] = {}
    engine = AutogradPath(coords, objective) if minibatch else None

    def batch_closure() -> torch.Tensor:
        loss, grads = engine.loss_and_grad(params, batch_holder["batch"])
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    closure = CountingClosure(batch_closure if minibatch else full_closure)
    closure.calls = st["grad_evals"]
    perm = None
    if minibatch:
        gen_shuffle.set_state(shuffle_state)
        if st["batch_pos"] > 0:
            perm = torch.randperm(n, generator=gen_shuffle).to(device)

    def save_ckpt() -> None:
        assert ckpt is not None
        finite = torch.stack([torch.isfinite(p).all() for p in params.values()]).all()
        if not bool(finite):
            raise NonFiniteLossError(st["step"], float("nan"), ckpt if st["checkpoint_step"] else None,
                                     st["checkpoint_step"])
        tensors = {f"param.{k}": p for k, p in params.items()}
        if best is not None:
            tensors.update({f"best.{k}": b for k, b in best.items()})
        st["checkpoint_step"] = st["step"]
        save_checkpoint(ckpt, tensors, {"fingerprint": _fingerprint(config, train), "loop": dict(st),
                                        "has_best": best is not None, "optimizer": opt.state_dict(),
                                        "shuffle_state": shuffle_state})

    from tqdm.auto import tqdm

    bar = tqdm(total=limit, initial=st["step"], disable=not progress, desc=f"{config.model}/{config.optimizer}",
               unit="step", leave=False)
    stopped = "max_steps"
    t0 = time.perf_counter()
    elapsed0 = st["elapsed"]
    if has_val and config.patience and st["bad_evals"] >= config.patience:
        stopped = "early_stop"  # resumed from a checkpoint written at the stopping step
    try:
        while st["step"] < limit and stopped != "early_stop":
            if minibatch:
                if st["batch_pos"] == 0:
                    shuffle_state = gen_shuffle.get_state()
                    perm = torch.randperm(n, generator=gen_shuffle).to(device)
                lo = st["batch_pos"] * batch_size
                batch_holder["batch"] = coords.select(perm[lo:lo + batch_size])
                st["batch_pos"] += 1
                if st["batch_pos"] == n_batches:
                    st["batch_pos"] = 0
                    st["epoch"] += 1
            else:
                st["epoch"] += 1
            loss = opt.step(closure)
            st["step"] += 1
            st["grad_evals"] = closure.calls
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(st["step"], loss_value, ckpt if st["checkpoint_step"] else None,
                                         st["checkpoint_step"])
            st["loss_sum"] += loss_value
            st["loss_count"] += 1
            bar.update(1)
            last = st["step"] == limit
            if st["step"] % config.eval_every == 0 or last:
                record: dict[str, Any] = {"step": st["step"], "epoch": st["epoch"] if not minibatch else
                                          round(st["epoch"] + st["batch_pos"] / n_batches, 4),
                                          "train_loss": st["loss_sum"] / st["loss_count"],
                                          "grad_evals": st["grad_evals"]}
                st["loss_sum"], st["loss_count"] = 0.0, 0
                if has_val:
                    m = evaluate_predictor(predictor, val_coords.users, val_coords.items, val_coords.values,
                                           val_coords.contexts, clip=config.clip_predictions)
                    record["val_rmse"], record["val_mae"] = m["rmse"], m["mae"]
                    if m["rmse"] < st["best_val"] - config.min_delta:
                        st["best_val"], st["best_step"], st["bad_evals"] = m["rmse"], st["step"], 0
                        best = {k: p.detach().clone() for k, p in params.items()}
                    else:
                        st["bad_evals"] += 1
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_rmse=f"{m['rmse']:.4f}")
                else:
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}")
                record["seconds"] = round(elapsed0 + time.perf_counter() - t0, 4)
                st["history"].append(record)
                if has_val and config.patience and st["bad_evals"] >= config.patience:
                    stopped = "early_stop"
            st["elapsed"] = elapsed0 + time.perf_counter() - t0
            if ckpt is not None and config.checkpoint_every and st["step"] % config.checkpoint_every == 0:
                save_ckpt()
            if on_step is not None:
                on_step(st["step"])
            if stopped == "early_stop":
                break
    finally:
        bar.close()
    st["elapsed"] = elapsed0 + time.perf_counter() - t0

    if best is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best[k])
    if not has_val:
        st["best_step"] = st["step"]
    final = {k: p.detach() for k, p in params.items()}
    return TrainResult(
        spec=spec, objective=objective, config=config, params=final,
        predictor=Predictor(final, objective.offset, global_mean, train.scale, seen_users, seen_items),
        history=st["history"], steps=st["step"],
        epochs=(st["epoch"] + st["batch_pos"] / n_batches) if minibatch else float(st["step"]),
        grad_evals=st["grad_evals"], diagnostics=optimizer_diagnostics(opt), best_step=st["best_step"],
        best_val_rmse=st["best_val"] if has_val else None, train_seconds=st["elapsed"],
        representation=representation, device=str(device), stopped=stopped, global_mean=global_mean,
        resumed_from=resumed_from,
    )
