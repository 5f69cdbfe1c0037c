"""Recipe files (TOML): named training settings, e.g. ``models/ml-100k-biased-mf.toml``.

A recipe holds top-level keys named like the ``train`` command's options (``rank``,
``lr``, ``reg``, ``split``, ...; dashes or underscores) and an optional
``[optimizer_options]`` table for the optimizer's own knobs (``mode``, ``ode_method``, ...).
Explicit command-line flags override the recipe.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Iterable


class RecipeError(ValueError):
    """A recipe file is missing, not TOML, or names an unknown setting."""


def load_recipe(path: str | Path, allowed: Iterable[str]) -> dict[str, Any]:
    """Read a recipe; keys normalised to underscores and checked against ``allowed``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    allowed = set(allowed)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "optimizer_options":
            if not isinstance(value, dict):
                raise RecipeError(f"{path}: [optimizer_options] must be a table")
            out[name] = {k.replace("-", "_"): v for k, v in value.items()}
            continue
        if name == "description":
            continue
        if name not in allowed:
            raise RecipeError(f"{path}: unknown setting '{key}' (allowed: {', '.join(sorted(allowed))})")
        out[name] = value
    return out
