"""The numba kernels of :mod:`recsys_flowadam.models.row_sparse` (imported only when numba is).

Top-level functions so that numba's on-disk cache finds them again in a new process.
"""

import numba
import numpy as np

from recsys_flowadam.models.fused_kernels import loss_terms

# fastmath without nnan/ninf: a NaN or infinite loss must stay one (the trainer stops on it);
# error_model="numpy": a float division needs no zero check, so the Adam updates vectorise
jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False,
                 error_model="numpy")


@jit
def shuffle_labels(labels, seed):
    """Fisher-Yates shuffle of ``labels`` in place, driven by xorshift64* from ``seed`` (any int).

    Why not ``torch.randperm``: the layout needs only which batch each rating joins, so it shuffles
    batch labels (one byte or two each: the array stays in cache) instead of a permutation of all
    the ratings (4 bytes each, walked at random): 0.04 against 0.23 s at 9M ratings. The index is
    taken from the high bits of a 64-bit product (Lemire's method without the rejection step: a
    bias below n / 2^32 per draw, immaterial for cutting batches)."""
    s = np.uint64(seed) ^ np.uint64(0x9E3779B97F4A7C15)
    if s == 0:
        s = np.uint64(1)
    for k in range(labels.shape[0] - 1, 0, -1):
        s ^= s >> np.uint64(12)
        s ^= s << np.uint64(25)
        s ^= s >> np.uint64(27)
        r = (s * np.uint64(2685821657736338717)) >> np.uint64(32)
        j = np.int64((r * np.uint64(k + 1)) >> np.uint64(32))
        t = labels[k]
        labels[k] = labels[j]
        labels[j] = t


@jit
def group_by_label(users, items, values, labels, starts, first, last, out_users, out_items, out_values):
    """The ratings of batches ``first <= b < last`` (``labels[k]``: rating k's batch) copied to their
    batch's positions ``starts[b]:starts[b + 1]`` of the ``out_*`` arrays, in rating order: one
    sequential read of the ratings, writes into as many streams as batches. Calls on disjoint batch
    ranges write disjoint positions. Raises ValueError where a label names no batch or a batch gets
    more ratings than its positions (with as many labels as positions, then every batch is full)."""
    fill = starts[:-1].copy()
    n_batches = starts.shape[0] - 1
    for k in range(users.shape[0]):
        b = np.int64(labels[k])
        if b < 0 or b >= n_batches:
            raise ValueError("a label names no batch")
        if first <= b < last:
            p = fill[b]
            if p >= starts[b + 1]:
                raise ValueError("a batch gets more ratings than its size")
            fill[b] += 1
            out_users[p] = users[k]
            out_items[p] = items[k]
            out_values[p] = values[k]


@jit
def gather_batches(users, items, values, perm, starts, first, last, out_users, out_items, out_values):
    """Positions ``starts[first]:starts[last]`` of the ``out_*`` arrays take the ratings ``perm`` names there."""
    for t in range(starts[first], starts[last]):
        k = perm[t]
        out_users[t] = users[k]
        out_items[t] = items[k]
        out_values[t] = values[k]


@jit
def sort_batches_by_user(starts, first, last, n_users, n_items, users, items, values):
    """Batches ``first <= b < last`` (positions ``starts[b]:starts[b + 1]`` of the arrays) sorted by
    user in place, stably (a counting sort through a batch-sized scratch copy). Each batch's counts
    live in one array of ``n_users`` that stays in cache, where one sort of all the ratings by
    (batch, user) would walk the whole data at random. Every index is checked here."""
    longest = 0
    for b in range(first, last):
        longest = max(longest, starts[b + 1] - starts[b])
    count = np.zeros(n_users, dtype=np.int64)
    fill = np.empty(n_users, dtype=np.int64)
    batch_users = np.empty(longest, dtype=users.dtype)
    batch_items = np.empty(longest, dtype=items.dtype)
    batch_values = np.empty(longest, dtype=values.dtype)
    for b in range(first, last):
        lo, hi = starts[b], starts[b + 1]
        for t in range(lo, hi):
            u, i = users[t], items[t]
            if u < 0 or u >= n_users:  # the kernels run without bounds checks
                raise IndexError("a rating's user index lies outside the factor tables")
            if i < 0 or i >= n_items:
                raise IndexError("a rating's item index lies outside the factor tables")
            batch_users[t - lo] = u
            batch_items[t - lo] = i
            batch_values[t - lo] = values[t]
            count[u] += 1
        pos = lo
        for u in range(n_users):
            fill[u] = pos
            pos += count[u]
            count[u] = 0
        for t in range(hi - lo):
            u = batch_users[t]
            p = fill[u]
            fill[u] += 1
            users[p] = u
            items[p] = batch_items[t]
            values[p] = batch_values[t]


@jit
def _adam_row(x, m, v, g, n, beta1, beta2, step_size, rc2, eps):
    """Adam's update of one row of ``n`` values, in place (torch.optim.Adam's formula)."""
    one = x.dtype.type(1.0)
    for f in range(n):
        gf = g[f]
        mm = beta1 * m[f] + (one - beta1) * gf
        vv = beta2 * v[f] + (one - beta2) * gf * gf
        m[f] = mm
        v[f] = vv
        x[f] = x[f] - step_size * mm / (np.sqrt(vv) * rc2 + eps)


