"""The training settings as pydantic models: the one place that gives every setting its name,
type, default, bounds and help text.

``TrainConfig`` (the model and how to fit it), ``DataConfig`` (which ratings) and
``FlowAdamOptions`` (FlowAdam's knobs, passed on in ``TrainConfig.optimizer_kwargs``) are
pydantic dataclasses in strict mode: ``"20"`` is not an int, ``"false"`` not a bool, ``2.5``
not an int (an int is fine where a float is expected, and is stored as a float). The ``train``
flags (``recsys_flowadam.cli.train_cmd``), the TOML recipes (``recipes``) and the Python API
(:func:`split_settings`) are built from these fields. The artifact records
``TrainConfig.to_dict()`` verbatim.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

_STRICT = ConfigDict(strict=True)


class ConfigError(ValueError):
    """A setting has the wrong type, is out of bounds, is unknown, or conflicts with another."""


def _context_spec(value: str) -> str:
    """``time:N`` with N >= 1, or "" (none), as ``train.context.parse_context`` reads it."""
    kind, _, count = value.partition(":")
    if value and (kind != "time" or not count.isdigit() or int(count) < 1):
        raise ValueError("must look like time:N with N >= 1")
    return value


def _device_name(value: str) -> str:
    """A torch device this project runs on (checked here, before torch is imported)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", value):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return value


def _preset_name(value: str) -> str:
    """A FlowAdam preset, in either case (FlowAdam upper-cases it; its PRESETS, not imported here:
    this module stays free of torch)."""
    if value.upper() not in ("A", "B", "E"):
        raise ValueError("must be A, B or E")
    return value


