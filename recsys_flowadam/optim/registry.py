"""Name -> optimizer constructor registry (the CLI's ``--optimizer`` uses it) and closure counting.

Baselines are the maintained implementations, not rewritten here: Adam, AdamW, SGD (momentum
0.9 unless given) and L-BFGS from torch; Lion and AdaBelief from ``pytorch_optimizer``. Adam and
AdamW are torch's classes with one change: with ``fused=True`` on a large CPU model their step
is a compiled pass on two threads (``optim.fused_adam``: the same update, to float rounding).
"flowadam" is FlowAdam with the everyday preset "E" unless ``mode`` is given (at Adam's cost:
one gradient evaluation per step); ``mode="B"`` is the paper's preset with dopri5.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = ["LAZY_ADAM", "OPTIMIZERS", "OptimizerEntry", "make_optimizer", "optimizer_names", "count_closure",
           "CountingClosure"]


LAZY_ADAM = "lazy-adam"  # the optimizer fused with its mini-batch step (optim.lazy_adam): the trainer asks for it


def _flowadam() -> type:
    from recsys_flowadam.optim.flowadam import FlowAdam

    return FlowAdam


def _lazy_adam() -> type:
    from recsys_flowadam.optim.lazy_adam import LazyAdam

    return LazyAdam


def _adam() -> type:
    from recsys_flowadam.optim.fused_adam import Adam

    return Adam


def _adamw() -> type:
    from recsys_flowadam.optim.fused_adam import AdamW

    return AdamW


def _lion() -> type:
    from pytorch_optimizer import Lion

    return Lion


def _adabelief() -> type:
    from pytorch_optimizer import AdaBelief

    return AdaBelief


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one optimizer: its class (resolved lazily) and defaults we add to torch's."""

    load: Callable[[], type]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def cls(self) -> type:
        return self.load()

    def accepted_kwargs(self) -> set[str]:
        """Named constructor arguments (``**kwargs`` catch-alls do not count: they would
        silently swallow misspelt options)."""
        sig = inspect.signature(self.cls.__init__)
        return {
            name
            for name, prm in sig.parameters.items()
            if name not in ("self", "params") and prm.kind not in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL)
        }


OPTIMIZERS: Mapping[str, OptimizerEntry] = MappingProxyType(
    {
        # train, the Python API and make_optimizer get the everyday preset E unless given a mode;
        # the FlowAdam class itself keeps the paper's preset B as its default (reproduce pins B).
        "flowadam": OptimizerEntry(
            _flowadam, {"mode": "E"}, "FlowAdam (this package), everyday preset E by default; mode='B': the paper's"
        ),
        "adam": OptimizerEntry(_adam, {}, "torch.optim.Adam (fused=True on a large CPU model: optim.fused_adam)"),
        "adamw": OptimizerEntry(_adamw, {}, "torch.optim.AdamW (fused=True on a large CPU model: optim.fused_adam)"),
        LAZY_ADAM: OptimizerEntry(_lazy_adam, {}, "Adam on the rows a mini-batch touches, fused with its gradient "
                                                    "(CPU, mf/biased-mf; optim.lazy_adam)"),
        "sgd": OptimizerEntry(lambda: torch.optim.SGD, {"momentum": 0.9}, "torch.optim.SGD, momentum 0.9"),
        "lbfgs": OptimizerEntry(lambda: torch.optim.LBFGS, {}, "torch.optim.LBFGS"),
        "lion": OptimizerEntry(_lion, {}, "pytorch_optimizer.Lion"),
        "adabelief": OptimizerEntry(_adabelief, {}, "pytorch_optimizer.AdaBelief"),
    }
)


def optimizer_names() -> list[str]:
    """The registered names, in registry order."""
    return list(OPTIMIZERS)


def make_optimizer(name: str, params: Iterable[Any], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` (case-insensitive) with learning rate ``lr``.

    Raises ValueError for an unknown name (listing the valid ones) or for keyword arguments
    the optimizer does not take (naming them).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    entry = OPTIMIZERS[key]
    unknown = sorted(set(kwargs) - entry.accepted_kwargs())
    if unknown:
        raise ValueError(f"optimizer {key!r} does not take {', '.join(unknown)}")
    return entry.cls(params, lr=lr, **{**entry.defaults, **kwargs})


class CountingClosure:
    """Wraps a closure and counts its calls (= gradient evaluations), for every optimizer.

    ``opt.step(counted)`` then ``counted.calls``; L-BFGS's line search and FlowAdam's ODE
    stages are counted like any other call.
    """

    def __init__(self, closure: Callable[[], Any]) -> None:
        self.closure = closure
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.closure()


def count_closure(closure: Callable[[], Any]) -> CountingClosure:
    """Return ``closure`` wrapped so that ``.calls`` counts its evaluations."""
    return CountingClosure(closure)
