"""Which folds ``recsys-flowadam cv`` runs: ``--folds`` specs turned into split specs.

Kept free of torch (like ``train.config``) so that a bad ``--folds`` is reported at once.

Forms (comma-separated, in any mix):

* ``u1``..``u5``, ``ua``, ``ub`` - ML-100K's canonical folds (``data.splits``);
* ``uA..uB`` - the canonical folds A to B, e.g. ``u1..u5``;
* ``kfold:K`` - all K folds of a seeded K-fold partition: ``kfold:K:1`` .. ``kfold:K:K``;
* ``kfold:K:F`` - fold F of K.
"""

from __future__ import annotations

import re

CANONICAL_RANGE = re.compile(r"u([1-9])\.\.u([1-9])")
CANONICAL_FOLDS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")  # as data.splits.CANONICAL
FOLDS_HELP = ("u1..u5 (a range of ML-100K's canonical folds), a comma list such as u1,u3 or kfold:5:1,kfold:5:2, "
              "or kfold:K (all K folds of a seeded K-fold partition)")


class FoldsError(ValueError):
    """A ``--folds`` value that names no fold, a fold that does not exist, or a fold twice."""


def default_folds(dataset: str) -> str:
    """``u1..u5`` for ML-100K (its canonical folds), ``kfold:5`` for any other dataset."""
    return "u1..u5" if dataset == "ml-100k" else "kfold:5"


def parse_folds(spec: str) -> list[str]:
    """The split specs of ``spec`` in order (see the module doc); FoldsError naming the bad part."""
    folds: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise FoldsError(f"--folds {spec!r}: an empty fold; use {FOLDS_HELP}")
        folds.extend(_expand(part, spec))
    seen: set[str] = set()
    for fold in folds:
        if fold in seen:
            raise FoldsError(f"--folds {spec!r}: fold {fold} is named twice")
        seen.add(fold)
    return folds


def _expand(part: str, spec: str) -> list[str]:
    """The folds one comma-separated ``part`` of ``spec`` names."""
    if part in CANONICAL_FOLDS:
        return [part]
    match = CANONICAL_RANGE.fullmatch(part)
    if match:
        first, last = int(match[1]), int(match[2])
        if not 1 <= first <= last <= 5:
            raise FoldsError(f"--folds {spec!r}: {part} is not a range within u1..u5 (first <= last)")
        return [f"u{i}" for i in range(first, last + 1)]
    kind, _, arg = part.partition(":")
    if kind == "kfold":
        return _kfold(part, arg, spec)
    raise FoldsError(f"--folds {spec!r}: unknown fold {part!r}; use {FOLDS_HELP}")


def _kfold(part: str, arg: str, spec: str) -> list[str]:
    """``kfold:K`` -> its K folds; ``kfold:K:F`` -> itself, both checked (K >= 2, 1 <= F <= K)."""
    numbers = arg.split(":")
    if not 1 <= len(numbers) <= 2 or not all(n.isdigit() for n in numbers):
        raise FoldsError(f"--folds {spec!r}: {part!r} must be kfold:K or kfold:K:F with integers, e.g. kfold:5")
    k = int(numbers[0])
    if k < 2:
        raise FoldsError(f"--folds {spec!r}: {part!r} needs K >= 2")
    if len(numbers) == 1:
        return [f"kfold:{k}:{f}" for f in range(1, k + 1)]
    fold = int(numbers[1])
    if not 1 <= fold <= k:
        raise FoldsError(f"--folds {spec!r}: {part!r} needs 1 <= F <= K")
    return [f"kfold:{k}:{fold}"]
