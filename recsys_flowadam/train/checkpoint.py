"""Training checkpoints: one safetensors file, tensors plus a JSON state in its header.

One file means one atomic replacement (``safe_write.atomic_write``): a checkpoint is either
the previous one or the new one, never half written. Nested state (the optimizer's
``state_dict``, the trainer's counters, the RNG state) is split into tensors (stored as
safetensors) and a JSON skeleton with ``{"__tensor__": key}`` placeholders; no pickle is involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from recsys_flowadam.safe_write import atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "recsys-flowadam-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or belongs to a different run."""


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able skeleton of ``obj``; its tensors go into ``tensors`` under ``prefix``-derived keys."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": [[k, encode_state(v, tensors, prefix)] for k, v in obj.items()]}
        return {"__dict__": [[k, encode_state(v, tensors, prefix)] for k, v in obj.items()], "__keys__": "mixed"}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a value of type {type(obj).__name__} ({prefix})")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: decode_state(v, tensors) for k, v in obj["__dict__"]}
        raise CheckpointError("corrupt checkpoint state: unexpected object")
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write tensors + JSON state atomically and durably (:func:`~recsys_flowadam.safe_write.atomic_write`)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    skeleton = encode_state(state, all_tensors, "state")
    data = save(all_tensors, metadata={"format": FORMAT, "state": json.dumps(skeleton)})
    return atomic_write(path, lambda fh: fh.write(data), fsync=True)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, state)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"{path}: not a recsys-flowadam checkpoint (format {meta.get('format')!r})")
    try:
        state = decode_state(json.loads(meta["state"]), tensors)
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint state ({exc})") from None
    return tensors, state
