"""The fixed batch order: which training examples form the minibatch of step t."""

from __future__ import annotations

import numpy as np
import torch


class BatchOrder:
    """Which training examples form the minibatch of step t.

    ``none``: batch b of every epoch is examples [b*B, (b+1)*B); ``seeded``: epoch e uses ``default_rng(shuffle_seed + e).permutation``; ``unseeded``: torch's global
    RNG (a different order on every replay; exists so that ``check()`` can prove it refuses it).

    When B does not divide n, ``drop_last`` (the default, as the paper's loop) drops the last
    n mod B examples of each epoch's order (:attr:`dropped`: the same examples every epoch unless
    shuffled); ``drop_last=False`` trains on them as a smaller last batch of each epoch (its loss
    the mean over those examples, as ``DataLoader(drop_last=False)``).
    """

    def __init__(self, n: int, batch_size: int, shuffle: str, shuffle_seed: int, device,
                 drop_last: bool = True):
        if batch_size > n:
            raise ValueError(f"`batch_size` must be at most the number of training examples ({n}), "
                             f"got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, shuffle_seed
        self.drop_last = bool(drop_last)
        self.per_epoch = n // batch_size if self.drop_last else -(-n // batch_size)
        self.dropped = n - self.per_epoch * batch_size if self.drop_last else 0
        self.device = device
        self._perm_cache: dict[int, torch.Tensor] = {}

    def indices(self, t: int) -> slice | torch.Tensor:
        epoch, b = divmod(t, self.per_epoch)
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n)
        if self.shuffle == "none":
            return slice(lo, hi)
        if self.shuffle == "unseeded":
            return torch.randperm(self.n, device=self.device)[lo:hi]
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = torch.as_tensor(np.random.default_rng(self.seed + epoch).permutation(self.n),
                                   device=self.device)
            self._perm_cache = {epoch: perm}
        return perm[lo:hi]
