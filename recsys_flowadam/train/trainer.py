"""The training loop: full-batch or mini-batch, early stopping, checkpoints, resume.

:func:`train_model` assembles the run from named parts and hands it to the :class:`StepDriver`:
the problem (``problem``: spec, objective, training coordinates, and the gradient path: dense,
sparse or mini-batches and their size, chosen by ``choose_run_path`` unless given), the data
and batch source (``batches``: all the data or this rank's shard, full batch or mini-batches,
and how a gradient is reduced), the :class:`~recsys_flowadam.train.evaluator.Evaluator`
(validation, early stopping, the best parameters) and the loop state with its checkpoints
(``loop_state``).

On the CPU the mini-batch loop runs on one torch thread with freed memory kept in the process
(:func:`loop_threads`, ``models.minibatch.retained_heap``; a full-batch loop too when the
machine is busy), and torch's Adam/AdamW take their fused kernel there (:func:`optimizer_kwargs`):
a step's torch kernels are too short to share between threads, and its update and fresh pages
would otherwise cost as much as its gradient. The compiled gradient kernel of MF and biased MF
splits a large batch between two threads of its own (``models.fused_cpu``; one in distributed
runs, where each rank has its core). The
automatic path's learning-rate schedule (:class:`LrDecay`) and validation cadence and sample come
with its ``PathChoice``.

Every optimizer is driven through ``opt.step(closure)``; the closure writes the analytic
gradients of the chosen path into ``.grad`` and its calls are counted (``grad_evals``), so
FlowAdam's extra ODE evaluations and L-BFGS's line search are reported like Adam's one.
The loop itself reads nothing back from the device per step: the losses wait on the device
(:class:`PendingLosses`) until a history record or a checkpoint reads them in one transfer,
and a non-finite one is reported there with the step it happened at.

Seeding: ``seed`` draws the initial factors (CPU generator ``seed``, then moved to the
device) and the mini-batch order (a second CPU generator, ``seed + 1``: reshuffled every
epoch, or on the CPU for MF and biased MF cut once and reordered every epoch). On the CPU the
same seed gives bit-identical runs, and a run resumed from a checkpoint ends with exactly the
metrics of an uninterrupted one.

Distributed (``torch.distributed`` initialised with more than one rank, e.g. under torchrun;
see ``distributed``): each rank builds its gradient path on its shard of the training
ratings, every closure call all-reduces the gradients, rank 0 evaluates, checkpoints and
decides early stopping; in mini-batch mode ``batch_size`` is the global batch (each rank
takes its share of it from its shard). Only the choice of data, batch source and stop
agreement differs; the loop itself is the same.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam import kernel_pool
from recsys_flowadam.models import Coords, ModelSpec, Objective, PathChoice, fused_cpu, init_params, make_path
from recsys_flowadam.models.path_choice import EPS_FACTOR
from recsys_flowadam.models.minibatch import retained_heap
from recsys_flowadam.train.checkpoint import CheckpointError
from recsys_flowadam.models.row_sparse import LazyAdamStep
from recsys_flowadam.optim.registry import LAZY_ADAM
from recsys_flowadam.train.batches import (
    BatchSource,
    GradientClosure,
    make_batch_source,
    step_limit,
    place_training_data,
)
from recsys_flowadam.train.config import TrainConfig
from recsys_flowadam.train.distributed import DistContext, PeerLostError
from recsys_flowadam.train.distributed import current as current_distributed
from recsys_flowadam.train.evaluator import Evaluator, stop_agreement
from recsys_flowadam.train.loop_state import Checkpointer, LoopState, Snapshot, fingerprint
from recsys_flowadam.train.objective_guard import ObjectiveGuard
from recsys_flowadam.train.metrics import Predictor
from recsys_flowadam.train.optimizers import CountingClosure, build_optimizer, optimizer_diagnostics
from recsys_flowadam.train.problem import build_problem, choose_run_path


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; names the step and the last good checkpoint.

    Losses are read from the device in groups (see :class:`PendingLosses`): ``checked_at`` is
    the step at which the group holding the bad one was read, when later than ``step``."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None, checkpoint_step: int | None,
                 checked_at: int | None = None):
        self.step = step
        msg = f"training loss is not finite ({loss}) at step {step}"
        if checked_at is not None and checked_at > step:
            msg += f" (found when the losses up to step {checked_at} were read)"
        if checkpoint is not None and checkpoint_step is not None:
            msg += f"; the last good checkpoint ({checkpoint}, step {checkpoint_step}) is kept"
        else:
            msg += "; no checkpoint was written (try a smaller --lr, or --checkpoint-every N)"
        super().__init__(msg)


class PendingLosses:
    """The training losses of the steps since they were last read, kept on the device.

    Reading a loss to the host (``float(loss)``) makes the host wait for the device every
    step; instead each step's loss is kept as a copy on its device and the copies are read in
    one transfer at history records, checkpoints and the end of the run (or when ``capacity``
    are kept). The values are the losses exactly (float32 -> float64 is exact), so the recorded
    mean training loss is the same sum, in the same order, as a per-step read. A loss that comes
    as a float (lazy-adam's fused step returns one) is kept as it is: writing it into a tensor
    cost a tenth of an ML-100K step.
    """

    def __init__(self, first_step: int, capacity: int = 1024) -> None:
        self.first_step, self.capacity = first_step, capacity
        self._losses: list[torch.Tensor | float] = []

    def add(self, loss: torch.Tensor | float) -> bool:
        """Keep one step's loss; True when ``capacity`` are kept (read them now)."""
        self._losses.append(loss.detach().clone() if isinstance(loss, torch.Tensor) else float(loss))
        return len(self._losses) == self.capacity

    def read(self) -> tuple[int, list[float]]:
        """``(first step, losses)`` of the steps kept so far (one device -> host transfer); empties."""
        first, kept = self.first_step, self._losses
        tensors = [v for v in kept if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(tensors).double().tolist() if tensors else [])
        values = [next(read) if isinstance(v, torch.Tensor) else v for v in kept]
        self.first_step += len(kept)
        self._losses = []
        return first, values


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
    path_choice: dict[str, Any] = field(default_factory=dict)  # PathChoice.to_dict(): path, batch size, why


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def training_device(config: TrainConfig) -> torch.device:
    """The device a run of ``config`` trains on (in one process): ``config.device`` resolved, except
    that lazy-adam's fused step is a CPU kernel, so "auto" means the CPU for it even where CUDA is."""
    if config.optimizer.lower() == LAZY_ADAM and config.device == "auto":
        return torch.device("cpu")
    return resolve_device(config.device)


class LrDecay:
    """The learning rate of every parameter group at ``scale`` times its configured value for
    ``hold`` steps, then halving every ``half_life`` steps, smoothly:
    ``lr(step) = scale * lr0 * 0.5 ** (max(step - hold, 0) / half_life)``. Mini-batch gradients are
    noisy, and a constant rate leaves the parameters wandering at a noise floor above the optimum;
    a function of the step alone, so a resumed run (and a refit) replays it exactly."""

    def __init__(self, opt: torch.optim.Optimizer, half_life: float, scale: float = 1.0, hold: int = 0) -> None:
        self.opt, self.half_life, self.hold = opt, half_life, hold
        self.base = [group["lr"] * scale for group in opt.param_groups]

    def apply(self, done: int) -> None:
        """Set the rates for the step after ``done`` completed steps."""
        factor = 0.5 ** (max(done - self.hold, 0) / self.half_life)
        for group, lr in zip(self.opt.param_groups, self.base):
            group["lr"] = lr * factor


class StepDriver:
    """Runs optimizer steps until the step limit or early stopping.

    One step: the batch source picks the batch, ``opt.step`` runs the (counted) closure and
    its loss joins the :class:`PendingLosses` on the device (no host synchronisation); every
    ``eval_every`` steps the pending losses are read, checked and summed, a history record is
    written and the evaluator decides whether to stop; every ``checkpoint_every`` steps a
    checkpoint (after reading the pending losses too).
    """

    def __init__(self, *, state: LoopState, source: BatchSource, closure: GradientClosure,
                 opt: torch.optim.Optimizer, evaluator: Evaluator, checkpointer: Checkpointer, limit: int,
                 on_step: Callable[[int], None] | None, bar: Any, lr_decay: LrDecay | None = None,
                 guard: ObjectiveGuard | None = None) -> None:
        self.state, self.source, self.closure, self.opt = state, source, closure, opt
        self.guard = guard
        self.lr_decay = lr_decay
        self.evaluator, self.checkpointer, self.limit = evaluator, checkpointer, limit
        self.on_step, self.bar = on_step, bar
        self.counter = CountingClosure(closure)
        self.counter.calls = state.grad_evals
        # lazy-adam's step without torch's wrapper: a tenth of an ML-100K step (LazyAdam.fused_step)
        self._opt_step = getattr(opt, "fused_step", opt.step)
        self.pending = PendingLosses(state.step + 1)
        self._t0, self._elapsed0 = 0.0, state.elapsed  # set when run() starts

    def run(self) -> str:
        """Step until done; ``"early_stop"`` or ``"max_steps"``. Closes the progress bar."""
        st = self.state
        self._t0, self._elapsed0 = time.perf_counter(), st.elapsed
        # resumed from a checkpoint written at the stopping step: nothing left to do
        stopped = "early_stop" if self.evaluator.patience_spent(st) else "max_steps"
        try:
            while st.step < self.limit and stopped != "early_stop":
                if self._step():
                    stopped = "early_stop"
                st.elapsed = self._elapsed()
                if self.checkpointer.due(st.step):
                    self._checkpoint()
                if self.on_step is not None:
                    self.on_step(st.step)
        finally:
            self.bar.close()
        self._read_losses()
        st.elapsed = self._elapsed()
        return stopped

    def _elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t0

    def _step(self) -> bool:
        """One optimizer step and its bookkeeping; True when the evaluation says stop."""
        st = self.state
        self.closure.batch = self.source.next(st)
        if self.lr_decay is not None:
            self.lr_decay.apply(st.step)
        try:
            loss = self._opt_step(self.counter)
        except PeerLostError as exc:
            path, ck_step = self.checkpointer.last_good(st)
            hint = f"; the last checkpoint ({path}, step {ck_step}) is kept: rerun with --resume" if ck_step else ""
            raise PeerLostError(f"{exc}; in step {st.step + 1}{hint}") from exc
        st.step += 1
        st.grad_evals = self.counter.calls
        if self.pending.add(loss):
            self._read_losses()
        self.bar.update(1)
        if self.evaluator.due(st.step, st.step == self.limit):
            return self._record()
        return False

    def _read_losses(self) -> None:
        """Read the pending losses (one transfer), raise at the first non-finite one, sum the rest."""
        st = self.state
        first, values = self.pending.read()
        if self.guard is not None:
            self.guard.score(first, values)
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(first + k, value, *self.checkpointer.last_good(st), checked_at=st.step)
            st.loss_sum += value
        st.loss_count += len(values)

    def _record(self) -> bool:
        """Append a history record (mean training loss since the last one, validation metrics)."""
        st = self.state
        self._read_losses()
        record: dict[str, Any] = {"step": st.step, "epoch": self.source.epoch_label(st),
                                  "train_loss": st.loss_sum / st.loss_count, "grad_evals": st.grad_evals}
        st.loss_sum, st.loss_count = 0.0, 0
        metrics = self.evaluator.validate(st)
        if metrics is not None:
            record["val_rmse"], record["val_mae"] = metrics["rmse"], metrics["mae"]
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_rmse=f"{metrics['rmse']:.4f}")
        else:
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        record["seconds"] = round(self._elapsed(), 4)
        st.history.append(record)
        if self.guard is not None and st.step < self.limit:
            self.guard.offer(st.step)
        return self.evaluator.decide_stop(st)

    def finish_guard(self) -> dict[str, float | int] | None:
        """End on the lowest-objective parameters seen (one more objective evaluation); what was
        restored, if anything."""
        if self.guard is None:
            return None
        restored = self.guard.finish(self.state.step, self.counter)
        self.state.grad_evals = self.counter.calls
        return restored

    def _checkpoint(self) -> None:
        """Save the run, unless the parameters already hold non-finite numbers."""
        self._read_losses()
        st, params = self.state, self.closure.params
        if not bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all()):
            raise NonFiniteLossError(st.step, float("nan"), *self.checkpointer.last_good(st))
        self.checkpointer.save(Snapshot(loop=st, params=params, best=self.evaluator.best,
                                        optimizer=self.opt.state_dict(), shuffle_state=self.source.shuffle_state))


