"""Trained-model artifacts (format v1): one folder holding ``model.safetensors`` + ``model.json``.

The trainer writes artifacts with :func:`save_artifact`; ``evaluate`` and the HTTP service read
them with :func:`load_artifact`. No pickle is involved anywhere: tensors are safetensors, metadata
is JSON validated by a pydantic model that rejects unknown fields.

Writes are atomic: the folder is built as a hidden temporary sibling and renamed into place, and
an existing artifact is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` call
where the platform offers it, so a reader sees either the old or the new artifact, never a
half-written one. Loading memory-maps the tensors read-only, so several server worker processes
share one copy of the factors in the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import platform
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
MODEL_TENSORS = "model.safetensors"

_FLOAT_TENSORS = ("user_factors", "item_factors", "user_bias", "item_bias", "context_factors")
# safetensors dtype tag -> numpy dtype (little-endian, as the format prescribes).
_ST_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


class ArtifactError(ValueError):
    """An artifact folder is missing, unreadable or inconsistent; the message names folder, file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetInfo(_Strict):
    """Which data the model was trained on (source file checksums make it reproducible)."""

    name: str
    source_files: dict[str, str] = Field(default_factory=dict)
    split: str
    seed: int


class RatingScaleInfo(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> "RatingScaleInfo":
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"rating_scale needs finite min < max, got min={self.min}, max={self.max}")
        return self


