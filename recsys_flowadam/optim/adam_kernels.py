"""The numba kernels of :mod:`recsys_flowadam.optim.fused_adam` (imported only when numba is).

Top-level functions so that numba's on-disk cache finds them again in a new process.
"""

import numba
import numpy as np

from recsys_flowadam.adam_formula import adam_element

# fastmath without nnan/ninf: a NaN gradient must still reach the parameters and the statistics;
# error_model="numpy": a float division needs no zero check, so the update vectorises (numba's
# default "python" model kept the loop scalar: 4-5x slower)
jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, boundscheck=False,
                 error_model="numpy")


@jit
def adam_range(p, g, m, v, lo, hi, beta1, beta2, step_size, bc2_sqrt, eps, decay, l2, sums):
    """Adam on elements ``lo <= k < hi`` of the flat arrays ``p`` (parameters), ``g`` (gradient),
    ``m``, ``v`` (moments), in place; scalars in the arrays' dtype. ``decay``: AdamW's factor
    ``1 - lr * weight_decay`` (1: none); ``l2``: Adam's ``weight_decay`` added to the gradient (0:
    none). With ``sums``, returns ``(g.g, m.m, g.m)`` over the range in float64, ``m`` as it was
    before this step (FlowAdam's trigger statistics, read in the same pass); else zeros.

    The loops run over slices, not ``range(lo, hi)``: over the range LLVM did not vectorise them
    (5x slower)."""
    P, G, M, V = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    one = p.dtype.type(1.0)
    c1 = one - beta1
    c2 = one - beta2
    gg = 0.0
    mm = 0.0
    gm = 0.0
    if sums:
        for k in range(P.shape[0]):
            gk = G[k]
            mk = M[k]
            gg += np.float64(gk) * np.float64(gk)
            mm += np.float64(mk) * np.float64(mk)
            gm += np.float64(gk) * np.float64(mk)
            P[k], M[k], V[k] = adam_element(P[k], gk + l2 * P[k], mk, V[k], beta1, beta2, c1, c2, step_size,
                                            bc2_sqrt, eps, decay)
    elif l2 != 0:
        for k in range(P.shape[0]):
            P[k], M[k], V[k] = adam_element(P[k], G[k] + l2 * P[k], M[k], V[k], beta1, beta2, c1, c2, step_size,
                                            bc2_sqrt, eps, decay)
    else:
        for k in range(P.shape[0]):
            P[k], M[k], V[k] = adam_element(P[k], G[k], M[k], V[k], beta1, beta2, c1, c2, step_size, bc2_sqrt,
                                            eps, decay)
    return gg, mm, gm
