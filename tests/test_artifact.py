"""Artifact format v1: round trips, atomic replacement, and every kind of corruption."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from recsys_flowadam.artifact import files as artifact_files
from recsys_flowadam.artifact import (
    SCHEMA_VERSION,
    ArtifactError,
    ArtifactMeta,
    load_artifact,
    save_artifact,
)


def make_parts(model_type: str = "biased-mf", n_users: int = 6, n_items: int = 9, rank: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    tensors = {
        "user_factors": rng.normal(size=(n_users, rank)).astype(np.float32),
        "item_factors": rng.normal(size=(n_items, rank)).astype(np.float32),
        "train_indptr": np.array([0, 2, 2, 5, 6, 8, 9][: n_users + 1], dtype=np.int64),
        "train_items": np.array([0, 3, 1, 2, 8, 4, 0, 7, 5], dtype=np.int64),
    }
    if model_type in ("biased-mf", "cp"):
        tensors["user_bias"] = rng.normal(size=n_users).astype(np.float32)
        tensors["item_bias"] = rng.normal(size=n_items).astype(np.float32)
    if model_type == "cp":
        tensors["context_factors"] = rng.normal(size=(4, rank)).astype(np.float32)
    meta = {
        "model_type": model_type,
        "rank": rank,
        "n_users": n_users,
        "n_items": n_items,
        "n_contexts": 4 if model_type == "cp" else 0,
        "dataset": {"name": "ml-100k", "source_files": {"u.data": "ab" * 32}, "split": "u1", "seed": 7},
        "rating_scale": {"min": 1.0, "max": 5.0},
        "global_mean": 3.5,
        "prediction_offset": 3.5 if model_type != "mf" else 0.0,
        "user_ids": [str(100 + u) for u in range(n_users)],
        "item_ids": [f"item-{i}" for i in range(n_items)],
        "item_titles": [f"Title {i}" if i % 3 else None for i in range(n_items)],
        "train_config": {"epochs": 3, "lr": 0.01},
        "optimizer": {"name": "flowadam", "params": {"lr": 0.01}, "diagnostics": {"steps": 30}},
        "metrics": {"val_rmse": 0.95, "test_rmse": 0.97},
    }
    return tensors, meta


@pytest.mark.parametrize("model_type", ["mf", "biased-mf", "cp"])
def test_round_trip(tmp_path: Path, model_type: str) -> None:
    tensors, meta = make_parts(model_type)
    path = save_artifact(tmp_path / "model", tensors, meta)
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]
    # readable by a service running as another user
    assert {oct(p.stat().st_mode & 0o777) for p in [path, *path.iterdir()]} <= {"0o755", "0o644"}
    art = load_artifact(path)
    assert art.path == path
    assert set(art.tensors) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(art.tensors[name], value)
        assert art.tensors[name].dtype == value.dtype
        assert not art.tensors[name].flags.writeable, f"{name} must be read-only"
    assert isinstance(art.tensors["user_factors"], np.memmap)
    m = art.meta
    assert m.schema_version == SCHEMA_VERSION and m.model_type == model_type
    assert m.user_ids == meta["user_ids"] and m.item_ids == meta["item_ids"]
    assert m.item_titles == meta["item_titles"]
    assert m.metrics == meta["metrics"] and m.optimizer.diagnostics == {"steps": 30}
    assert m.created_at.utcoffset().total_seconds() == 0
    assert m.versions.numpy == np.__version__
    # the JSON file itself is the documented schema (no pickle, no extra keys)
    on_disk = json.loads((path / "model.json").read_text())
    assert set(on_disk) == set(ArtifactMeta.model_fields)
    assert ArtifactMeta.model_validate(on_disk) == m


def test_torch_tensors_and_meta_object(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensors, meta = make_parts("biased-mf")
    first = save_artifact(tmp_path / "a", tensors, meta)
    meta_obj = load_artifact(first).meta
    torch_tensors = {k: torch.from_numpy(v.copy()).requires_grad_(v.dtype == np.float32) for k, v in tensors.items()}
    second = save_artifact(tmp_path / "b", torch_tensors, meta_obj)
    art = load_artifact(second)
    np.testing.assert_array_equal(art.tensors["item_factors"], tensors["item_factors"])
    assert art.meta == meta_obj


def test_replace_existing_artifact(tmp_path: Path) -> None:
    tensors, meta = make_parts("mf", seed=1)
    target = save_artifact(tmp_path / "model", tensors, meta)
    tensors2, meta2 = make_parts("cp", seed=2)
    save_artifact(target, tensors2, meta2)
    art = load_artifact(target)
    assert art.meta.model_type == "cp"
    np.testing.assert_array_equal(art.tensors["user_factors"], tensors2["user_factors"])
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no temporary folders left behind"


def test_replace_without_rename_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact_files, "_exchange", lambda a, b: False)
    tensors, meta = make_parts("mf", seed=1)
    target = save_artifact(tmp_path / "model", tensors, meta)
    tensors2, meta2 = make_parts("biased-mf", seed=3)
    save_artifact(target, tensors2, meta2)
    assert load_artifact(target).meta.model_type == "biased-mf"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_old_model_survives_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors, meta = make_parts("mf")
    target = save_artifact(tmp_path / "model", tensors, meta)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(target, *make_parts("biased-mf"))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_load_during_replacement_never_mixes_two_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is replaced after load_artifact read model.json but before it read the tensors:
    the result must still be one artifact (json and tensors from the same save), never a mix."""
    tensors, meta = make_parts("mf")
    target = tmp_path / "model"

    def version(k: int):
        return {**tensors, "user_factors": np.full_like(tensors["user_factors"], k)}, {**meta, "train_config": {"tag": k}}

    save_artifact(target, *version(1))
    real_validate = ArtifactMeta.model_validate.__func__
    swaps = []

    def validate_then_swap(cls, data, *args, **kwargs):
        result = real_validate(cls, data, *args, **kwargs)
        if not swaps and data.get("train_config") == {"tag": 1}:
            swaps.append(True)
            monkeypatch.undo()  # the save below validates its own metadata normally
            save_artifact(target, *version(2))
        return result

    monkeypatch.setattr(ArtifactMeta, "model_validate", classmethod(validate_then_swap))
    art = load_artifact(target)
    assert swaps, "the replacement happened mid-load"
    tag = art.meta.train_config["tag"]
    assert (np.asarray(art.tensors["user_factors"]) == tag).all(), "json and tensors from different saves"


