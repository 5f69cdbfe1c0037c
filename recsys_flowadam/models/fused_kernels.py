"""The numba kernels of :mod:`recsys_flowadam.models.fused_cpu` (imported only when numba is).

Top-level functions so that numba's on-disk cache finds them again in a new process.
"""

import numba
import numpy as np

from recsys_flowadam.adam_formula import adam_element
from recsys_flowadam.models.cpu_prefetch import prefetch_row, prefetch_row_read

# the gradient kernel asks for the item row of the rating this many places ahead (4-8 measured alike)
PREFETCH_AHEAD = 6

# fastmath without nnan/ninf: a NaN or infinite loss must stay one (the trainer stops on it)
# error_model="numpy": a float division needs no zero check, so Adam's row update vectorises
jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False,
                 error_model="numpy")


@jit
def grouped_in_range(users, n_users):
    """Whether ``users`` is non-decreasing with every index in ``0..n_users-1`` (then its first and
    last say so): one branch-free pass, which vectorises (0.03 ms at 178k ratings, where a loop that
    stops at the first fault took 0.25 ms)."""
    m = users.shape[0]
    if m == 0:
        return True
    descents = 0
    for k in range(1, m):
        descents += users[k] < users[k - 1]
    return descents == 0 and users[0] >= 0 and users[m - 1] < n_users


