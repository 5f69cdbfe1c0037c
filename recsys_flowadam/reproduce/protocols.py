"""The two comparison protocols, as lists of *contenders* (an optimizer with its objective and grids).

``paper``: the paper's set-up. Its Adam minimises the data loss *without* the L2 term and gets
torch's coupled ``weight_decay = lambda`` (the gradient gains lambda * theta); AdamW minimises
the data loss with decoupled weight decay 1e-2; FlowAdam minimises loss + lambda * ||theta||^2
(gradient gains 2 * lambda * theta). So Adam and FlowAdam do not minimise the same function.

``fair``: every optimizer minimises the identical objective loss + lambda * ||theta||^2 with no
weight decay (AdamW is therefore left out: with decay 0 it *is* Adam, with decay > 0 it
minimises something else); each optimizer's learning rate is tuned on the validation split over
a grid of the same size, extended past an edge where the best lr sits on it (``tuning``); Adam
and Lion are also re-run compute-matched: given as many gradient evaluations as FlowAdam spent
on the same seed (more steps), their learning rate re-tuned for that budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("paper", "fair")

# The paper's FlowAdam: preset "B" (switch 0.90, curvature 0.1, t_scale 0.5) with dopri5, spelt out
# so that reproduce never follows a change of the registry's default ("E" for train).
FLOWADAM_B = {"mode": "B", "ode_method": "dopri5"}


@dataclass(frozen=True)
class Contender:
    """One row of a comparison.

    ``reg``: the explicit L2 weight in the objective; ``kwargs``: optimizer options;
    ``lr_grid`` x ``kw_grid``: the tuning grid (one point: no tuning); ``match``: label of the
    contender whose per-seed gradient-evaluation count this one is given (compute matching);
    ``lr_from``: label of the contender whose tuned lr and options this one starts from;
    ``retune``: re-tune that lr for this row's own budget on the first seed (the choice and its
    neighbours in the other's tuning, extended like any grid) instead of reusing it;
    ``max_grad_evals``: an evaluation budget instead of a step count (L-BFGS).
    """

    label: str
    optimizer: str
    reg: float
    lr_grid: tuple[float, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    kw_grid: tuple[dict[str, Any], ...] = ({},)
    match: str | None = None
    lr_from: str | None = None
    max_grad_evals: int | None = None
    retune: bool = False

    @property
    def grid(self) -> list[tuple[float, dict[str, Any]]]:
        return [(lr, kw) for kw in self.kw_grid for lr in self.lr_grid]

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "optimizer": self.optimizer, "l2_in_objective": self.reg,
                "kwargs": self.kwargs, "lr_grid": list(self.lr_grid), "kw_grid": list(self.kw_grid),
                "grid_size": len(self.grid), "compute_matched_to": self.match, "lr_from": self.lr_from,
                "retune": self.retune, "max_grad_evals": self.max_grad_evals}


def paper_fixed(lam: float, lr: float = 0.01, *, adamw: bool = True) -> list[Contender]:
    """The synthetic experiments of the paper: fixed lr, Adam with coupled decay, FlowAdam with explicit L2."""
    out = [Contender("Adam", "adam", 0.0, (lr,), {"weight_decay": lam}),
           Contender("FlowAdam", "flowadam", lam, (lr,), dict(FLOWADAM_B))]
    if adamw:
        out.insert(1, Contender("AdamW", "adamw", 0.0, (lr,), {"weight_decay": 1e-2}))
    return out


# fair protocol grids: the same size (4) for every tuned optimizer. Lion's grid is shifted down
# by 10x because its sign update has unit size per coordinate (its authors recommend a 3-10x
# smaller lr than Adam's); the grid *size* is what the protocol keeps equal.
FAIR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
FAIR_GRID_LION = (1e-4, 3e-4, 1e-3, 3e-3)
QUICK_FAIR_GRID = (3e-3, 1e-2)
QUICK_FAIR_GRID_LION = (3e-4, 1e-3)


def fair_tuned(lam: float, *, quick: bool = False, lbfgs_evals: int | None = None, extra: bool = True,
               grid: tuple[float, ...] | None = None) -> list[Contender]:
    """Identical objective for all, lr tuned on validation over equal-size grids, compute-matched baselines.

    ``grid`` replaces the default lr grid (Lion gets it divided by 10). The compute-matched rows
    re-tune their lr for their budget, except under ``quick`` (a smoke run: they reuse the baseline's).
    """
    if grid is not None:
        lion = tuple(lr / 10 for lr in grid)
    else:
        grid = QUICK_FAIR_GRID if quick else FAIR_GRID
        lion = QUICK_FAIR_GRID_LION if quick else FAIR_GRID_LION
    out = [Contender("Adam", "adam", lam, grid), Contender("FlowAdam", "flowadam", lam, grid, dict(FLOWADAM_B))]
    if extra:
        out += [Contender("Lion", "lion", lam, lion), Contender("AdaBelief", "adabelief", lam, grid)]
    if lbfgs_evals:
        out.append(Contender("L-BFGS", "lbfgs", lam, (1.0,), {"line_search_fn": "strong_wolfe", "history_size": 10},
                             max_grad_evals=lbfgs_evals))
    out.append(Contender("Adam (compute-matched)", "adam", lam, (), match="FlowAdam", lr_from="Adam", retune=not quick))
    if extra:
        out.append(Contender("Lion (compute-matched)", "lion", lam, (), match="FlowAdam", lr_from="Lion",
                             retune=not quick))
    return out


def describe_protocol(name: str, contenders: list[Contender], *, summary: str | None = None,
                      **details: Any) -> dict[str, Any]:
    """The protocol as recorded in the JSON and the report; ``summary`` replaces the protocol's usual text."""
    retuned = any(c.retune for c in contenders if c.match)
    matched = ("their lr re-tuned for that budget on the first seed (the baseline's tuned lr and its neighbours in its "
               "grid, extended the same way)" if retuned else "at the baseline's tuned lr (not re-tuned in this run)")
    text = summary or {
        "paper": "The paper's set-up: Adam minimises the data loss with torch's coupled weight_decay=lambda; "
                 "AdamW the data loss with decoupled weight decay 1e-2; FlowAdam minimises "
                 "loss + lambda*||theta||^2 (twice Adam's regularisation gradient).",
        "fair": "Every optimizer minimises the identical objective loss + lambda*||theta||^2 (no weight decay); "
                "each optimizer's lr is tuned on the validation split over a grid of the same size (tuned on the "
                "first seed, then fixed for all seeds); where the best lr sits on an edge of the grid, the grid is "
                "extended as the 'tuning' line says; '(compute-matched)' rows rerun the baseline with as many gradient "
                f"evaluations as FlowAdam spent on the same seed, {matched}.",
    }[name]
    return {"name": name, "summary": text, "contenders": [c.describe() for c in contenders], **details}