@jit
def lazy_adam_batch(users, items, values, lo, hi, U, V, bu, bi, mU, vU, mV, vV, mbu, vbu, mbi, vbi, c_user,
                    c_item, offset, huber, delta, lam, lam_bias, beta1, beta2, step_size, rc2, eps, gV, gbi, marks,
                    touched):
    """One lazy-Adam step on the ratings ``lo:hi`` of the slotted arrays (grouped by user); returns
    the batch's objective estimate (mean of rho(r) plus each rating's share of the L2 terms).

    The objective of a rating of user u and item i: rho(pred - y) + lam (c_u ||U_u||^2 + c_i ||V_i||^2)
    + lam_bias (c_u b_u^2 + c_i b_i^2), whose mean over all ratings is the model's objective
    (``c`` = a row's L2 weight over its share of the ratings: 1 for frequency weighting; ``c_user``
    empty: 1). The gradient of the batch mean is taken at the batch's starting parameters; then
    Adam moves only the rows the batch touches, each with the same step count (lazy Adam, as
    torch.optim.SparseAdam). A user's row is updated as soon as its ratings have passed (only its
    own ratings read it); the items', gathered in ``gV``/``gbi`` (zero on entry and on return),
    after the batch. ``bu`` empty: no biases (``gbi`` is then scratch). ``marks`` (n_items, zero
    on entry and on return) counts each item's ratings in the batch, and ``touched`` (n_items)
    lists the items it touched; the items' L2 terms are added once per touched item, weighted by
    that count, after the walk, which keeps the walk's inner loop to the data term."""
    m = hi - lo
    if m <= 0:
        return 0.0
    rank = U.shape[1]
    n_items = V.shape[0]
    has_bias = bu.shape[0] > 0
    weighted = c_user.shape[0] > 0
    like = U.dtype.type
    scale = like(2.0 / m)
    zero = like(0.0)
    u_row = np.empty(rank, dtype=U.dtype)
    g_row = np.empty(rank, dtype=U.dtype)
    g_b = np.zeros(1, dtype=U.dtype)
    n_touched = 0
    total = 0.0
    penalty = 0.0
    j = lo
    while j < hi:
        a = users[j]
        e = j + 1
        while e < hi and users[e] == a:
            e += 1
        count = e - j
        cu = c_user[a] if weighted else 1.0
        lam_u = like(2.0 * lam * cu * count / m)
        sq = 0.0
        for f in range(rank):
            p = U[a, f]
            u_row[f] = p
            sq += float(p) * float(p)
            g_row[f] = lam_u * p
        penalty += lam * cu * sq * count
        b = zero
        if has_bias:
            b = bu[a]
            g_b[0] = like(2.0 * lam_bias * cu * count / m) * b
            penalty += lam_bias * cu * float(b) * float(b) * count
        for t in range(j, e):
            i = items[t]
            if i < 0 or i >= n_items:
                raise IndexError("a rating's item index lies outside the factor tables")
            if marks[i] == 0:
                touched[n_touched] = i
                n_touched += 1
            marks[i] += 1
            pred = offset + b
            if has_bias:
                pred += bi[i]
            for f in range(rank):
                pred += u_row[f] * V[i, f]
            rho, g = loss_terms(pred - values[t], huber, delta, scale)
            total += rho
            for f in range(rank):
                g_row[f] += g * V[i, f]
                gV[i, f] += g * u_row[f]
            if has_bias:
                g_b[0] += g
                gbi[i] += g
        _adam_row(U[a], mU[a], vU[a], g_row, rank, beta1, beta2, step_size, rc2, eps)
        if has_bias:
            _adam_row(bu[a:a + 1], mbu[a:a + 1], vbu[a:a + 1], g_b, 1, beta1, beta2, step_size, rc2, eps)
        j = e
    for t in range(n_touched):
        i = touched[t]
        # the items' L2 terms, once per touched item: its ratings in the batch times its share
        weight = (c_item[i] if weighted else 1.0) * marks[i]
        lam_i = like(2.0 * lam * weight / m)
        sq_i = 0.0
        for f in range(rank):
            q = V[i, f]
            sq_i += float(q) * float(q)
            gV[i, f] += lam_i * q
        penalty += lam * weight * sq_i
        _adam_row(V[i], mV[i], vV[i], gV[i], rank, beta1, beta2, step_size, rc2, eps)
        if has_bias:
            q = bi[i]
            penalty += lam_bias * weight * float(q) * float(q)
            gbi[i] += like(2.0 * lam_bias * weight / m) * q
            _adam_row(bi[i:i + 1], mbi[i:i + 1], vbi[i:i + 1], gbi[i:i + 1], 1, beta1, beta2, step_size, rc2, eps)
        for f in range(rank):
            gV[i, f] = zero
        gbi[i] = zero
        marks[i] = 0
    return (total + penalty) / m
