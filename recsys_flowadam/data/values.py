"""Which parsed numbers the data layer can hold: ratings are float32, IDs and timestamps int64.

Parsers read numbers as float64 / Python ints; a rating such as ``1e39`` would silently become
``inf`` when cast to float32, and a 23-digit ID overflows int64. These helpers find such values
so that each parser can refuse them naming the file and line, like every other bad value.
"""

from __future__ import annotations

import math

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def not_float32(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the values that are NaN or infinite, or become infinite as float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return ~np.isfinite(np.asarray(values).astype(np.float32))


def first_not_float32(values: np.ndarray) -> int | None:
    """Index of the first value ``not_float32`` flags, or None."""
    bad = not_float32(values)
    return int(np.argmax(bad)) if bad.any() else None


def float_problem(value: float) -> str:
    """Why ``value`` (one flagged by ``not_float32``) is refused, for a message."""
    if not math.isfinite(value):
        return "is not a finite number"
    return f"is too large for a 32-bit float (magnitude at most {FLOAT32_MAX:.7g})"


def fits_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX
