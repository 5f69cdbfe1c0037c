"""recsys-flowadam: collaborative filtering trained with FlowAdam, served over HTTP.

Data flows one way: ``data`` (loaders, splits) -> ``models`` (factorizations and their
fast gradients) -> ``optim`` (FlowAdam and baselines) -> ``train`` (trainer, evaluation,
artifacts) -> ``serve`` (the HTTP service).
"""

__version__ = "0.1.0"
