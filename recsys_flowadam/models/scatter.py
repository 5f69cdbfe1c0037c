"""Scatter-adding weighted rows: the mini-batch gradient's ``dU[u] += g_k * V[i_k]``.

``scatter_rows(index, n_out, table, lookup, weights)`` returns ``out`` with
``out[index[k]] += weights[k] * table[lookup[k]]`` for every ``k``, by one of two methods:

- ``"segment"``: sort the contributions by ``index`` (a 32-bit sort), then one
  ``embedding_bag`` (mode sum, per-sample weights) sums each output row's segment while it
  gathers ``table`` rows: no (m, rank) intermediate and no per-row atomics. On this 2-core
  CPU, 100k contributions of rank 20 take about 2 ms this way against about 6-7 ms for
  ``index_add_`` (whose CPU kernel adds one row slice at a time) (``bench/bench_minibatch_step.py``).
- ``"index_add"``: gather ``weights[:, None] * table[lookup]`` and ``index_add_`` it (atomic
  adds on a GPU, where they are cheap and sorting is the larger cost).

:func:`default_method` picks ``segment`` on the CPU and ``index_add`` on other devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCATTER_METHODS = ("segment", "index_add")


def default_method(device: torch.device) -> str:
    """``segment`` on the CPU, ``index_add`` on accelerators (see the module docstring)."""
    return "segment" if device.type == "cpu" else "index_add"


def segment_offsets(sorted_index: torch.Tensor, n_out: int, *, count: bool | None = None) -> torch.Tensor:
    """Start of each output row's segment in ``sorted_index`` (ascending; length ``n_out + 1``).
    By counting (``count``; default on the CPU) or by binary search (default elsewhere: it needs
    no read-back of the largest index, which ``bincount`` on a GPU waits for)."""
    if sorted_index.device.type == "cpu" if count is None else count:
        offsets = torch.zeros(n_out + 1, dtype=torch.int64, device=sorted_index.device)
        torch.cumsum(torch.bincount(sorted_index, minlength=n_out), dim=0, out=offsets[1:])
        return offsets
    bounds = torch.arange(n_out + 1, dtype=sorted_index.dtype, device=sorted_index.device)
    return torch.searchsorted(sorted_index, bounds).to(torch.int64)


def scatter_rows(index: torch.Tensor, n_out: int, table: torch.Tensor, lookup: torch.Tensor | None,
                 weights: torch.Tensor, method: str = "segment", *, index_sorted: bool = False) -> torch.Tensor:
    """``out[index[k]] += weights[k] * table[lookup[k]]`` (``lookup=None``: row ``k`` of ``table``);
    a fresh ``(n_out, table.shape[1])`` tensor. ``index_sorted``: ``index`` is already in
    ascending order (the segment method then skips its sort)."""
    if method == "index_add":
        rows = table if lookup is None else table.index_select(0, lookup)
        return table.new_zeros((n_out, table.shape[1])).index_add_(0, index, rows * weights[:, None])
    if method != "segment":
        raise ValueError(f"unknown scatter method {method!r}; choose one of {', '.join(SCATTER_METHODS)}")
    if index_sorted:
        rows = torch.arange(len(index), device=index.device) if lookup is None else lookup
    else:
        index, order = sorted_with_order(index)
        rows = order if lookup is None else lookup.index_select(0, order)
        weights = weights.index_select(0, order)
    return F.embedding_bag(rows, table, segment_offsets(index, n_out).to(rows.dtype), mode="sum",
                           per_sample_weights=weights, include_last_offset=True)


def sorted_with_order(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted index, the permutation sorting it)``; sorted as int32, about twice as fast as
    int64 on the CPU (row counts of a model fit in 31 bits)."""
    values, order = torch.sort(index.to(torch.int32))
    return values, order


def sort_order(index: torch.Tensor) -> torch.Tensor:
    """The permutation sorting ``index`` ascending (see :func:`sorted_with_order`)."""
    return sorted_with_order(index)[1]
