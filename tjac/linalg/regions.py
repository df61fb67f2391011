"""The paper's split of the spectrum: chaotic (s > 1 + eps), bulk (|s - 1| <= eps), stable (s < 1 - eps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPSILONS = (1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class Regions:
    eps: float
    chaotic: int
    bulk: int
    stable: int
    n: int                     # how many singular values were counted
    complete: bool             # True when they are all P of them (dense path)

    def as_dict(self) -> dict:
        return {"eps": self.eps, "chaotic": self.chaotic, "bulk": self.bulk, "stable": self.stable,
                "n": self.n, "complete": self.complete}


def region_counts(S: torch.Tensor, eps: float, *, P: int | None = None) -> Regions:
    S = torch.as_tensor(S).double()
    if not eps > 0:
        raise ValueError(f"`eps` must be a positive number, got {eps!r}")
    chaotic = int((S > 1 + eps).sum())
    stable = int((S < 1 - eps).sum())
    n = int(S.numel())
    return Regions(eps=eps, chaotic=chaotic, bulk=n - chaotic - stable, stable=stable, n=n,
                   complete=P is not None and n == P)


def alignment(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """|u_i . v_i| per triplet (1 in the bulk, where J acts like the identity)."""
    return (U * V).sum(0).abs()