@dataclass(config=_STRICT)
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
    ``reg`` unset: with ``tune`` and at most ``tune_max_ratings`` training ratings, the training
    jobs (``pipeline.fit_and_score``) choose it on the validation part (``reg_search``); otherwise
    it is ``REG_PER_STD`` times the training ratings' standard deviation.
    """

    DEFAULT_STEPS: ClassVar[int] = 2000
    # an unset reg: this many times the training ratings' standard deviation (frequency-weighted
    # L2; the factors' best weight grows with the rating scale, see train.reg_search)
    REG_PER_STD: ClassVar[float] = 0.12
    DEFAULT_BIAS_REG: ClassVar[float] = 0.01  # an unset bias_reg when reg is unset too (scale-free)

    model: Literal["mf", "biased-mf", "cp", "svdpp", "time-mf", "time-svdpp"] = Field(
        "biased-mf", description="mf (r = u.v), biased-mf (plus user and item biases), cp (a third, context mode), "
                                 "svdpp (plus implicit feedback), time-mf (biases that move with time) or "
                                 "time-svdpp (both)")
    rank: int = Field(50, ge=1, description="number of latent factors")
    init_std: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="factor init N(0, s^2); unset: 0.1 (the paper's), and 0.0025 on the automatic mini-batch path")
    reg: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="L2 weight on the factors; unset: chosen on the validation part (see tune), else "
                    f"{REG_PER_STD} x the training ratings' standard deviation")
    bias_reg: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description=f"L2 weight on the biases; unset: the same as reg when reg is given, else {DEFAULT_BIAS_REG}")
    reg_weighting: Literal["uniform", "frequency"] = Field(
        "frequency", description="uniform L2, or each row's L2 weighted by its share of the ratings (weighted-lambda)")
    loss: Literal["mse", "huber"] = Field("mse", description="training loss")
    huber_delta: float = Field(1.0, gt=0, allow_inf_nan=False, description="Huber threshold")
    center: bool | None = Field(
        None, description="subtract the training mean (prediction offset); unset: on for models with biases")
    cp_biases: bool = Field(False, description="cp with user and item biases")
    optimizer: str = Field(
        "flowadam", min_length=1,
        description="flowadam, adam, adamw, lazy-adam (mini-batches, CPU), sgd, lion, adabelief, lbfgs, ...")
    lr: float = Field(0.02, gt=0, allow_inf_nan=False, description="learning rate")
    optimizer_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra optimizer keyword (e.g. weight_decay=0.01); FlowAdam's knobs "
                                          "have their own settings")
    steps: int | None = Field(
        None, ge=1, description=f"max optimizer steps (full batch: one per pass over the data, mini-batch: one "
                                f"per batch); unset: {DEFAULT_STEPS} unless epochs is set")
    epochs: int | None = Field(None, ge=1, description="max passes over the data")
    batch_size: int | None = Field(None, ge=1, description="mini-batch size; unset: full batch")
    eval_every: int | None = Field(None, ge=1, description="evaluate on the validation ratings every N steps; "
                                   "unset: 10, or about 4 times an epoch on the automatic mini-batch path")
    patience: int = Field(10, ge=0, description="early stop after N evaluations without improvement, 0: never; "
                                                "the best parameters are kept either way")
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False,
                             description="validation RMSE improvement needed to reset patience")
    seed: int = Field(0, ge=0, description="fixes init, split and shuffling")
    device: Annotated[str, AfterValidator(_device_name)] = Field(
        "auto", description="auto (CUDA when available), cpu, cuda, cuda:N or mps")
    representation: Literal["auto", "dense", "sparse", "minibatch"] = Field(
        "auto", description="how to hold the training data; auto: by batch size and memory budget")
    memory_budget_gb: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="GiB for the full-batch representation; unset: half the free "
                                                     "CUDA memory, or a quarter of RAM capped at 8 GiB")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter and data precision")
    checkpoint_every: int = Field(0, ge=0, description="write <out>/checkpoint.safetensors every N steps, 0: never")
    clip_predictions: bool = Field(True, description="clip evaluated predictions to the rating scale")
    refit: bool = Field(True, description="after early stopping, retrain on train + validation for the best "
                                          "step count (from 3M training ratings, on the automatic mini-batch "
                                          "path: all but 100k validation ratings join the one run instead)")
    tune: bool = Field(True, description="with reg unset: choose it on the validation part from a small geometric "
                                         "grid of early-stopped runs (train.reg_search)")
    tune_max_ratings: int = Field(
        1_000_000, ge=0, description="search reg only up to this many training ratings; above, an unset reg "
                                     "takes its default (the search costs 3-6 training runs)")

    def __post_init__(self) -> None:
        if self.representation == "minibatch" and self.batch_size is None:
            raise ValueError("representation minibatch needs batch_size")

    @property
    def effective_bias_reg(self) -> float:
        if self.bias_reg is not None:
            return self.bias_reg
        return self.DEFAULT_BIAS_REG if self.reg is None else self.reg

    def reg_for(self, rating_std: float) -> float:
        """The factors' L2 weight: ``reg``, or when unset the default for ratings of this standard
        deviation (3 significant digits)."""
        return self.reg if self.reg is not None else default_reg(rating_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(config=_STRICT)
class DataConfig:
    """Which ratings to train on: dataset name, its split, loader options, context."""

    dataset: str = Field(min_length=1, description="dataset name (ml-100k, jester-4, synthetic, csv:PATH, ...)")
    split: str = Field("random", min_length=1, description="split spec: random[:TR,VA,TE], u1..u5, ua, ub, "
                                                          "kfold:K:F, temporal, ...")
    data_dir: str | Path | None = Field(
        None, description="data root; unset: $RECSYS_FLOWADAM_DATA or the user cache")
    offline: bool = Field(False, description="accepted for scripts: loading never downloads (use `recsys-flowadam "
                                             "data fetch NAME`)")
    clip_ratings: bool = Field(
        False, description="clip the training data to the rating scale (Jester-4 has values outside it)")
    data_options: dict[str, Any] = Field(
        default_factory=dict, description="loader option (e.g. n_users=300 for synthetic)")
    context: Annotated[str, AfterValidator(_context_spec)] | None = Field(
        None, description="cp's third mode for MovieLens: time:N (N equal-count time bins)")


@dataclass(config=_STRICT)
class FlowAdamOptions:
    """FlowAdam's knobs as settings. Unset ones keep the preset's or FlowAdam's default; set
    ones go into ``TrainConfig.optimizer_kwargs`` under FlowAdam's keyword (the field's
    ``serialization_alias`` where it differs from the name)."""

    preset: Annotated[str, AfterValidator(_preset_name)] | None = Field(
        "E", serialization_alias="mode",
        description="FlowAdam preset (its mode): E, everyday, at Adam's cost (one gradient evaluation a step, "
                    "noise-aware trigger); B, the paper's, with dopri5 (about 4.5 gradient evaluations a step): "
                    "--preset B; A, the paper's for networks. Sets the sensitivities, ode_t_scale, the trigger "
                    "rule, ode_method and warmup_steps")
    ode_method: Literal["dopri5", "euler", "heun", "rk4"] | None = Field(
        None, description="ODE solver: dopri5 (adaptive) or fixed-step")
    ode_steps: int | None = Field(None, ge=1, description="steps of a fixed-step ODE solver")
    ode_tol: float | None = Field(None, gt=0, allow_inf_nan=False, description="dopri5 tolerance (rtol = atol)")
    ode_clip: float | None = Field(None, gt=0, description="the flow follows the gradient clipped to [-c, c]")
    ode_t_scale: float | None = Field(None, gt=0, allow_inf_nan=False, description="ODE horizon T = lr * ode_t_scale")
    switch_sensitivity: float | None = Field(
        None, ge=0, description="plateau trigger: gradient norm below this times its EMA")
    curvature_sensitivity: float | None = Field(
        None, ge=0, description="stiff trigger: gradient change above this times its EMA")
    momentum_blend_gamma: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="gamma of the soft injection into Adam's first moment")
    injection: Literal["soft", "hard", "none"] | None = Field(
        None, description="how the flow's displacement enters Adam's first moment")
    warmup_steps: int | None = Field(None, ge=0, description="steps before the ODE branch may trigger")
    stat_beta: float | None = Field(None, ge=0, lt=1, description="EMA factor of the gradient norm statistics")


def default_reg(rating_std: float) -> float:
    """An unset reg's value for training ratings of standard deviation ``rating_std``: scaling
    the ratings by c scales the best factor weight by c (the loss by c^2, the factors by sqrt(c))."""
    return float(f"{TrainConfig.REG_PER_STD * max(rating_std, 1e-12):.3g}")


def _fields(*models: type) -> Mapping[str, tuple[type, FieldInfo]]:
    out: dict[str, tuple[type, FieldInfo]] = {}
    for model in models:
        for name, info in model.__pydantic_fields__.items():
            if name in out:
                raise TypeError(f"setting {name} is defined twice")
            out[name] = (model, info)
    return MappingProxyType(out)


# every setting: name -> (model, pydantic field); the order is data, training, FlowAdam
SETTINGS: Mapping[str, tuple[type, FieldInfo]] = _fields(DataConfig, TrainConfig, FlowAdamOptions)
# other names a recipe or the Python API may use for a setting
SETTING_ALIASES: Mapping[str, str] = MappingProxyType(
    {"memory_budget": "memory_budget_gb", "optimizer_options": "optimizer_kwargs"})


def canonical_name(key: str) -> str:
    """A setting's field name from a recipe key or keyword: dashes as underscores, aliases resolved."""
    name = key.replace("-", "_")
    return SETTING_ALIASES.get(name, name)