def test_refuses_to_replace_a_file(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("not a folder")
    with pytest.raises(ArtifactError, match="not a folder"):
        save_artifact(tmp_path / "model", *make_parts())
    assert (tmp_path / "model").read_text() == "not a folder"


def test_refuses_a_folder_holding_other_files(tmp_path: Path) -> None:
    """A user's own files are never swapped away: only an earlier artifact is replaced."""
    target = tmp_path / "paper"
    (target / "notes").mkdir(parents=True)
    (target / "paper.tex").write_text("\\section{Results}")
    (target / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"not an artifact's \(notes/, paper.tex\)"):
        save_artifact(target, *make_parts())
    assert (target / "paper.tex").read_text() == "\\section{Results}"
    assert (target / "notes" / "a.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper"], "nothing written beside it"


def test_replaces_an_artifact_with_its_companions_and_an_empty_folder(tmp_path: Path) -> None:
    target = save_artifact(tmp_path / "model", *make_parts("mf", seed=1))
    (target / "metrics.jsonl").write_text("{}\n")
    (target / ".metrics.jsonl.abc123.tmp").write_text("left by a killed write")
    with pytest.raises(ArtifactError, match="metrics.jsonl"):
        save_artifact(target, *make_parts("biased-mf", seed=2))  # not declared a companion
    save_artifact(target, *make_parts("biased-mf", seed=2), companions=("metrics.jsonl",))
    assert load_artifact(target).meta.model_type == "biased-mf"
    (tmp_path / "empty").mkdir()
    assert load_artifact(save_artifact(tmp_path / "empty", *make_parts())).meta.n_users == 6


def test_refuses_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_flowadam.artifact import check_artifact_target

    inner = tmp_path / "work"
    inner.mkdir()
    monkeypatch.chdir(inner)
    for target in (Path("."), inner, tmp_path):
        with pytest.raises(ArtifactError, match="current folder"):
            save_artifact(target, *make_parts())
    assert list(inner.iterdir()) == []
    assert check_artifact_target("sub") == inner / "sub"


# -- save refuses inconsistent input (and writes nothing) ---------------------------------------


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


SAVE_CASES = {
    "wrong shape": (lambda t, m: ({**t, "user_factors": t["user_factors"][:, :2]}, m), r"'user_factors'.*shape"),
    "wrong dtype": (lambda t, m: ({**t, "item_factors": t["item_factors"].astype(np.float64)}, m), r"'item_factors'.*dtype float64"),
    "missing tensor": (lambda t, m: (_drop(t, "item_bias"), m), r"'item_bias' is missing"),
    "unknown tensor": (lambda t, m: ({**t, "extra": t["user_bias"]}, m), r"unexpected tensor.*extra"),
    "nan factors": (lambda t, m: ({**t, "user_factors": np.full_like(t["user_factors"], np.nan)}, m), r"'user_factors'.*NaN"),
    "bad indptr": (lambda t, m: ({**t, "train_indptr": t["train_indptr"][::-1].copy()}, m), r"'train_indptr'"),
    "item out of range": (lambda t, m: ({**t, "train_items": t["train_items"] + 5}, m), r"'train_items'.*outside"),
    "ids length": (lambda t, m: (t, {**m, "user_ids": m["user_ids"][:-1]}), r"user_ids has 5 entries"),
    "duplicate ids": (lambda t, m: (t, {**m, "item_ids": ["x"] * m["n_items"]}), r"item_ids contains duplicate"),
    "titles length": (lambda t, m: (t, {**m, "item_titles": ["a"]}), r"item_titles has 1"),
    "unknown field": (lambda t, m: (t, {**m, "colour": "red"}), r"field 'colour'.*Extra inputs"),
    "missing field": (lambda t, m: (t, _drop(m, "global_mean")), r"field 'global_mean'.*required"),
    "bad model type": (lambda t, m: (t, {**m, "model_type": "svd"}), r"field 'model_type'"),
    "contexts for mf": (lambda t, m: (t, {**m, "n_contexts": 2}), r"n_contexts"),
    "bad scale": (lambda t, m: (t, {**m, "rating_scale": {"min": 5, "max": 1}}), r"rating_scale"),
    "naive time": (lambda t, m: (t, {**m, "created_at": "2026-01-01T00:00:00"}), r"created_at"),
    "future schema": (lambda t, m: (t, {**m, "schema_version": 2}), r"schema_version"),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_save_rejects(tmp_path: Path, case: str) -> None:
    mutate, pattern = SAVE_CASES[case]
    tensors, meta = mutate(*make_parts("biased-mf"))
    with pytest.raises(ArtifactError, match=pattern) as info:
        save_artifact(tmp_path / "model", tensors, meta)
    assert str(tmp_path / "model") in str(info.value)
    assert list(tmp_path.iterdir()) == [], "nothing may be written for invalid input"


def test_cp_biases_both_or_neither(tmp_path: Path) -> None:
    tensors, meta = make_parts("cp")
    save_artifact(tmp_path / "nobias", _drop(_drop(tensors, "user_bias"), "item_bias"), meta)
    with pytest.raises(ArtifactError, match="both be present"):
        save_artifact(tmp_path / "half", _drop(tensors, "user_bias"), meta)


# -- load detects corruption ------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_artifact(tmp_path / "model", *make_parts("biased-mf"))


def _edit_json(path: Path, change) -> None:
    data = json.loads((path / "model.json").read_text())
    change(data)
    (path / "model.json").write_text(json.dumps(data))


def _rewrite_tensors(path: Path, change) -> None:
    tensors = {k: v.copy() for k, v in load_file(path / "model.safetensors").items()}
    change(tensors)
    save_file(tensors, path / "model.safetensors")


LOAD_CASES = {
    "no model.json": (lambda p: (p / "model.json").unlink(), r"model.json is missing"),
    "no tensors": (lambda p: (p / "model.safetensors").unlink(), r"model.safetensors is missing"),
    "json syntax": (lambda p: (p / "model.json").write_text('{"schema_version": 1,'), r"model.json is not valid JSON \(line 1"),
    "json not object": (lambda p: (p / "model.json").write_text("[1, 2]"), r"must hold a JSON object"),
    "json binary": (lambda p: (p / "model.json").write_bytes(b"\xff\xfe\x00"), r"model.json cannot be read"),
    "schema version": (lambda p: _edit_json(p, lambda d: d.update(schema_version=2)), r"'schema_version' is 2"),
    "no schema version": (lambda p: _edit_json(p, lambda d: d.pop("schema_version")), r"'schema_version' is None"),
    "extra field": (lambda p: _edit_json(p, lambda d: d.update(pickle="x")), r"model.json: field 'pickle'"),
    "nested extra": (lambda p: _edit_json(p, lambda d: d["dataset"].update(x=1)), r"field 'dataset.x'"),
    "wrong field type": (lambda p: _edit_json(p, lambda d: d.update(rank="three")), r"field 'rank'"),
    "meta/tensor mismatch": (lambda p: _edit_json(p, lambda d: d.update(rank=4)), r"'user_factors' has shape \(6, 3\), expected \(6, 4\)"),
    "truncated tensors": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-20]),
        r"model.safetensors: not a valid safetensors file",
    ),
    "garbage tensors": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 3), r"not a valid safetensors"),
    "huge header": (
        lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
        r"not a valid safetensors",
    ),
    "float64 tensor": (
        lambda p: _rewrite_tensors(p, lambda t: t.update(user_bias=t["user_bias"].astype(np.float64))),
        r"'user_bias' has dtype F64",
    ),
    "int32 indices": (
        lambda p: _rewrite_tensors(p, lambda t: t.update(train_items=t["train_items"].astype(np.int32))),
        r"'train_items' has dtype I32",
    ),
    "missing tensor": (lambda p: _rewrite_tensors(p, lambda t: t.pop("item_bias")), r"'item_bias' is missing"),
    "extra tensor": (lambda p: _rewrite_tensors(p, lambda t: t.update(secret=t["item_bias"])), r"unexpected tensor.*secret"),
    "wrong shape": (
        lambda p: _rewrite_tensors(p, lambda t: t.update(item_factors=t["item_factors"].T.copy())),
        r"'item_factors' has shape \(3, 9\)",
    ),
    "inf values": (
        lambda p: _rewrite_tensors(p, lambda t: t["item_bias"].__setitem__(0, np.inf)),
        r"'item_bias' contains NaN or infinite",
    ),
    "indptr end": (
        lambda p: _rewrite_tensors(p, lambda t: t["train_indptr"].__setitem__(-1, 3)),
        r"'train_indptr' is not a CSR row pointer",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_rejects(saved: Path, case: str) -> None:
    corrupt, pattern = LOAD_CASES[case]
    corrupt(saved)
    with pytest.raises(ArtifactError, match=pattern) as info:
        load_artifact(saved)
    assert str(saved) in str(info.value), "the message names the folder"


def test_load_refuses_a_fifo_or_device_in_place_of_model_json(tmp_path: Path) -> None:
    import os

    target = save_artifact(tmp_path / "model", *make_parts())
    (target / "model.json").unlink()
    os.mkfifo(target / "model.json")  # opening it for reading would block forever
    with pytest.raises(ArtifactError, match="model.json is not a regular file"):
        load_artifact(target)
    (target / "model.json").unlink()
    (target / "model.json").symlink_to("/dev/zero")
    with pytest.raises(ArtifactError, match="model.json is not a regular file"):
        load_artifact(target)


def test_a_rating_scale_beyond_float32_is_refused(tmp_path: Path) -> None:
    tensors, meta = make_parts()
    meta["rating_scale"] = {"min": -1e308, "max": 1e308}
    with pytest.raises(ArtifactError, match="rating_scale must lie within"):
        save_artifact(tmp_path / "model", tensors, meta)


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nowhere")


def test_empty_training_set_loads(tmp_path: Path) -> None:
    tensors, meta = make_parts("mf")
    tensors["train_indptr"] = np.zeros(meta["n_users"] + 1, np.int64)
    tensors["train_items"] = np.zeros(0, np.int64)
    art = load_artifact(save_artifact(tmp_path / "m", tensors, meta))
    assert art.tensors["train_items"].shape == (0,)


def test_train_csr_compiled_and_sorted_agree_on_every_row():
    from recsys_flowadam.data.ratings import Ratings, RatingScale
    from recsys_flowadam.models import fused_cpu
    from recsys_flowadam.train import export

    rng = np.random.default_rng(3)
    cells = rng.choice(40 * 30, size=500, replace=False)  # distinct pairs; users 37..39 and some items unrated
    users, items = cells // 30, cells % 30
    keep = users < 37
    ratings = Ratings(name="t", users=users[keep], items=items[keep], values=np.ones(int(keep.sum()), np.float32),
                      user_ids=np.array([str(k) for k in range(40)], dtype=object),
                      item_ids=np.array([str(k) for k in range(30)], dtype=object), scale=RatingScale(1, 5))
    indptr, indices = export.train_csr(ratings)
    assert indptr[0] == 0 and indptr[-1] == len(ratings) and (np.diff(indptr)[37:] == 0).all()
    for u in range(40):
        row = indices[indptr[u]:indptr[u + 1]]
        assert row.tolist() == sorted(ratings.items[ratings.users == u].tolist())
    if fused_cpu.available():  # the compiled pass and the key sort give the same arrays
        from recsys_flowadam.models.fused_kernels import csr_of_pairs

        width = 30
        keys = np.sort(ratings.users * width + ratings.items)
        assert np.array_equal(indices, keys % width) and indices.dtype == np.int64
        with pytest.raises(IndexError, match="outside"):
            csr_of_pairs(np.array([40]), np.array([0]), 40, 30)
        import unittest.mock as mock

        with mock.patch.object(fused_cpu, "available", lambda: False):  # the key sort, as without numba
            sorted_indptr, sorted_indices = export.train_csr(ratings)
        assert np.array_equal(sorted_indptr, indptr) and np.array_equal(sorted_indices, indices)