class OptimizerInfo(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    diagnostics: dict[str, Any] = Field(default_factory=dict)


class VersionsInfo(_Strict):
    recsys_flowadam: str
    torch: str
    numpy: str
    python: str


class ArtifactMeta(_Strict):
    """The ``model.json`` schema (format v1); unknown fields are an error."""

    schema_version: int
    model_type: Literal["mf", "biased-mf", "cp"]
    rank: int = Field(ge=1)
    n_users: int = Field(ge=1)
    n_items: int = Field(ge=1)
    n_contexts: int = Field(default=0, ge=0)
    dataset: DatasetInfo
    rating_scale: RatingScaleInfo
    global_mean: float
    prediction_offset: float
    user_ids: list[str]
    item_ids: list[str]
    item_titles: list[str | None] | None = None
    train_config: dict[str, Any] = Field(default_factory=dict)
    optimizer: OptimizerInfo
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: VersionsInfo
    created_at: datetime

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this version reads {SCHEMA_VERSION}")
        return v

    @field_validator("global_mean", "prediction_offset")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a UTC offset (ISO-8601, e.g. 2026-01-01T00:00:00Z)")
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> "ArtifactMeta":
        for name, ids, n in (("user_ids", self.user_ids, self.n_users), ("item_ids", self.item_ids, self.n_items)):
            if len(ids) != n:
                raise ValueError(f"{name} has {len(ids)} entries but n_{name[:-4]}s is {n}")
            if len(set(ids)) != n:
                raise ValueError(f"{name} contains duplicate IDs")
        if self.item_titles is not None and len(self.item_titles) != self.n_items:
            raise ValueError(f"item_titles has {len(self.item_titles)} entries but n_items is {self.n_items}")
        if (self.model_type == "cp") != (self.n_contexts > 0):
            raise ValueError(f"n_contexts must be > 0 exactly for model_type 'cp' (got {self.n_contexts} for '{self.model_type}')")
        if not self.rating_scale.min <= self.global_mean <= self.rating_scale.max:
            raise ValueError(f"global_mean {self.global_mean} lies outside the rating scale")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its folder, validated metadata and read-only (memory-mapped) tensors."""

    path: Path
    meta: ArtifactMeta
    tensors: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# validation shared by save and load


def expected_tensors(meta: ArtifactMeta) -> dict[str, tuple[np.dtype, tuple[int, ...] | None]]:
    """Required tensors: name -> (dtype, shape); shape None means 1-D of any length (train_items)."""
    f32, i64 = np.dtype("<f4"), np.dtype("<i8")
    out: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
        "user_factors": (f32, (meta.n_users, meta.rank)),
        "item_factors": (f32, (meta.n_items, meta.rank)),
        "train_indptr": (i64, (meta.n_users + 1,)),
        "train_items": (i64, None),
    }
    if meta.model_type == "biased-mf":
        out["user_bias"] = (f32, (meta.n_users,))
        out["item_bias"] = (f32, (meta.n_items,))
    if meta.model_type == "cp":
        out["context_factors"] = (f32, (meta.n_contexts, meta.rank))
    return out


def _check_tensors(where: str, meta: ArtifactMeta, tensors: Mapping[str, np.ndarray]) -> None:
    """Every tensor's name, dtype, shape and content against the metadata; ArtifactError otherwise."""
    expected = expected_tensors(meta)
    optional = {}
    if meta.model_type == "cp":  # cp may carry biases (both or neither)
        optional = {"user_bias": (np.dtype("<f4"), (meta.n_users,)), "item_bias": (np.dtype("<f4"), (meta.n_items,))}
        has = [k in tensors for k in optional]
        if any(has) and not all(has):
            raise ArtifactError(f"{where}: tensors user_bias and item_bias must both be present or both absent")
    allowed = {**expected, **optional}
    unknown = sorted(set(tensors) - set(allowed))
    if unknown:
        raise ArtifactError(f"{where}: unexpected tensor(s) {unknown} for model_type '{meta.model_type}'")
    for name, (dtype, shape) in allowed.items():
        if name not in tensors:
            if name in expected:
                raise ArtifactError(f"{where}: tensor '{name}' is missing (required for model_type '{meta.model_type}')")
            continue
        arr = tensors[name]
        if arr.dtype != dtype:
            raise ArtifactError(f"{where}: tensor '{name}' has dtype {arr.dtype}, expected {dtype.name}")
        if shape is None:
            if arr.ndim != 1:
                raise ArtifactError(f"{where}: tensor '{name}' has shape {arr.shape}, expected 1-D")
        elif arr.shape != shape:
            raise ArtifactError(f"{where}: tensor '{name}' has shape {tuple(arr.shape)}, expected {shape}")
        if name in _FLOAT_TENSORS and not np.isfinite(arr).all():
            raise ArtifactError(f"{where}: tensor '{name}' contains NaN or infinite values")
    indptr, items = tensors["train_indptr"], tensors["train_items"]
    if indptr[0] != 0 or indptr[-1] != items.shape[0] or (np.diff(indptr) < 0).any():
        raise ArtifactError(
            f"{where}: tensor 'train_indptr' is not a CSR row pointer for {items.shape[0]} train_items "
            "(must start at 0, never decrease, end at len(train_items))"
        )
    if items.size and (items.min() < 0 or items.max() >= meta.n_items):
        raise ArtifactError(f"{where}: tensor 'train_items' holds item indices outside [0, {meta.n_items})")


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ArtifactError(f"tensor '{name}' must be a numpy array or torch tensor, got {type(value).__name__}")
    return np.ascontiguousarray(value)


def _default_versions() -> dict[str, str]:
    from recsys_flowadam import __version__

    torch_mod = sys.modules.get("torch")
    if torch_mod is None:
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # noqa: BLE001 - torch is optional for writing numpy artifacts
            torch_version = "unknown"
    else:
        torch_version = torch_mod.__version__
    return {"recsys_flowadam": __version__, "torch": torch_version, "numpy": np.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------
# atomic folder replacement

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported.

    Python's os module has no renameat2; without it replacing a non-empty folder needs two
    renames with a moment where the target name is absent.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # e.g. EINVAL on file systems without exchange support: fall back


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_artifact(
    directory: str | Path,
    tensors: Mapping[str, Any],
    meta: ArtifactMeta | Mapping[str, Any],
) -> Path:
    """Validate and write an artifact folder atomically; return its path.

    ``meta`` may be an :class:`ArtifactMeta` or a mapping; in a mapping, ``schema_version``,
    ``versions`` and ``created_at`` are filled in when absent. Torch tensors are moved to the
    CPU. Nothing is written unless tensors and metadata agree. An existing folder at
    ``directory`` is replaced as a whole (files other than the two artifact files are dropped;
    write companions such as a metrics log after saving).
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if not isinstance(meta, ArtifactMeta):
        data = dict(meta)
        data.setdefault("schema_version", SCHEMA_VERSION)
        data.setdefault("versions", _default_versions())
        data.setdefault("created_at", datetime.now(timezone.utc))
        try:
            meta = ArtifactMeta.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(f"{directory}: invalid metadata for {MODEL_JSON}: {_format_errors(exc)}") from None
    arrays = {name: _as_numpy(name, value) for name, value in tensors.items()}
    _check_tensors(f"{directory}: {MODEL_TENSORS}", meta, arrays)

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        save_file(arrays, str(tmp / MODEL_TENSORS), metadata={"format": "np", "schema_version": str(SCHEMA_VERSION)})
        with open(tmp / MODEL_JSON, "w", encoding="utf-8") as fh:
            fh.write(meta.to_json())
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp / MODEL_TENSORS, "rb") as fh:
            os.fsync(fh.fileno())
        # mkdtemp makes the folder 0700 (and safetensors may write 0600): a service running as
        # another user must be able to read the artifact; it holds nothing secret
        os.chmod(tmp, 0o755)
        for name in (MODEL_TENSORS, MODEL_JSON):
            os.chmod(tmp / name, 0o644)
        _fsync_dir(tmp)
        if directory.exists() or directory.is_symlink():
            if not directory.is_dir() or directory.is_symlink():
                raise ArtifactError(f"{directory}: exists and is not a folder; refusing to replace it")
            if _exchange(tmp, directory):
                shutil.rmtree(tmp)  # now holds the old artifact
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=parent))
                os.rmdir(old)
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# --------------------------------------------------------------------------------------------
# loading


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def _read_tensors(path: Path, fh) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file read-only.

    safetensors validates the file (header, offsets, sizes); its numpy loader then copies each
    tensor into memory, so the (documented, tiny) header is re-read here to np.memmap the data
    from the already opened ``fh`` instead: worker processes then share the page cache.
    """
    from safetensors import safe_open

    where = f"{path.parent}: {path.name}"
    try:
        with safe_open(str(path), framework="np") as st:
            names = set(st.keys())
    except FileNotFoundError:
        raise ArtifactError(f"{where}: file is missing") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{where}: not a valid safetensors file ({exc})") from None
    if os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:
        raise _Replaced
    fh.seek(0)
    (header_len,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(header_len))
    start = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name in names:
        info = header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ArtifactError(f"{where}: tensor '{name}' has dtype {info['dtype']}, expected F32 or I64")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = info["data_offsets"]
        if end == begin:  # np.memmap cannot map zero bytes
            arr = np.zeros(shape, dtype=dtype)
            arr.flags.writeable = False
        else:
            arr = np.memmap(fh, dtype=dtype, mode="r", offset=start + begin, shape=shape)
        out[name] = arr
    return out


class _Replaced(Exception):
    """The artifact folder was replaced while it was being read (a concurrent save_artifact)."""


def _open_in(dir_fd: int | None, directory: Path, name: str):
    try:
        if dir_fd is None:  # no openat (Windows): by path, the rename race is then not covered
            return open(directory / name, "rb")
        return os.fdopen(os.open(name, os.O_RDONLY, dir_fd=dir_fd), "rb")
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: {name} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"{directory}: {name} cannot be read ({exc})") from None


def _load_once(directory: Path) -> Artifact:
    # Both files are opened through one handle on the folder, so they come from the same
    # artifact even if save_artifact swaps the folder meanwhile (then _Replaced: read again).
    dir_fd: int | None = None
    if os.open in os.supports_dir_fd:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            raise ArtifactError(f"{directory}: artifact folder does not exist or is not a folder") from None
    try:
        with _open_in(dir_fd, directory, MODEL_JSON) as fh:
            try:
                raw = fh.read().decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ArtifactError(f"{directory}: {MODEL_JSON} cannot be read ({exc})") from None
        tensor_file = _open_in(dir_fd, directory, MODEL_TENSORS)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    with tensor_file:  # np.memmap keeps its own mapping after the file is closed
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{directory}: {MODEL_JSON} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{directory}: {MODEL_JSON} must hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{directory}: {MODEL_JSON} field 'schema_version' is {version!r}; this version reads {SCHEMA_VERSION}"
            )
        try:
            meta = ArtifactMeta.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(f"{directory}: {MODEL_JSON}: {_format_errors(exc)}") from None
        try:
            tensors = _read_tensors(directory / MODEL_TENSORS, tensor_file)
        except OSError as exc:
            raise ArtifactError(f"{directory}: {MODEL_TENSORS} cannot be read ({exc})") from None
    _check_tensors(f"{directory}: {MODEL_TENSORS}", meta, tensors)
    return Artifact(path=directory, meta=meta, tensors=tensors)


def load_artifact(directory: str | Path) -> Artifact:
    """Load and check an artifact folder (schema version, every tensor's name, dtype and shape).

    Tensors are memory-mapped read-only. Raises :class:`ArtifactError` naming the folder, file
    and field on any problem.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact folder does not exist or is not a folder")
    for _ in range(3):
        try:
            return _load_once(directory)
        except _Replaced:
            continue
    raise ArtifactError(f"{directory}: the artifact kept being replaced while it was read; try again")


__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "DatasetInfo",
    "OptimizerInfo",
    "RatingScaleInfo",
    "VersionsInfo",
    "expected_tensors",
    "load_artifact",
    "save_artifact",
]
