"""The training loop: full-batch or mini-batch, early stopping, checkpoints, resume.

Every optimizer is driven through ``opt.step(closure)``; the closure writes the analytic
gradients of the chosen path into ``.grad`` and its calls are counted (``grad_evals``), so
FlowAdam's extra ODE evaluations and L-BFGS's line search are reported like Adam's one.

Seeding: ``seed`` draws the initial factors (CPU generator ``seed``, then moved to the
device) and the mini-batch order (a second CPU generator, ``seed + 1``, reshuffled every
epoch). On the CPU the same seed gives bit-identical runs, and a run resumed from a
checkpoint ends with exactly the metrics of an uninterrupted one.

Distributed (``torch.distributed`` initialised with more than one rank, e.g. under torchrun;
see ``distributed``): each rank builds its gradient path on its shard of the training
ratings, every closure call all-reduces the gradients, rank 0 evaluates, checkpoints and
decides early stopping; in mini-batch mode ``batch_size`` is the global batch (each rank
takes its share of it from its shard).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.models import (
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
from recsys_flowadam.train.distributed import DistContext, PeerLostError, reduce_closure_result
from recsys_flowadam.train.distributed import current as current_distributed
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


def _fingerprint(config: TrainConfig, train: Ratings, world_size: int = 1) -> dict[str, Any]:
    cfg = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES}
    if world_size > 1:  # the partition (and mini-batch order) depends on it
        cfg["world_size"] = world_size
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
    distributed: DistContext | None = None,
) -> TrainResult:
    """Fit ``config.model`` to ``train``, early-stopping on ``val``; see the module docstring.

    ``checkpoint_path``: where ``checkpoint_every`` writes (and ``resume`` reads) the state.
    ``on_step(step)`` is called after every completed step (tests use it to kill the process).
    ``distributed``: the process group's context; default: the initialised one, if any. Every
    rank passes the same ``train``/``val``/``config``; only rank 0 checkpoints and its result
    holds the best (early-stopped) parameters.
    """
    if len(train) == 0:
        raise ValueError("no training ratings")
    dctx = distributed if distributed is not None else current_distributed()
    main = dctx is None or dctx.is_main
    world = 1 if dctx is None else dctx.world_size
    device = resolve_device(config.device)
    if dctx is not None:
        device = dctx.device(device)
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
    all_coords, path_objective = coords, objective
    if dctx is not None:
        # this rank's shard; its path computes the data term only (rank 0 adds the penalty once)
        shard_sizes = dctx.shard_sizes(len(coords))
        if min(shard_sizes) == 0:
            raise ValueError(f"{len(coords)} training ratings cannot be split over {world} ranks")
        coords = coords.select(dctx.partition(len(coords), config.seed).to(device))
        path_objective = replace(objective, reg=0.0, bias_reg=0.0, weights=None)

    # representation: mini-batch when a batch size is given, else dense/sparse by memory budget
    representation = config.representation
    if config.batch_size is not None:
        if representation not in ("auto", "minibatch"):
            raise ValueError(f"batch_size given with representation {representation!r}: mini-batch training "
                             "uses gathered embeddings; drop one of the two")
        representation = "minibatch"
    elif representation == "auto":
        budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * (1 << 30))
        # the largest shard's size, so every rank picks the same representation
        representation = choose_representation(spec, math.ceil(len(all_coords) / world), device,
                                                budget_bytes=budget, element_size=dtype.itemsize,
                                                duplicates=has_duplicates(spec, all_coords))
        if representation == "minibatch":
            raise ValueError("the training data fits neither the dense nor the sparse full-batch representation "
                             "within the memory budget: give --batch-size for mini-batch training "
                             "(or a larger --memory-budget)")
    path = make_path(representation, spec, coords, path_objective)

    params = init_params(spec, init_std=config.init_std, generator=gen_init, device=device, dtype=dtype)
    opt = build_optimizer(config.optimizer, params.values(), config.lr, **config.optimizer_kwargs)

    seen_users = torch.bincount(all_coords.users, minlength=spec.n_users) > 0
    seen_items = torch.bincount(all_coords.items, minlength=spec.n_items) > 0
    predictor = Predictor(params, objective.offset, global_mean, train.scale, seen_users, seen_items)
    has_val = val is not None and len(val) > 0
    val_coords = coords_from_ratings(val, device=device, dtype=dtype, use_contexts=is_cp) if has_val else None

    n = len(coords)
    minibatch = representation == "minibatch"
    batch_size = min(config.batch_size or n, n)
    n_batches = math.ceil(n / batch_size) if minibatch else 1
    if dctx is not None:
        n_global = len(all_coords)
        longest = max(shard_sizes)  # every rank shuffles range(longest) alike and keeps its own positions
        sizes_col = torch.tensor(shard_sizes)[:, None]
        batch_size = max(1, min(math.ceil((config.batch_size or n_global) / world), longest))
        n_batches = math.ceil(longest / batch_size) if minibatch else 1
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
        fp = _fingerprint(config, train, world)
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
        if dctx is not None:  # shard mean -> sum / n_global, + penalty on rank 0, one all-reduce
            return reduce_closure_result(dctx, params, loss, grads, len(coords) / n_global,
                                         objective if dctx.is_main else None)
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    batch_holder: dict[str, Any] = {}

    def batch_closure() -> torch.Tensor:
        if dctx is not None:
            batch, share = batch_holder["batch"], batch_holder["share"]
            if len(batch):
                loss, grads = path.loss_and_grad(params, batch)
            else:  # this rank's shard ran out in the epoch's last batch
                loss = params["user_factors"].new_zeros(())
                grads = {k: torch.zeros_like(p) for k, p in params.items()}
            return reduce_closure_result(dctx, params, loss, grads, share, objective if dctx.is_main else None)
        loss, grads = path.loss_and_grad(params, batch_holder["batch"])
        for k, p in params.items():
            p.grad = grads[k]
        return loss

    def next_perm() -> torch.Tensor:
        if dctx is not None:  # same generator state on every rank: positions < own shard size are kept
            return torch.randperm(longest, generator=gen_shuffle)
        return torch.randperm(n, generator=gen_shuffle).to(device)

    closure = CountingClosure(batch_closure if minibatch else full_closure)
    closure.calls = st["grad_evals"]
    perm = None
    if minibatch:
        gen_shuffle.set_state(shuffle_state)
        if st["batch_pos"] > 0:
            perm = next_perm()

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
        save_checkpoint(ckpt, tensors, {"fingerprint": _fingerprint(config, train, world), "loop": dict(st),
                                        "has_best": best is not None, "optimizer": opt.state_dict(),
                                        "shuffle_state": shuffle_state})

    from tqdm.auto import tqdm

    bar = tqdm(total=limit, initial=st["step"], disable=not (progress and main),
               desc=f"{config.model}/{config.optimizer}", unit="step", leave=False)
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
                    perm = next_perm()
                lo = st["batch_pos"] * batch_size
                if dctx is None:
                    batch_holder["batch"] = coords.select(perm[lo:lo + batch_size])
                else:  # global batch = these positions on every rank; this rank's share of it
                    pos = perm[lo:lo + batch_size]
                    mine = pos[pos < len(coords)]
                    batch_holder["batch"] = coords.select(mine.to(device))
                    batch_holder["share"] = len(mine) / int((pos[None, :] < sizes_col).sum())
                st["batch_pos"] += 1
                if st["batch_pos"] == n_batches:
                    st["batch_pos"] = 0
                    st["epoch"] += 1
            else:
                st["epoch"] += 1
            try:
                loss = opt.step(closure)
            except PeerLostError as exc:
                raise PeerLostError(f"{exc}; in step {st['step'] + 1}" + (
                    f"; the last checkpoint ({ckpt}, step {st['checkpoint_step']}) is kept: rerun with --resume"
                    if st["checkpoint_step"] else "")) from exc
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
                if has_val and main:
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
                if dctx is not None:  # rank 0 decided; every rank must stop at the same step
                    flag, st["best_step"] = dctx.broadcast_ints(
                        [stopped == "early_stop", st["best_step"]], f"the early-stopping broadcast (step "
                        f"{st['step']})", device)
                    stopped = "early_stop" if flag else stopped
            st["elapsed"] = elapsed0 + time.perf_counter() - t0
            if main and ckpt is not None and config.checkpoint_every and st["step"] % config.checkpoint_every == 0:
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
        resumed_from=resumed_from, extra={"world_size": world} if dctx is not None else {},
    )
