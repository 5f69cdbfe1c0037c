"""The numba kernels of :mod:`recsys_flowadam.models.fused_cpu` (imported only when numba is).

Top-level functions so that numba's on-disk cache finds them again in a new process.
"""

import numba
import numpy as np

# fastmath without nnan/ninf: a NaN or infinite loss must stay one (the trainer stops on it)
jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False)


@jit
def user_order(users, n_users):
    """The ratings' positions grouped by user (a counting sort: O(m + n_users))."""
    start = np.zeros(n_users + 1, dtype=np.int64)
    for k in range(users.shape[0]):
        start[users[k] + 1] += 1
    for u in range(n_users):
        start[u + 1] += start[u]
    order = np.empty(users.shape[0], dtype=np.int64)
    for k in range(users.shape[0]):
        u = users[k]
        order[start[u]] = k
        start[u] += 1
    return order


@jit
def data_term(users, items, values, U, V, bu, bi, offset, huber, delta, scale, dU, dV, dbu, dbi, extra, g_out):
    """Adds each rating's ``psi(r) / m`` terms into the gradients; returns sum rho(r) / m.
    ``extra`` (empty: none): a per-rating addition to the prediction (the time models' terms);
    ``g_out`` (empty: not wanted): receives each rating's ``psi(r) / m``, for the gradients of
    such terms.

    ``offset``, ``delta`` and ``scale`` (``2 / m``) come as scalars of the parameters' dtype, so
    the per-rating arithmetic stays in it (a float64 constant would widen every float32 product;
    about 10% slower); the loss is summed in float64. The ratings are visited user by user: ``U``
    and ``dU`` rows are then read and written in order (in the batch's own random order the same
    loop is 3.5x slower, waiting on memory)."""
    m = users.shape[0]
    rank = U.shape[1]
    has_bias = bu.shape[0] > 0
    has_extra = extra.shape[0] > 0
    keep_g = g_out.shape[0] > 0
    total = 0.0
    order = user_order(users, U.shape[0])
    for j in range(m):
        k = order[j]
        u = users[k]
        i = items[k]
        pred = offset
        if has_bias:
            pred += bu[u] + bi[i]
        if has_extra:
            pred += extra[k]
        for f in range(rank):
            pred += U[u, f] * V[i, f]
        r = pred - values[k]
        if huber and abs(r) > delta:
            total += 2.0 * float(delta) * abs(float(r)) - float(delta) * float(delta)
            g = scale * (delta if r > 0 else -delta)
        else:
            total += float(r) * float(r)
            g = scale * r
        if keep_g:
            g_out[k] = g
        if has_bias:
            dbu[u] += g
            dbi[i] += g
        for f in range(rank):
            uf = U[u, f]
            dU[u, f] += g * V[i, f]
            dV[i, f] += g * uf
    return total / m


@jit
def penalty_init(P, G, w, lam):
    """``G = 2 lam w * P`` row by row (``w`` empty: uniform 1); returns ``lam sum w ||P_r||^2``."""
    n = P.shape[0]
    cols = P.shape[1]
    weighted = w.shape[0] > 0
    total = 0.0
    for row in range(n):
        c = lam * (w[row] if weighted else 1.0)
        s = 0.0
        for f in range(cols):
            p = P[row, f]
            s += p * p
            G[row, f] = 2.0 * c * p
        total += c * s
    return total