def _resume(checkpointer: Checkpointer, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
            evaluator: Evaluator, source: BatchSource, limit: int) -> LoopState:
    """Load the checkpoint into the parameters, optimizer, evaluator and batch source; its loop state.
    A checkpoint past the run's step limit is refused (the run would report steps it was not given)."""
    snap = checkpointer.load(list(params))
    if snap.loop.step > limit:
        raise CheckpointError(f"{checkpointer.path}: the checkpoint is at step {snap.loop.step}, past this run's "
                              f"limit of {limit} steps; give a larger --steps/--epochs to continue it")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(snap.params[k])
    evaluator.restore_snapshot(snap.best)
    opt.load_state_dict(snap.optimizer)
    source.restore(snap.loop, snap.shuffle_state)
    return snap.loop


def _check_lazy(params: dict[str, torch.Tensor], objective: Objective, device: torch.device,
                dctx: DistContext | None) -> None:
    """Refuse lazy-adam where its fused step cannot run, saying why."""
    from recsys_flowadam.models.row_sparse import unsupported_reason

    why = unsupported_reason(params, objective, device, dctx is not None)
    if why is not None:
        raise ValueError(f"optimizer lazy-adam cannot train this run: {why}; use adam instead")


FUSED_BY_DEFAULT = ("adam", "adamw")  # torch optimizers whose fused kernel the mini-batch path turns on
EPS_OPTIMIZERS = ("adam", "adamw", "flowadam", LAZY_ADAM)  # whose eps is Adam's (added to sqrt(v)): a path's eps


