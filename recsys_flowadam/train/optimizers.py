"""Building optimizers and reading their diagnostics, for every optimizer alike.

Gradient evaluations are counted with ``recsys_flowadam.optim.CountingClosure`` around the
trainer's closure, so FlowAdam's ODE stages and L-BFGS's line search count like Adam's call.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from recsys_flowadam.optim import CountingClosure

__all__ = ["CountingClosure", "build_optimizer", "optimizer_diagnostics"]


def build_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer registered as ``name`` in ``recsys_flowadam.optim`` (FlowAdam and the baselines)."""
    from recsys_flowadam.optim import make_optimizer

    return make_optimizer(name, list(params), lr, **kwargs)


def optimizer_diagnostics(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """FlowAdam's ``diagnostics()`` where the optimizer has it, else an empty dict; with the
    preset it ran (``mode``), which the artifact would not show when the default was taken."""
    diag = getattr(opt, "diagnostics", None)
    if callable(diag):
        out = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in diag().items()}
        if "mode" in opt.defaults:
            out["preset"] = opt.defaults["mode"]
        return out
    return {}
