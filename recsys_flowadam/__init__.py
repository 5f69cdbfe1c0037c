"""recsys-flowadam: collaborative filtering trained with FlowAdam, served over HTTP.

Data flows one way: ``data`` (loaders, splits) -> ``models`` (factorizations and their
fast gradients) -> ``optim`` (FlowAdam and baselines) -> ``train`` (trainer, evaluation,
artifacts) -> ``serve`` (the HTTP service). ``Recommender`` is the scikit-learn-style
Python API over all of it.
"""

import os

# OpenMP threads (torch, implicit) spin-wait between parallel regions by default. On a machine
# whose cores are busy with anything else, the spinning thread steals the core the work needs:
# `train` on ML-100K took 40 s with 2 threads against 3.2 s with 1 on a 2-core box while one
# other process ran, and 3.1 s with 2 threads under PASSIVE. The policy is read once, when the
# OpenMP runtime starts (at torch's import), so it is set here, before any module of this
# package imports torch; the CLI and the Python API alike get it. A user's own setting wins;
# a program that imported torch before this package keeps the runtime's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["Recommender", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import recsys_flowadam` (and the CLI's start) does not import torch.
    if name == "Recommender":
        from recsys_flowadam.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'recsys_flowadam' has no attribute {name!r}")