def flowadam_keyword(name: str) -> str | None:
    """The FlowAdam keyword a knob setting is passed as; None when ``name`` is not a knob."""
    model, info = SETTINGS.get(name, (None, None))
    if model is not FlowAdamOptions:
        return None
    return info.serialization_alias or name


@cache
def _adapter(name: str) -> TypeAdapter:
    info = SETTINGS[name][1]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(annotation, config=_STRICT)


def _explain(error: Mapping[str, Any], where: str | None) -> str:
    """One pydantic error as a sentence naming the setting (``where``) and the value given."""
    if error["type"] == "missing":
        return f"{where} is required"
    msg = re.sub(r"^\w+ should", "must", error["msg"]).removeprefix("Value error, ")
    if where is None:  # a rule across settings (__post_init__)
        return msg
    return f"{where} {msg} (got {error['input']!r})"


def check_setting(name: str, value: Any, where: str | None = None) -> Any:
    """``value`` validated (strict type, bounds) for setting ``name``; ConfigError naming
    ``where`` (default: the name) otherwise."""
    try:
        return _adapter(name).validate_python(value)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0], where or name)) from None


def merge_settings(target: dict[str, Any], values: Mapping[str, Any]) -> None:
    """Apply checked ``values`` (canonical names) over ``target`` in order: a plain setting
    replaces, a dict setting is updated key by key, a FlowAdam knob sets its keyword in
    ``optimizer_kwargs``. Dicts are copied, never changed in place."""
    for name, value in values.items():
        keyword = flowadam_keyword(name)
        if keyword is not None:
            target["optimizer_kwargs"] = {**target.get("optimizer_kwargs", {}), keyword: value}
        elif isinstance(value, dict):
            target[name] = {**target.get(name, {}), **value}
        else:
            target[name] = value


