"""Reading and writing artifact folders: ``model.safetensors`` + ``model.json`` on disk.

Writes are atomic: the folder is built as a hidden temporary sibling and renamed into place, and
an existing artifact is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` call
where the platform offers it, so a reader sees either the old or the new artifact, never a
half-written one. Loading memory-maps the tensors read-only, so several server worker processes
share one copy of the factors in the page cache. What the files must contain is
:mod:`recsys_flowadam.artifact.schema`'s job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
from pydantic import ValidationError

from .schema import (
    MODEL_JSON,
    MODEL_TENSORS,
    SCHEMA_VERSION,
    Artifact,
    ArtifactError,
    ArtifactMeta,
    check_tensors,
    format_errors,
    make_artifact,
)

# safetensors dtype tag -> numpy dtype (little-endian, as the format prescribes).
_ST_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


def check_artifact_target(directory: str | Path, companions: tuple[str, ...] = ()) -> Path:
    """Refuse a folder that :func:`save_artifact` must not replace; return its absolute path.

    Saving replaces the folder as a whole, so it may only hold an earlier artifact: its two files,
    the ``companions`` written beside them (the trainer's metric log and checkpoint) and their
    temporary files. Anything else (a user's own files) makes this raise ArtifactError before any
    work is done, as does the current folder or one above it (it cannot be swapped out from under
    the running process). A missing or empty folder is fine.
    """
    directory = Path(directory)
    absolute = Path(os.path.abspath(directory))
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ArtifactError(f"{directory}: exists and is not a folder; refusing to replace it with an artifact")
    cwd = Path.cwd()
    if absolute == cwd or absolute in cwd.parents:
        raise ArtifactError(f"{directory}: is the current folder (or holds it); an artifact replaces its folder "
                            "as a whole, so name a folder of its own, e.g. models/my-model")
    if not directory.is_dir():
        return absolute
    allowed = {MODEL_JSON, MODEL_TENSORS, *companions}
    foreign = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in directory.iterdir()
                     if entry.name not in allowed and not _is_own_temporary(entry.name, allowed))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArtifactError(f"{directory}: holds files that are not an artifact's ({shown}); saving replaces the "
                            "folder as a whole, so choose another folder (new or empty, or an earlier artifact)")
    return absolute


def _is_own_temporary(name: str, allowed: set[str]) -> bool:
    """A temporary file that an interrupted atomic write of one of ``allowed`` left behind."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{a}.") for a in allowed)


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


def _write_files(folder: Path, arrays: Mapping[str, np.ndarray], meta: ArtifactMeta) -> None:
    """Both artifact files into ``folder``, flushed to disk and readable by every user."""
    from safetensors.numpy import save_file

    save_file(arrays, str(folder / MODEL_TENSORS), metadata={"format": "np", "schema_version": str(SCHEMA_VERSION)})
    with open(folder / MODEL_JSON, "w", encoding="utf-8") as fh:
        fh.write(meta.to_json())
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    with open(folder / MODEL_TENSORS, "rb") as fh:
        os.fsync(fh.fileno())
    # mkdtemp makes the folder 0700 (and safetensors may write 0600): a service running as
    # another user must be able to read the artifact; it holds nothing secret
    os.chmod(folder, 0o755)
    for name in (MODEL_TENSORS, MODEL_JSON):
        os.chmod(folder / name, 0o644)
    _fsync_dir(folder)


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename the finished folder ``tmp`` to ``directory``, swapping out an existing artifact."""
    parent = directory.parent
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


def save_artifact(
    directory: str | Path,
    tensors: Mapping[str, Any],
    meta: ArtifactMeta | Mapping[str, Any],
    companions: tuple[str, ...] = (),
) -> Path:
    """Validate and write an artifact folder atomically; return its path.

    ``meta`` may be an :class:`ArtifactMeta` or a mapping; in a mapping, ``schema_version``,
    ``versions`` and ``created_at`` are filled in when absent. Torch tensors are moved to the
    CPU. Nothing is written unless tensors and metadata agree. An existing folder at
    ``directory`` must hold nothing but an earlier artifact (see :func:`check_artifact_target`;
    ``companions`` names the files allowed beside the artifact's two) and is replaced as a whole:
    write companions such as a metrics log after saving.
    """
    given = Path(directory)
    artifact = make_artifact(tensors, meta, where=given)
    directory = check_artifact_target(given, companions)
    arrays, meta = artifact.tensors, artifact.meta

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        _write_files(tmp, arrays, meta)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


# --------------------------------------------------------------------------------------------
# loading


class _Replaced(Exception):
    """The artifact folder was replaced while it was being read (a concurrent save_artifact)."""


def _read_tensors(path: Path, fh: IO[bytes]) -> dict[str, np.ndarray]:
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


def _open_in(dir_fd: int | None, directory: Path, name: str) -> IO[bytes]:
    """Open an artifact file for reading; only a regular file is accepted. O_NONBLOCK keeps a
    FIFO put in its place from blocking the open (and so the service's start) forever."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        if dir_fd is None:  # no openat (Windows): by path, the rename race is then not covered
            fd = os.open(directory / name, flags)
        else:
            fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: {name} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"{directory}: {name} cannot be read ({exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{directory}: {name} is not a regular file (a FIFO, device or folder); refusing to read it")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _parse_meta(directory: Path, raw: str) -> ArtifactMeta:
    """``model.json``'s text as validated metadata; ArtifactError naming the folder otherwise."""
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
        return ArtifactMeta.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"{directory}: {MODEL_JSON}: {format_errors(exc)}") from None


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
        meta = _parse_meta(directory, raw)
        try:
            tensors = _read_tensors(directory / MODEL_TENSORS, tensor_file)
        except OSError as exc:
            raise ArtifactError(f"{directory}: {MODEL_TENSORS} cannot be read ({exc})") from None
    check_tensors(f"{directory}: {MODEL_TENSORS}", meta, tensors)
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


__all__ = ["load_artifact", "save_artifact"]