def optimizer_kwargs(config: TrainConfig, choice: PathChoice, device: torch.device) -> dict[str, Any]:
    """The optimizer's keyword arguments: the config's, plus ``fused=True`` for torch's Adam and
    AdamW on the mini-batch path when the device has the fused kernel and neither ``fused`` nor
    ``foreach`` is given. There the update is a large share of a step (on the CPU about 1.3 ms
    fused against 9.6 ms for torch's default per-tensor loop, 100k x rank 20: a 72k x 20 model),
    and the fused kernel computes the same update to float rounding. Full-batch runs keep torch's
    default, so their numbers stay exactly as they were (FlowAdam picks its fused kernel itself).
    The path's ``eps`` (the automatic mini-batch path's, ``models.path_choice.auto_eps``, in units
    of a rating's gradient on a factor of ``path_choice.EPS_FACTOR``) goes to the Adam family unless
    the options give one, scaled to a given ``init_std`` larger than that factor (from smaller
    starts the same eps measured best: ``models.path_choice``'s docstring)."""
    kwargs = dict(config.optimizer_kwargs)
    if choice.eps is not None and config.optimizer.lower() in EPS_OPTIMIZERS and "eps" not in kwargs:
        scale = max(config.init_std / EPS_FACTOR, 1.0) if config.init_std else 1.0
        kwargs["eps"] = choice.eps * scale
    if (choice.representation == "minibatch" and config.optimizer.lower() in FUSED_BY_DEFAULT
            and not {"fused", "foreach"} & kwargs.keys()):
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        if device.type in _get_fused_kernels_supported_devices():
            kwargs["fused"] = True
    return kwargs


