"""How a flow's velocity enters Adam's first moment (FlowAdam's momentum injection).

Shared by the ODE branch of every preset: the dopri5/fixed-step solve of presets A and B and
the one-stage Euler flow of the everyday preset E (``optim.everyday``).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["INJECTIONS", "inject_momentum"]

INJECTIONS = ("soft", "hard", "none")


def inject_momentum(
    exp_avgs: Sequence[torch.Tensor], velocities: Sequence[torch.Tensor], gamma: float, injection: str
) -> None:
    """Blend the ODE velocity into Adam's first moment, in place, per parameter tensor.

    soft: s = min(1, 5 ||m|| / (||v|| + 1e-8)), m <- (1 - gamma) m + gamma s v (the cap keeps a
    long flow from swamping the momentum); hard: m <- v; none: nothing. ``velocities`` may be
    overwritten.
    """
    exp_avgs, velocities = list(exp_avgs), list(velocities)
    if injection == "none" or not exp_avgs:
        return
    if injection == "hard":
        torch._foreach_copy_(exp_avgs, velocities)
        return
    if injection != "soft":
        raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
    m_norms = torch._foreach_norm(exp_avgs)
    v_norms = torch._foreach_norm(velocities)
    torch._foreach_add_(v_norms, 1e-8)
    scale = torch._foreach_div(m_norms, v_norms)
    torch._foreach_mul_(scale, 5.0)
    torch._foreach_clamp_max_(scale, 1.0)
    torch._foreach_mul_(scale, gamma)
    torch._foreach_mul_(velocities, scale)
    torch._foreach_mul_(exp_avgs, 1.0 - gamma)
    torch._foreach_add_(exp_avgs, velocities)
