"""Writing result files safely: whole-or-nothing replacement, and values strict JSON can hold.

Caches, download records, metric histories and reports all use these two, so a crash mid-write
never leaves half a file where a reader expects a whole one, and no file holds ``NaN``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = False) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it over ``path``.

    The folder must exist. On any failure the temporary file is removed and ``path`` is left as it
    was. ``fsync``: flush the bytes to disk before the rename (files that must survive power loss).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types: dicts (keys as str), lists, numbers, strings, bools, None.

    NaN and infinities become null (strict JSON has neither); numpy scalars become Python ones;
    anything else is written as its ``str``.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