def lays_out_batches(spec: ModelSpec, coords: Coords, choice: PathChoice, device: torch.device,
                     dctx: DistContext | None) -> bool:
    """Whether the mini-batches are cut once and laid out user by user (``batches.SlottedMiniBatches``)
    instead of drawn from a fresh permutation every epoch: on the CPU, in one process, for MF and
    biased MF (whose batches are users, items and values only) when numba is there."""
    return (choice.representation == "minibatch" and device.type == "cpu" and dctx is None
            and spec.model_type in ("mf", "biased-mf") and coords.contexts is None and fused_cpu.available())


def loop_threads(device: torch.device, choice: PathChoice, load: float | None = None) -> int | None:
    """Torch CPU threads for the training loop (None: leave torch's count as it is).

    On the CPU: one thread for mini-batches always, and for full batches when the machine is busy
    (1-minute load average ``load``, default ``os.getloadavg()``, at least the core count less
    half a core): then a thread per core waits on the others, and a step takes several times as
    long (ML-100K-sized full batches, load about 8 on 2 cores: 3.4x slower dense, 22x sparse).
    The numbers do not depend on the thread count (the same parameters, bit for bit, checked on
    the dense and CSR paths); only the time does."""
    if device.type != "cpu":
        return None
    if choice.representation == "minibatch":
        return 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if load >= (os.cpu_count() or 1) - 0.5 else None


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: as they are), then restore the count.

    The mini-batch path on the CPU runs on one thread: its kernels last about a millisecond each,
    too short to share between threads, and torch's default of one thread per core collapses when
    another process holds a core (measured on this 2-core machine under load: about 20 ms a step
    on one thread, 50 to 700 ms on two; ``bench/bench_minibatch_step.py``)."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _progress_bar(config: TrainConfig, limit: int, initial: int, show: bool) -> Any:
    """A tqdm bar over the steps (disabled unless ``show``)."""
    from tqdm.auto import tqdm

    return tqdm(total=limit, initial=initial, disable=not show, desc=f"{config.model}/{config.optimizer}",
                unit="step", leave=False)


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
    data_identity: Mapping[str, Any] | None = None,
    path_choice: Mapping[str, Any] | None = None,
    keep_lowest_objective: bool = False,
) -> TrainResult:
    """Fit ``config.model`` to ``train``, early-stopping on ``val``; see the module docstring.

    ``checkpoint_path``: where ``checkpoint_every`` writes (and ``resume`` reads) the state;
    ``data_identity`` (dataset, split spec, loader options) joins the training data's digest in
    the fingerprint that a resumed checkpoint must match.
    ``on_step(step)`` is called after every completed step (tests use it to kill the process).
    ``distributed``: the process group's context; default: the initialised one, if any. Every
    rank passes the same ``train``/``val``/``config``; only rank 0 checkpoints and its result
    holds the best (early-stopped) parameters. ``path_choice``: a path already chosen
    (``TrainResult.path_choice`` of an earlier run: a refit takes its first run's), else
    :func:`~recsys_flowadam.train.problem.choose_run_path` decides. ``keep_lowest_objective``
    (a full-batch run without ``val``: the refit): end on the parameters of lowest training
    objective among those at the evaluation steps and the last (:mod:`.objective_guard`).
    """
    if len(train) == 0:
        raise ValueError("no training ratings")
    if keep_lowest_objective and (resume or config.checkpoint_every):
        raise ValueError("keep_lowest_objective does not survive a checkpoint (its snapshots are not saved): "
                         "use it without checkpoint_every and resume")
    dctx = distributed if distributed is not None else current_distributed()
    lazy = config.optimizer.lower() == LAZY_ADAM
    device = training_device(config)
    device = device if dctx is None else dctx.device(device)
    problem = build_problem(train, config, device)
    data = place_training_data(problem.coords, problem.objective, dctx, config.seed, device)
    choice = (PathChoice(**path_choice) if path_choice is not None
              else choose_run_path(config, problem.spec, problem.coords, data.largest, device, problem.rating_std))
    path = None if lazy else make_path(choice.representation, problem.spec, data.coords, data.path_objective)
    init_std = choice.init_std if config.init_std is None else config.init_std
    params = init_params(problem.spec, init_std=init_std, generator=torch.Generator().manual_seed(config.seed),
                         device=device, dtype=problem.dtype)
    opt = build_optimizer(config.optimizer, params.values(), config.lr, **optimizer_kwargs(config, choice, device))
    if lazy:
        _check_lazy(params, problem.objective, device, dctx)
    evaluator = Evaluator(problem.predictor(params), params, problem.coords_of(val), config,
                          evaluates=data.is_main, agree=stop_agreement(dctx, device), every=choice.eval_every,
                          sample=choice.eval_sample)
    laid_out = lazy or lays_out_batches(problem.spec, problem.coords, choice, device, dctx)
    layout = ((problem.spec.n_users, problem.spec.n_items), problem.dtype) if laid_out else None  # laid out once
    if laid_out and not lazy and dctx is None and hasattr(opt, "fuse_row_steps"):
        opt.fuse_row_steps = True  # the gradient kernel may take Adam's step on the rows (row_step)
    source = make_batch_source(data, choice.representation == "minibatch", choice.batch_size, config.seed, device,
                               layout, as_coords=not lazy)
    limit = step_limit(config, source.n_batches, choice.max_steps)
    lr_decay = None if choice.lr_half_life_steps is None else LrDecay(
        opt, choice.lr_half_life_steps, choice.lr_scale, choice.lr_hold_steps)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    order = "cut once by shuffled labels, reordered every epoch" if laid_out else "reshuffled every epoch"
    resolved = {"init_std": init_std} | ({"minibatch_order": order} if choice.representation == "minibatch" else {})
    fp = (fingerprint(config, train, data.world_size, data_identity, resolved)
          if resume or (ckpt is not None and config.checkpoint_every) else {})  # hashing the data costs time
    checkpointer = Checkpointer(ckpt, config.checkpoint_every, data.is_main, fp)
    state = _resume(checkpointer, params, opt, evaluator, source, limit) if resume else LoopState()
    resumed_from = state.step if resume else None
    bar = _progress_bar(config, limit, state.step, show=progress and data.is_main)
    guard = (ObjectiveGuard(params) if keep_lowest_objective and val is None and choice.representation != "minibatch"
             else None)
    # after a resume: the fused step works on the optimizer's moments as loaded
    closure: Any = (LazyAdamStep(source.slotted, params, problem.objective, opt, data.coords)  # type: ignore[attr-defined]
                    if lazy else GradientClosure(path, params, data))
    driver = StepDriver(state=state, source=source, closure=closure, opt=opt,
                        evaluator=evaluator, checkpointer=checkpointer, limit=limit, on_step=on_step, bar=bar,
                        lr_decay=lr_decay, guard=guard)
    cpu_minibatch = device.type == "cpu" and choice.representation == "minibatch"
    with (torch_threads(loop_threads(device, choice)), retained_heap() if cpu_minibatch else nullcontext(),
          kernel_pool.kernel_threads(1 if dctx is not None else None)):
        stopped = driver.run()
        restored = driver.finish_guard()
    evaluator.finish(state)
    if restored:  # the run ends on an earlier step's parameters
        state.best_step = int(restored["restored_step"])
    final = {k: p.detach() for k, p in params.items()}
    return TrainResult(
        spec=problem.spec, objective=problem.objective, config=config, params=final,
        predictor=problem.predictor(final), history=state.history, steps=state.step,
        epochs=source.epochs_done(state), grad_evals=state.grad_evals, diagnostics=optimizer_diagnostics(opt),
        best_step=state.best_step, best_val_rmse=evaluator.best_val_rmse(state), train_seconds=state.elapsed,
        representation=choice.representation, device=str(device), stopped=stopped, global_mean=problem.global_mean,
        resumed_from=resumed_from, extra={**data.extra, **({"objective_guard": restored} if restored else {})},
        path_choice=choice.to_dict(),
    )
