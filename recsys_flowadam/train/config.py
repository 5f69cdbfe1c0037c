"""The training configuration: one dataclass, recorded verbatim in the artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Everything that determines a training run (given the data and the seed).

    Objective: mean loss over the training ratings + ``reg * (||U||^2 + ||V||^2 [+ ||W||^2])``
    + ``bias_reg * (||b_u||^2 + ||b_i||^2)``, identical for every optimizer.
    ``steps`` counts optimizer steps (full-batch: one per pass over the data; mini-batch:
    one per batch); ``epochs`` bounds passes over the data; whichever ends first wins.
    Early stopping: evaluate on the validation ratings every ``eval_every`` steps; stop after
    ``patience`` evaluations without an improvement of more than ``min_delta`` and restore
    the best parameters (``patience=0``: never stop early, still restore the best).
    ``refit``: then train again from the same seed on train + validation ratings for the
    best step count (no early stopping; the reported validation metrics are the first run's).
    """

    model: str = "biased-mf"
    rank: int = 20
    init_std: float = 0.1
    reg: float = 0.0
    bias_reg: float | None = None  # None: same as reg
    reg_weighting: str = "uniform"  # uniform | frequency (row weight n_u/n: weighted-lambda, see models)
    loss: str = "mse"
    huber_delta: float = 1.0
    center: bool | None = None  # subtract the train mean (prediction_offset); None: when the model has biases
    cp_biases: bool = False
    optimizer: str = "flowadam"
    lr: float = 0.01
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # None: full batch
    eval_every: int = 10
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"
    representation: str = "auto"  # auto | dense | sparse | minibatch
    memory_budget_gb: float | None = None
    dtype: str = "float32"
    checkpoint_every: int = 0
    clip_predictions: bool = True
    refit: bool = False  # after early stopping, retrain on train+val for the best step count

    DEFAULT_STEPS = 2000

    def __post_init__(self) -> None:
        problems = []
        for name in ("rank", "eval_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("steps", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (got {value})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.patience < 0 or self.checkpoint_every < 0:
            problems.append("patience and checkpoint_every must be >= 0")
        if self.reg_weighting not in ("uniform", "frequency"):
            problems.append(f"reg_weighting must be uniform or frequency (got {self.reg_weighting})")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64 (got {self.dtype})")
        if self.representation not in ("auto", "dense", "sparse", "minibatch"):
            problems.append(f"representation must be auto, dense, sparse or minibatch (got {self.representation})")
        if self.representation == "minibatch" and self.batch_size is None:
            problems.append("representation minibatch needs batch_size")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def effective_bias_reg(self) -> float:
        return self.reg if self.bias_reg is None else self.bias_reg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
