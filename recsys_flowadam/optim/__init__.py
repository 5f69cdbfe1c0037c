"""Optimizers: FlowAdam (Adam with a clipped-gradient-flow ODE branch) and the baselines.

``make_optimizer(name, params, lr, **kwargs)`` builds any registered optimizer;
``count_closure`` wraps a closure to count gradient evaluations for every optimizer.
"""

from recsys_flowadam.optim.flowadam import FlowAdam, PRESETS
from recsys_flowadam.optim.registry import (
    OPTIMIZERS,
    CountingClosure,
    count_closure,
    make_optimizer,
    optimizer_names,
)

__all__ = [
    "FlowAdam",
    "PRESETS",
    "OPTIMIZERS",
    "CountingClosure",
    "count_closure",
    "make_optimizer",
    "optimizer_names",
]