@jit
def first_at_or_past(users, u):
    """The first position of non-decreasing ``users`` that holds a user ``>= u`` (binary search)."""
    lo, hi = 0, users.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if users[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def user_segments(users, n_users, u_lo=0, u_hi=-1):
    """``(start, order, offset)``: the positions of the ratings of users ``u_lo <= u < u_hi`` (``u_hi``
    -1: all users) grouped by user; user ``u``'s ratings are ``order[start[u]:start[u + 1]]``, or,
    where the ratings already come grouped by user (``offset >= 0``: laid-out batches), positions
    ``offset + start[u]`` to ``offset + start[u + 1]`` and ``order`` is empty (no sort to write).
    A counting sort, O(m + n_users), otherwise. Every rating's user index is checked.

    Grouped ratings: one vectorised check of the order (``grouped_in_range``), then only the range's
    positions (found by binary search) are counted. Each half of a split batch counted all of the
    batch's ratings, with a check per rating, before: 0.3 ms a half at 178k ratings."""
    hi = n_users if u_hi < 0 else u_hi
    start = np.zeros(n_users + 1, dtype=np.int64)
    if grouped_in_range(users, n_users):
        first = first_at_or_past(users, u_lo)
        last = first_at_or_past(users, hi)  # (at or before first where the range is empty)
        for k in range(first, last):
            start[users[k] + 1] += 1
        for u in range(u_lo, hi):  # (zero below the range, flat above it)
            start[u + 1] += start[u]
        start[hi + 1:] = start[hi]
        return start, np.empty(0, dtype=np.int64), first
    for k in range(users.shape[0]):
        u = users[k]
        if u < 0 or u >= n_users:  # the kernels run without bounds checks
            raise IndexError("a rating's user index lies outside the factor tables")
        if u_lo <= u < hi:
            start[u + 1] += 1
    for u in range(n_users):
        start[u + 1] += start[u]
    fill = start[:-1].copy()
    order = np.empty(start[n_users], dtype=np.int64)
    for k in range(users.shape[0]):
        u = users[k]
        if u_lo <= u < hi:
            order[fill[u]] = k
            fill[u] += 1
    return start, order, -1


@jit
def median_user(users, n_users):
    """The first user at or past whom half of the ratings lie (``fused_cpu.median_user``): on
    ratings grouped by user, the middle rating's, after one vectorised check of their order
    (``grouped_in_range``); else counted (indices outside ``0..n_users-1`` are not counted: the
    gradient kernel refuses them)."""
    m = users.shape[0]
    middle = m // 2
    if m > 0 and grouped_in_range(users, n_users):
        return users[middle]
    count = np.zeros(n_users, dtype=np.int64)
    for k in range(m):
        if 0 <= users[k] < n_users:
            count[users[k]] += 1
    seen = 0
    for u in range(n_users):
        seen += count[u]
        if seen > middle:
            return u
    return n_users


@numba.njit(inline="always")
def adam_scalars(adam, like):
    """An offered step's scalars (``row_step``: beta1, beta2, lr / bias_correction1,
    sqrt(bias_correction2), eps, decay) in ``like``'s dtype, as ``(beta1, beta2, 1 - beta1, 1 - beta2,
    step_size, bc2_sqrt, eps, decay)``, the arguments of ``adam_element``; ``adam`` empty (no step
    offered): ones, with zeros for ``1 - beta``."""
    one = like.dtype.type(1.0)
    if adam.shape[0] == 0:
        return one, one, one - one, one - one, one, one, one, one
    beta1, beta2 = like.dtype.type(adam[0]), like.dtype.type(adam[1])
    return (beta1, beta2, one - beta1, one - beta2, like.dtype.type(adam[2]), like.dtype.type(adam[3]),
            like.dtype.type(adam[4]), like.dtype.type(adam[5]))


@jit
def loss_terms(r, huber, delta, scale):
    """``(rho(r), scale * psi(r) / 2)`` of one residual: MSE ``r^2``, or Huber (``huber``) past
    ``delta``: ``2 delta |r| - delta^2``; rho as a float64 sum term, the gradient in r's dtype."""
    if huber and abs(r) > delta:
        return 2.0 * float(delta) * abs(float(r)) - float(delta) * float(delta), scale * (delta if r > 0 else -delta)
    return float(r) * float(r), scale * r


@jit
def data_term(users, items, values, U, V, bu, bi, offset, huber, delta, scale, dU, dV, dbu, dbi, extra, g_out,
              w_user, lam, lam_bias, u_lo, u_hi, mU, vU, mbu, vbu, adam, item_l2, w_item, w_item_bias):
    """The data term of the batch's ratings by users ``u_lo <= u < u_hi`` and those users' L2 term
    in one walk over them; returns ``(sum rho(r) / m, the L2 value, gg, mm, gm)`` (``m``: the
    whole batch; the last three: see ``adam``).

    ``adam`` (empty: none): Adam's step on those users' rows taken here, as each row's gradient is
    done (``row_step``): (beta1, beta2, lr / bias_correction1, sqrt(bias_correction2), eps, decay)
    with moments ``mU``/``vU`` (and ``mbu``/``vbu`` for ``b_u``); ``dU``/``dbu`` are then not
    written, and ``gg, mm, gm`` are the rows' g.g, m.m and g.m (m before the step): each row's sum
    in the parameters' dtype, the rows' in float64 (float64 products per element cost about 1 ms of a
    10M-rating step on two threads, 7-9%; a row's sum of ``rank`` float32 terms is good to about 1e-6).

    Writes those users' rows of ``dU`` (and ``dbu``): the L2 gradient ``2 lam w_u U_u`` (``w_user`` empty:
    uniform 1; ``lam_bias`` for ``b_u``) plus the data gradient. Writes all of ``dV`` (and ``dbi``):
    these users' item gradients plus, with ``item_l2``, the items' L2 gradient (``2 lam w_i V_i``,
    ``2 lam_bias w_i b_i``; weights ``w_item``/``w_item_bias``, empty: uniform 1), whose value then
    joins the returned L2 value; a second range of users (``item_l2`` False) has its item
    gradients added by the caller. ``extra`` (empty: none): a per-rating
    addition to the prediction (the time models' terms); ``g_out`` (empty: not wanted): receives
    each rating's ``psi(r) / m``, for the gradients of such terms.

    Why this shape: ratings are visited user by user (a counting sort), so a user's row and its
    gradient stay in local arrays while its ratings pass, and the users' L2 term costs no pass of
    its own; the item side lives in one interleaved scratch row ``[V_i, b_i, dV_i, db_i]`` per item,
    so each rating's random access lands on one region instead of four arrays. In the batch's random
    order the same loop was 3.5x slower, waiting on memory; the interleaving and the fused user L2
    took another 15-25% off (100k ratings, rank 20), and asking for the item row a few ratings ahead
    (``cpu_prefetch``) about 30% of the ratings' part (178k ratings, rank 50). ``offset``, ``delta``
    and ``scale`` (``2 / m``) come as scalars of the parameters' dtype, so the per-rating arithmetic
    stays in it; the sums are float64."""
    m = users.shape[0]
    n_users, rank = U.shape
    n_items = V.shape[0]
    has_bias = bu.shape[0] > 0
    has_extra = extra.shape[0] > 0
    keep_g = g_out.shape[0] > 0
    weighted = w_user.shape[0] > 0
    fuse = adam.shape[0] > 0
    two = U.dtype.type(2.0)
    beta1, beta2, c1, c2, step_size, bc2_sqrt, eps, decay = adam_scalars(adam, U)
    gg = 0.0
    mm = 0.0
    gm = 0.0
    width = 2 * rank + 2
    items_rows = np.empty((n_items, width), dtype=V.dtype)  # [V_i, b_i, dV_i, db_i]
    penalty = 0.0
    zero = U.dtype.type(0.0)
    for i in range(n_items):  # (the items' L2 gradient computed in float64, then rounded)
        items_rows[i, rank] = bi[i] if has_bias else zero
        items_rows[i, width - 1] = zero
        if not item_l2:  # a second range of users: its item gradients start at zero
            for f in range(rank):
                items_rows[i, f] = V[i, f]
                items_rows[i, rank + 1 + f] = zero
            continue
        c = lam * (w_item[i] if w_item.shape[0] > 0 else 1.0)
        sq = 0.0
        for f in range(rank):
            p = V[i, f]
            items_rows[i, f] = p
            sq += p * p
            items_rows[i, rank + 1 + f] = 2.0 * c * p
        penalty += c * sq
        if has_bias:
            c_b = lam_bias * (w_item_bias[i] if w_item_bias.shape[0] > 0 else 1.0)
            items_rows[i, width - 1] = 2.0 * c_b * bi[i]
            penalty += c_b * (bi[i] * bi[i])
    for k in range(m):
        if items[k] < 0 or items[k] >= n_items:
            raise IndexError("a rating's item index lies outside the factor tables")
    start, order, at = user_segments(users, n_users, u_lo, u_hi)  # at >= 0: laid out, no order
    u_row = np.empty(rank, dtype=U.dtype)
    g_row = np.empty(rank, dtype=U.dtype)
    total = 0.0
    n_in = start[n_users]  # the ratings of this range of users, in visiting order
    for u in range(u_lo, u_hi):
        w = w_user[u] if weighted else 1.0
        c = U.dtype.type(lam * w)
        sq = 0.0
        for f in range(rank):
            p = U[u, f]
            u_row[f] = p
            sq += float(p) * float(p)
            g_row[f] = two * c * p
        penalty += float(c) * sq
        b = U.dtype.type(0.0)
        g_b = U.dtype.type(0.0)
        if has_bias:
            b = bu[u]
            c_b = U.dtype.type(lam_bias * w)
            g_b = two * c_b * b
            penalty += float(c_b) * float(b) * float(b)
        for j in range(start[u], start[u + 1]):
            ahead = j + PREFETCH_AHEAD
            if ahead < n_in:  # the item row a few ratings on, so that it is in cache when its turn comes
                prefetch_row(items_rows, items[at + ahead if at >= 0 else order[ahead]])
            k = at + j if at >= 0 else order[j]
            i = items[k]
            pred = offset + b + items_rows[i, rank]
            if has_extra:
                pred += extra[k]
            for f in range(rank):
                pred += u_row[f] * items_rows[i, f]
            rho, g = loss_terms(pred - values[k], huber, delta, scale)
            total += rho
            if keep_g:
                g_out[k] = g
            g_b += g
            items_rows[i, width - 1] += g
            for f in range(rank):
                g_row[f] += g * items_rows[i, f]
                items_rows[i, rank + 1 + f] += g * u_row[f]
        if fuse:  # Adam's step on the row while it is in cache (adam_element: optim.adam_kernels' formula)
            rg = zero
            rm = zero
            rgm = zero
            for f in range(rank):
                gk = g_row[f]
                mk = mU[u, f]
                rg += gk * gk
                rm += mk * mk
                rgm += gk * mk
                U[u, f], mU[u, f], vU[u, f] = adam_element(u_row[f], gk, mk, vU[u, f], beta1, beta2, c1, c2,
                                                           step_size, bc2_sqrt, eps, decay)
            gg += float(rg)
            mm += float(rm)
            gm += float(rgm)
            if has_bias:
                mk = mbu[u]
                gg += float(g_b) * float(g_b)
                mm += float(mk) * float(mk)
                gm += float(g_b) * float(mk)
                bu[u], mbu[u], vbu[u] = adam_element(b, g_b, mk, vbu[u], beta1, beta2, c1, c2, step_size,
                                                     bc2_sqrt, eps, decay)
        else:
            for f in range(rank):
                dU[u, f] = g_row[f]
            if has_bias:
                dbu[u] = g_b
    for i in range(n_items):
        for f in range(rank):
            dV[i, f] = items_rows[i, rank + 1 + f]
        if has_bias:
            dbi[i] = items_rows[i, width - 1]
    return total / max(m, 1), penalty, gg, mm, gm


@jit
def summed_adam_range(p, g, g2, m, v, lo, hi, adam):
    """Adam's offered step (``row_step``: ``adam`` as ``data_term`` takes it) on elements ``lo <= k <
    hi`` of the flat arrays ``p``, ``m``, ``v``, in place, with the gradient ``g + g2``: the item
    gradients of ``data_term``'s two ranges of users, summed here instead of in a pass of their own.
    Returns ``(g.g, m.m, g.m)`` over the range in float64, ``m`` before the step (FlowAdam's trigger
    statistics); ``adam_element``, as ``optim.adam_kernels.adam_range``. Over slices, not the range,
    so that LLVM vectorises the loop (as there)."""
    P, G, G2, M, V = p[lo:hi], g[lo:hi], g2[lo:hi], m[lo:hi], v[lo:hi]
    beta1, beta2, c1, c2, step_size, bc2_sqrt, eps, decay = adam_scalars(adam, p)
    gg = 0.0
    mm = 0.0
    gm = 0.0
    for k in range(P.shape[0]):
        gk = G[k] + G2[k]
        mk = M[k]
        gg += float(gk) * float(gk)
        mm += float(mk) * float(mk)
        gm += float(gk) * float(mk)
        P[k], M[k], V[k] = adam_element(P[k], gk, mk, V[k], beta1, beta2, c1, c2, step_size, bc2_sqrt, eps, decay)
    return gg, mm, gm


@jit
def row_dots(P, Q, rows_p, rows_q, out):
    """``out[k] = P[rows_p[k]] . Q[rows_q[k]]`` (every row index checked), summed in P's dtype."""
    n_p, n_q = P.shape[0], Q.shape[0]
    n = out.shape[0]
    for k in range(n):
        if k + PREFETCH_AHEAD < n:  # both rows of the pair a few places on (random reads, as in data_term)
            a, b = rows_p[k + PREFETCH_AHEAD], rows_q[k + PREFETCH_AHEAD]
            if 0 <= a < n_p and 0 <= b < n_q:
                prefetch_row_read(P, a)
                prefetch_row_read(Q, b)
        a, b = rows_p[k], rows_q[k]
        if a < 0 or a >= n_p or b < 0 or b >= n_q:
            raise IndexError("a row index lies outside the factor tables")
        s = P.dtype.type(0.0)
        for f in range(P.shape[1]):
            s += P[a, f] * Q[b, f]
        out[k] = s


@jit
def csr_of_pairs(users, items, n_users, n_items):
    """``(indptr, indices)``: the CSR of the (user, item) pairs, items ascending within each user.

    Two counting sorts, O(n + n_users + n_items): the users by item, then those stably by user,
    reading them in item order (sequential reads; the writes go to one position per user). A sort
    of ``user * n_items + item`` keys took 0.3-0.4 s at 9M pairs, and four arrays of their size."""
    n = users.shape[0]
    start = np.zeros(n_items + 1, dtype=np.int64)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    for k in range(n):
        u, i = users[k], items[k]
        if u < 0 or u >= n_users or i < 0 or i >= n_items:
            raise IndexError("a pair's index lies outside 0..n_users-1 or 0..n_items-1")
        start[i + 1] += 1
        indptr[u + 1] += 1
    for i in range(n_items):
        start[i + 1] += start[i]
    for u in range(n_users):
        indptr[u + 1] += indptr[u]
    fill = start[:-1].copy()
    by_item = np.empty(n, dtype=np.int32)  # each pair's user, in item order (n_users < 2**31: the caller checks)
    for k in range(n):
        i = items[k]
        by_item[fill[i]] = users[k]
        fill[i] += 1
    at = indptr[:-1].copy()
    indices = np.empty(n, dtype=np.int64)
    for i in range(n_items):
        for j in range(start[i], start[i + 1]):
            u = by_item[j]
            indices[at[u]] = i
            at[u] += 1
    return indptr, indices
