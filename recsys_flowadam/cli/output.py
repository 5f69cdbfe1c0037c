"""What every command prints as JSON: strict JSON, so `jq` and strict parsers accept it."""

from __future__ import annotations

import json
from typing import Any

from recsys_flowadam.safe_write import json_safe


def print_json(obj: Any, *, indent: int | None = None) -> None:
    """Print ``obj`` as strict JSON: undefined figures (NaN, infinities) become ``null``."""
    print(json.dumps(json_safe(obj), indent=indent, allow_nan=False))
