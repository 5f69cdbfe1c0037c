"""Adam's update of one element, the one formula of the compiled kernels that take Adam's step:
the optimizer's pass (``optim.adam_kernels``) and the gradient kernel's rows
(``models.fused_kernels``, through ``row_step``). Imported only where numba is.

Why a module of its own: both layers compile it into their loops, and neither should import the
other for it (as ``row_step`` and ``kernel_pool`` sit between them). numba's on-disk cache keys a
kernel on its own file, not on what it inlines: after a change here, clear the kernels' caches
(or touch their files), as for ``models.cpu_prefetch``."""

import numba
import numpy as np


@numba.njit(inline="always")
def adam_element(p, g, m, v, beta1, beta2, c1, c2, step_size, bc2_sqrt, eps, decay):
    """One element's Adam step (``c1 = 1 - beta1``, ``c2 = 1 - beta2``; ``decay``: AdamW's factor,
    1 for none), ``(p, m, v)`` after it. Inlined where it is used, so that the loops around it
    still vectorise."""
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    return p * decay - step_size * m / (np.sqrt(v) / bc2_sqrt + eps), m, v
