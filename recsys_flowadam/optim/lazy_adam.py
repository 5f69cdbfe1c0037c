"""Lazy Adam ("lazy-adam"): Adam whose moments and parameters move only on the rows a mini-batch
touches, the update fused with the batch's gradient (``models.row_sparse``).

Why: in collaborative filtering a mini-batch touches a small share of the user and item rows.
Dense Adam decays every row's moments and moves every row by its stale momentum at each step,
and its cost grows with the model, not the batch. Lazy Adam (as ``torch.optim.SparseAdam``, or
TensorFlow's LazyAdam) updates a row only when its gradient is there, so a pass over the data
costs work in proportion to the ratings, and each row moves about as often as it is rated
(figures in ``models/README.md``).

The class holds the hyper-parameters and, per parameter, the moments ``exp_avg`` and
``exp_avg_sq`` (what a checkpoint saves) and the shared step count. ``step(closure)`` counts the
step and calls the closure, which must be the trainer's fused step (``models.row_sparse.
LazyAdamStep``): it computes the batch's gradient and applies this update in one compiled pass,
and says so through :meth:`applied`. A closure that only sets ``.grad`` is refused: the rows a
batch touched are not known from a dense gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["LazyAdam"]


class LazyAdam(torch.optim.Optimizer):
    """Adam on the touched rows only; ``lr``, ``betas`` and ``eps`` as ``torch.optim.Adam``'s."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not lr > 0.0:
            raise ValueError(f"lazy-adam: lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"lazy-adam: betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"lazy-adam: eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self._applied = False
        self.step_count = 0  # steps taken; every row shares it (saved as each parameter's "step")
        for group in self.param_groups:
            for p in group["params"]:
                self.moments(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, less its ``torch._disable_dynamo`` wrapper: that wrapper imports torch._dynamo
        (about 2 s on this CPU) though nothing here is compiled; a fold of ML-100K trains in less."""
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        seen = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) in seen for p in param_group["params"]):
            raise ValueError("lazy-adam: a parameter appears in more than one group")
        self.param_groups.append(param_group)

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp_avg, exp_avg_sq)`` of parameter ``p`` (zero until its first update)."""
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st["exp_avg"], st["exp_avg_sq"]

    def hyper(self) -> dict[str, float]:
        """This step's update constants (after :meth:`step` counted it): ``step_size`` = lr /
        (1 - beta1^t) and ``rc2`` = 1 / sqrt(1 - beta2^t), Adam's bias corrections."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        t = self.step_count
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"],
                "step_size": group["lr"] / (1.0 - beta1**t), "rc2": (1.0 - beta2**t) ** -0.5}

    def state_dict(self) -> dict[str, Any]:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(float(self.step_count))
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        first = self.param_groups[0]["params"][0]
        self.step_count = int(self.state[first].get("step", 0))

    def applied(self) -> None:
        """Called by the fused step once it has updated the parameters."""
        self._applied = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Count the step, then run the fused closure (gradient and update in one pass)."""
        return self.fused_step(closure)

    def fused_step(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`step` without the hooks and profiler range torch wraps ``step`` in, for the
        trainer's loop, which owns this optimizer: torch's global step hooks
        (``register_optimizer_step_pre_hook``) do not see it, nor a profiler its range. Kept to a few
        Python operations: on ML-100K-sized batches of 1,000 a step's kernel takes 0.2 ms, and the
        wrapper added about 10% to a step there."""
        if closure is None:
            raise ValueError("lazy-adam needs the trainer's fused step as its closure")
        self.step_count += 1
        self._applied = False
        loss = closure()
        if not self._applied:
            raise RuntimeError("lazy-adam updates only through the fused row-sparse mini-batch step "
                               "(models.row_sparse); a closure that sets .grad does not say which rows a batch touched")
        return loss
