"""Choosing how the training ratings are held: dense grid, CSR, or mini-batches (by memory).

``path_choice.choose_path`` (what ``train`` does with no flags) takes mini-batches for large data
first, and this rule otherwise.

Rule (``--representation auto``): among the full-batch paths whose estimated memory fits the
budget, the dense masked path (no cell may be rated twice) unless the grid is sparse: on the
CPU a dense grid cell costs about a quarter of what an observed rating costs the CSR path
(measured on ML-100K and a Jester-1-sized problem, ranks 20 and 100), so below
``DENSE_MIN_DENSITY`` = 20% observed the sparse path is faster (ML-100K at 4%: 8 vs 30 ms per
gradient at rank 100). On CUDA, where dense matmuls are far cheaper than sparse kernels,
dense is taken whenever it fits. When neither fits: mini-batch.

Estimates (bytes, ``e`` = bytes per float):
  dense:  grid cells * e * 4   (targets, mask, residual/gradient grid, matmul temporary)
          + for cp: items * contexts * rank * e (the Khatri-Rao product) twice
  sparse: ratings * (8 * 5 + e * 6)  (CSR indices both ways, values, residuals, gradients)
          + for cp: ratings * rank * e * 4 (gathered rows)
Budget: ``--memory-budget`` (GiB) when given, else on CUDA half the free device memory,
else a quarter of the machine's physical memory, capped at 8 GiB.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from recsys_flowadam.models.factorization import ModelSpec

REPRESENTATIONS = ("dense", "sparse", "minibatch")
DENSE_MIN_DENSITY = 0.2


def default_budget(device: torch.device) -> int:
    """Bytes the full-batch representation may use by default on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        physical = 8 << 30
    return int(min(physical // 4, 8 << 30))


def grid_cells(spec: ModelSpec) -> int:
    """Cells of the dense grid: users x items, x contexts for the tensor model only (the time
    models' ``n_contexts`` counts time bins, which live in a bias table, not in the grid)."""
    return spec.n_users * spec.n_items * (spec.n_contexts if spec.is_tensor else 1)


def estimate_bytes(representation: str, spec: ModelSpec, n_ratings: int, element_size: int = 4) -> int:
    """Rough peak memory of a full-batch representation (see the module docstring)."""
    e = element_size
    if representation == "dense":
        cells = grid_cells(spec)
        extra = 2 * spec.n_items * spec.n_contexts * spec.rank * e if spec.is_tensor else 0
        return cells * e * 4 + extra
    if representation == "sparse":
        extra = n_ratings * spec.rank * e * 4 if spec.is_tensor else 0
        return n_ratings * (8 * 5 + e * 6) + extra
    if representation == "minibatch":
        return 0
    raise ValueError(f"unknown representation {representation!r}; choose one of {', '.join(REPRESENTATIONS)}")


def choose_representation(
    spec: ModelSpec,
    n_ratings: int,
    device: torch.device,
    *,
    budget_bytes: int | None = None,
    element_size: int = 4,
    duplicates: bool | Callable[[], bool] = False,
) -> str:
    """The representation ``auto`` resolves to (rule in the module docstring). ``duplicates``:
    whether a cell is rated twice, or a function telling it (called only when the grid fits)."""
    budget = default_budget(device) if budget_bytes is None else budget_bytes
    dense_fits = estimate_bytes("dense", spec, n_ratings, element_size) <= budget
    dense_fits = dense_fits and not (duplicates() if callable(duplicates) else duplicates)
    sparse_fits = estimate_bytes("sparse", spec, n_ratings, element_size) <= budget
    cells = grid_cells(spec)
    dense_is_faster = device.type == "cuda" or n_ratings >= DENSE_MIN_DENSITY * cells
    if dense_fits and (dense_is_faster or not sparse_fits):
        return "dense"
    if sparse_fits:
        return "sparse"
    return "minibatch"
