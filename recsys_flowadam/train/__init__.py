"""Training: the configuration, the trainer loop, held-out metrics, checkpoints, recipes and exports.

Names are imported on first use, so that reading the configuration (``train.config``: the
``train`` command's flags and recipe checks) does not import torch: a bad flag is reported at
once, not after torch's start-up.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TrainConfig": "config", "Predictor": "metrics", "evaluate_predictor": "metrics", "rmse_mae": "metrics",
    "NonFiniteLossError": "trainer", "TrainResult": "trainer", "resolve_device": "trainer", "train_model": "trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
