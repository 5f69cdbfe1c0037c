"""Recipe files (TOML): named training settings, e.g. ``models/ml-100k-biased-mf.toml``.

A recipe holds top-level keys named like the settings of ``recsys_flowadam.train.config``
(``rank``, ``lr``, ``reg``, ``split``, ``preset``, ...; dashes or underscores; also the
aliases ``memory_budget`` and ``optimizer_options``), an optional ``description`` and optional
``[optimizer_options]`` (the optimizer's own keywords: ``mode``, ``weight_decay``, ...) and
``[data_options]`` (loader options) tables. Every value is checked against its setting with
strict types (``refit = "false"`` or ``rank = 2.5`` is an error, an int where a float is
expected is fine) and bounds; errors name the file and the key. Explicit command-line flags
override the recipe.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from recsys_flowadam.train.config import SETTINGS, ConfigError, canonical_name, check_setting


class RecipeError(ConfigError):
    """A recipe file is missing, not TOML, or names an unknown setting or a wrongly typed value."""


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``; RecipeError naming the file when missing or malformed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's settings in file order, keyed by setting name, each value checked.

    ``[optimizer_options]`` comes back under ``optimizer_kwargs`` with dashes in its keys
    turned to underscores; ``[data_options]`` keys are kept as written.
    """
    path = Path(path)
    out: dict[str, Any] = {}
    for key, value in read_toml(path).items():
        if key == "description":
            continue
        name = canonical_name(key)
        if name not in SETTINGS:
            allowed = ", ".join(sorted({*SETTINGS, "description", "optimizer_options"} - {"optimizer_kwargs"}))
            raise RecipeError(f"{path}: unknown setting '{key}' (allowed: {allowed})")
        where = f"[{key}]" if isinstance(value, dict) else f"'{key}'"
        try:
            value = check_setting(name, value, where=f"{path}: setting {where}")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None
        if name == "optimizer_kwargs":
            value = {k.replace("-", "_"): v for k, v in value.items()}
        out[name] = value
    return out
