"""Data sets and the fixed batch order. Everything is offline: sklearn ships the digits data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .recipe import DataSpec


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors on the recipe's device and dtype; labels are int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load(spec: DataSpec, *, dtype: torch.dtype, device: torch.device) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data / 16.0
    y = digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=spec.test_size,
                                              random_state=spec.split_seed)
    if spec.n_train is not None:
        if spec.n_train > len(x_tr):
            raise ValueError(f"`n_train` must be at most {len(x_tr)}, got {spec.n_train}")
        x_tr, y_tr = x_tr[: spec.n_train], y_tr[: spec.n_train]
    rng = np.random.default_rng(spec.variant_seed)
    if spec.variant == "shuffled_labels":
        y_tr = rng.permutation(y_tr)
    elif spec.variant == "white_noise":
        x_tr = rng.standard_normal(x_tr.shape)
        x_te = rng.standard_normal(x_te.shape)

    def t(a, dt):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

    return Dataset(t(x_tr, dtype), t(y_tr, torch.int64), t(x_te, dtype), t(y_te, torch.int64), 10)


class BatchOrder:
    """Which training examples form the minibatch of step t.

    ``none``: batch b of every epoch is examples [b*B, (b+1)*B) (a trailing partial batch is dropped);
    ``seeded``: epoch e uses ``default_rng(shuffle_seed + e).permutation``; ``unseeded``: torch's global
    RNG (a different order on every replay; exists so that ``check()`` can prove it refuses it).
    """

    def __init__(self, n: int, batch_size: int, shuffle: str, shuffle_seed: int, device):
        if batch_size > n:
            raise ValueError(f"`batch_size` must be at most the number of training examples ({n}), "
                             f"got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, shuffle_seed
        self.per_epoch = n // batch_size
        self.device = device
        self._perm_cache: dict[int, torch.Tensor] = {}

    def indices(self, t: int) -> slice | torch.Tensor:
        epoch, b = divmod(t, self.per_epoch)
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
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
