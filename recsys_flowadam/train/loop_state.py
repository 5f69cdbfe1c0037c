"""The training loop's state, and exactly what a checkpoint saves of a run.

A checkpoint holds the :class:`LoopState` (as a dict, under ``"loop"``), the current and the
best parameters, the optimizer's ``state_dict``, the shuffle generator's state at the start of
the current epoch and a fingerprint of the run (the config, less the fields a resumption may
change, and a digest of the training data). Resuming restores all of it, so a resumed run
ends with exactly the numbers of an uninterrupted one; a checkpoint whose fingerprint
differs is refused.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from recsys_flowadam.data.ratings import Ratings
from recsys_flowadam.safe_write import json_safe
from recsys_flowadam.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recsys_flowadam.train.config import TrainConfig

# config fields that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "device")


@dataclass
class LoopState:
    """Everything the loop counts and decides; saved verbatim in every checkpoint.

    ``epoch``/``batch_pos``: completed passes and the next batch of the current one;
    ``loss_sum``/``loss_count``: training losses since the last history record;
    ``best_val``/``best_step``/``bad_evals``: the early-stopping record;
    ``elapsed``: training seconds so far; ``checkpoint_step``: the step of the last checkpoint.
    """

    step: int = 0
    grad_evals: int = 0
    best_val: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    batch_pos: int = 0
    epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    checkpoint_step: int | None = None

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The state a checkpoint's ``"loop"`` dict describes (absent fields keep their defaults)."""
        unknown = set(saved) - {f.name for f in fields(cls)}
        if unknown:
            raise CheckpointError(f"corrupt checkpoint state: unknown loop fields {sorted(unknown)}")
        return cls(**saved)


def data_digest(train: Ratings) -> str:
    """SHA-256 of the training ratings' indices, values (and contexts): which ratings a run fits."""
    digest = hashlib.sha256()
    for array in (train.users, train.items, train.values, train.contexts):
        if array is not None:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def fingerprint(config: TrainConfig, train: Ratings, world_size: int = 1,
                data_identity: Mapping[str, Any] | None = None,
                resolved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the config (less ``RESUMABLE_CHANGES``),
    with ``resolved`` (what the run made of it: the initial factors' std, the way mini-batches
    are drawn, which a change of device can change) over it, the world size when distributed
    (the partition and batch order depend on it), and the data: what names it
    (``data_identity``: dataset, split spec, options), its source files' hashes, its sizes and a
    digest of the training ratings themselves."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES} | dict(resolved or {})
    if world_size > 1:
        cfg["world_size"] = world_size
    data = {**json_safe(dict(data_identity or {})), "source_files": dict(train.source_files),
            "n_train": len(train), "n_users": train.n_users, "n_items": train.n_items,
            "ratings_sha256": data_digest(train)}
    return {"config": cfg, "data": data}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, for the refusal message."""
    parts = []
    for section, label in (("config", "config fields"), ("data", "data")):
        a, b = old.get(section) or {}, new.get(section) or {}
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            shown = [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" if k in ("dataset", "split", "n_train", "n_users",
                     "n_items") else k for k in keys]
            parts.append(f"{label}: {', '.join(shown)}")
    return "; ".join(parts) or "an older checkpoint format"


@dataclass
class Snapshot:
    """One checkpoint's content, apart from the fingerprint."""

    loop: LoopState
    params: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    shuffle_state: torch.Tensor


def save_snapshot(path: Path, snap: Snapshot, fp: dict[str, Any]) -> None:
    """Write ``snap`` and the run's fingerprint ``fp`` as one checkpoint file."""
    tensors = {f"param.{k}": p for k, p in snap.params.items()}
    if snap.best is not None:
        tensors.update({f"best.{k}": b for k, b in snap.best.items()})
    save_checkpoint(path, tensors, {"fingerprint": fp, "loop": asdict(snap.loop), "has_best": snap.best is not None,
                                    "optimizer": snap.optimizer, "shuffle_state": snap.shuffle_state})


def load_snapshot(path: Path | None, fp: dict[str, Any], names: list[str]) -> Snapshot:
    """Read the checkpoint at ``path`` (parameters ``names``, on the CPU as stored); refuses a
    missing file and one written by a run with another fingerprint than ``fp``."""
    if path is None or not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    tensors, saved = load_checkpoint(path)
    if saved.get("fingerprint") != fp:
        raise CheckpointError(f"{path}: checkpoint belongs to a different run; what differs: "
                              f"{_differences(saved.get('fingerprint') or {}, fp)}")
    best = {k: tensors[f"best.{k}"] for k in names} if saved["has_best"] else None
    return Snapshot(loop=LoopState.from_dict(saved["loop"]), params={k: tensors[f"param.{k}"] for k in names},
                    best=best, optimizer=saved["optimizer"], shuffle_state=saved["shuffle_state"])


@dataclass
class Checkpointer:
    """Where and when the loop writes checkpoints: every ``every`` steps (0: never), and only
    where ``writes`` (rank 0). ``path`` is known on every rank, for the errors' resume hints."""

    path: Path | None
    every: int
    writes: bool
    fingerprint: dict[str, Any]

    def due(self, step: int) -> bool:
        return self.writes and self.path is not None and bool(self.every) and step % self.every == 0

    def last_good(self, state: LoopState) -> tuple[Path | None, int | None]:
        """``(path, step)`` of the last checkpoint this run wrote or resumed from, else ``(None, None)``."""
        return (self.path if state.checkpoint_step else None), state.checkpoint_step

    def save(self, snap: Snapshot) -> None:
        """Record the step in ``snap.loop`` (so the file names itself), then write it."""
        assert self.path is not None
        snap.loop.checkpoint_step = snap.loop.step
        save_snapshot(self.path, snap, self.fingerprint)

    def load(self, names: list[str]) -> Snapshot:
        return load_snapshot(self.path, self.fingerprint, names)
