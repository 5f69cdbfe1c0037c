"""The implicit-feedback matrix of SVD++: who rated what in training, rows scaled by |N(u)|^{-1/2}.

``N`` (users x items, CSR) has ``N[u, j] = |N(u)|^{-1/2}`` for every item ``j`` in ``N(u)``, the
set of items ``u`` rated in training (a pair rated twice counts once), so ``N Y`` is each
user's normalised sum of implicit factors and ``N^T dZ`` its gradient back to ``Y``. Both are
one SpMM (the transposed pattern is built once).
"""

from __future__ import annotations

import torch

from recsys_flowadam.models.sparse import _crow, _csr


class ImplicitFeedback:
    """``N`` in CSR (and ``N^T``) on the ratings' device, plus its entries as flat arrays.

    ``users``/``items``/``weights``: the distinct training pairs sorted by (user, item) and
    their value ``|N(u)|^{-1/2}``; ``crow``: the CSR row pointer over ``users``.
    """

    def __init__(self, users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                 dtype: torch.dtype) -> None:
        key = torch.unique(users * n_items + items)  # sorted: by user, then item
        self.users, self.items = key // n_items, key % n_items
        self.n_users, self.n_items = n_users, n_items
        counts = torch.bincount(self.users, minlength=n_users)
        self.weights = counts.clamp(min=1).to(dtype).rsqrt().index_select(0, self.users)
        self.crow = _crow(self.users, n_users)
        self.matrix = _csr(self.crow, self.items, self.weights, (n_users, n_items))
        t_order = torch.argsort(self.items * n_users + self.users)
        self.transposed = _csr(_crow(self.items[t_order], n_items), self.users[t_order].contiguous(),
                               self.weights[t_order].contiguous(), (n_items, n_users))

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def sums(self, Y: torch.Tensor) -> torch.Tensor:
        """``N Y``: every user's normalised implicit sum, shape (n_users, rank)."""
        return self.matrix @ Y

    def back(self, dZ: torch.Tensor) -> torch.Tensor:
        """``N^T dZ``: the gradient of ``Y`` from the gradient of the effective user factors."""
        return self.transposed @ dZ