def _construct(model: type, values: Mapping[str, Any]) -> Any:
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError("; ".join(_explain(e, str(e["loc"][0]) if e["loc"] else None)
                                    for e in exc.errors())) from None


def build_configs(values: Mapping[str, Any]) -> tuple[TrainConfig, DataConfig]:
    """``(TrainConfig, DataConfig)`` from checked, merged settings (see :func:`merge_settings`);
    unset ones take the model's default. ConfigError for a missing dataset or a conflict."""
    parts: dict[type, dict[str, Any]] = {TrainConfig: {}, DataConfig: {}}
    for name, value in values.items():
        parts[SETTINGS[name][0]][name] = value
    return _construct(TrainConfig, parts[TrainConfig]), _construct(DataConfig, parts[DataConfig])


def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings, each checked and merged in order (see :func:`split_settings`)."""
    values: dict[str, Any] = {}
    for key, value in settings.items():
        name = canonical_name(key)
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting '{key}' (known: {', '.join(SETTINGS)})")
        merge_settings(values, {name: check_setting(name, value, where=key)})
    return values


def split_settings(settings: Mapping[str, Any]) -> tuple[TrainConfig, DataConfig]:
    """Flat settings (any field of TrainConfig, DataConfig or FlowAdamOptions, dashes or
    underscores, aliases of ``SETTING_ALIASES``) -> validated ``(TrainConfig, DataConfig)``.
    Later keys win; FlowAdam knobs go into ``optimizer_kwargs``. ConfigError (a ValueError)
    naming the key for an unknown, wrongly typed or out-of-bounds one.
    """
    return build_configs(_checked_settings(settings))


def training_config(settings: Mapping[str, Any]) -> TrainConfig:
    """The Python API's entry (``Recommender(**settings)``): the training settings and FlowAdam
    knobs of :func:`split_settings`, without the data settings (the data is given to ``fit``)."""
    data = [key for key in settings if SETTINGS.get(canonical_name(key), (None,))[0] is DataConfig]
    if data:
        raise ConfigError(f"{', '.join(data)}: data settings, not training settings; give the ratings to fit()")
    return _construct(TrainConfig, _checked_settings(settings))


def training_defaults() -> dict[str, Any]:
    """Every TrainConfig setting's default, by name (what an unset setting means)."""
    return TrainConfig().to_dict()
