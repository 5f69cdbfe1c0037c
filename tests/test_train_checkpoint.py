"""Training checkpoints: nested state round trips, and a failed write never harms the previous one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recsys_flowadam.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state(step: int) -> dict:
    return {
        "loop": {"step": step, "best": None, "history": [1.5, 2.5]},
        "optimizer": {"state": {0: {"exp_avg": torch.full((3,), float(step))}}, "param_groups": [{"lr": 0.01}]},
        "rng": (torch.arange(4, dtype=torch.uint8), "cpu"),
    }


def test_round_trip_of_nested_state(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(2, 3)}, _state(7))
    tensors, state = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(2, 3))
    assert state["loop"] == {"step": 7, "best": None, "history": [1.5, 2.5]}
    assert list(state["optimizer"]["state"]) == [0], "non-string keys survive"
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.full((3,), 7.0))
    assert isinstance(state["rng"], tuple) and state["rng"][1] == "cpu"


def test_overwrite_leaves_one_file(tmp_path: Path) -> None:
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, _state(1))
    save_checkpoint(path, {"w": torch.ones(2)}, _state(2))
    assert load_checkpoint(path)[1]["loop"]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.zeros(2)}, _state(1))
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(2)}, _state(2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"], "no temporary file left behind"
    assert load_checkpoint(path)[1]["loop"]["step"] == 1


def test_unsupported_value_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="type object"):
        save_checkpoint(tmp_path / "ck.safetensors", {}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
