"""Synthetic linear-assignment problems, shared by the solver tests and benchmarks.

``make_cost(kind, n, batch=None, seed=0)`` returns a float32 torch tensor of shape
(n, n) or (batch, n, n); every kind is meant to be *maximised* (similarities), but the
minimisation problem on the same matrix is just as valid a test.

Kinds
-----
strong       similarity of a model with a permuted, lightly perturbed copy of itself:
             A ~ N(0,1)^{n x d}, B = A[perm] + 0.1 * noise, C = B @ A.T / d.
             A clear diagonal after permutation: every solver finds it fast.
moderate     between the two: B = s * A[perm] + noise with the true partner MODERATE_Z standard
             deviations above a random unit. Most rows' best columns are distinct (~0.9 of them
             at n = 4096) but not all: the row bound does not settle it, dense JV still does well.
weak         like two independently trained models: B = s * A[perm] + noise with a small
             signal s, C = B @ A.T / d. The planted permutation is only weakly visible and
             dense Hungarian/JV solvers need many augmenting-path steps (scipy > 1 s at
             n = 4096 on 2 cores).
uniform      C ~ U(0, 1) i.i.d.
integer      small random integers in [0, 4): massive ties, many optimal permutations.
constant     every entry equal: every permutation is optimal.
adversarial  a structured, degenerate matrix: C_ij = (i * j) mod 7 + (i + j) / n^2 ...
             see ``_adversarial``: mixes a rank-1 product ordering (i * j, whose optimum is a
             sorted pairing with many near-ties) with a periodic integer pattern.
"""
from __future__ import annotations

import math

import torch

KINDS = ("strong", "moderate", "weak", "uniform", "integer", "constant", "adversarial")

# "weak": the true partner's similarity stands WEAK_Z standard deviations above a random
# unit's — like units of two independently trained models, where dense solvers are slowest.
WEAK_Z = 2.5
MODERATE_Z = 5.5


def _feature_dim(n: int) -> int:
    """d comparable to n but capped so generation stays cheap at large n."""
    return int(min(max(64, n // 4), 1024))


def _similarity(n: int, signal: float, noise: float, gen: torch.Generator) -> torch.Tensor:
    d = _feature_dim(n)
    a = torch.randn(n, d, generator=gen)
    perm = torch.randperm(n, generator=gen)
    b = signal * a[perm] + noise * torch.randn(n, d, generator=gen)
    return (b @ a.T) / d


def _adversarial(n: int, gen: torch.Generator) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    rank1 = torch.outer(i, i) / max(1, (n - 1) ** 2)  # product ordering, near-ties
    periodic = ((i[:, None] * i[None, :]) % 7) / 7.0  # integer-tied pattern
    hilbert = 1.0 / (i[:, None] + i[None, :] + 1.0)  # smooth, ill-conditioned
    c = rank1 + periodic + hilbert
    # a random row/column shuffle so no solver gets the structure for free
    r = torch.randperm(n, generator=gen)
    s = torch.randperm(n, generator=gen)
    return c[r][:, s].float()


def _one(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "strong":
        return _similarity(n, 1.0, 0.1, gen)
    if kind == "moderate":
        return _similarity(n, MODERATE_Z / math.sqrt(_feature_dim(n)), 1.0, gen)
    if kind == "weak":
        return _similarity(n, WEAK_Z / math.sqrt(_feature_dim(n)), 1.0, gen)
    if kind == "uniform":
        return torch.rand(n, n, generator=gen)
    if kind == "integer":
        return torch.randint(0, 4, (n, n), generator=gen).float()
    if kind == "constant":
        return torch.full((n, n), math.pi)
    if kind == "adversarial":
        return _adversarial(n, gen)
    raise ValueError(f"unknown cost kind {kind!r}; choose from {', '.join(KINDS)}")


def make_cost(kind: str, n: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """A float32 cost (similarity) matrix of shape (n, n), or (batch, n, n) when ``batch`` is given.

    Deterministic in ``(kind, n, batch, seed)``; CPU tensor.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cost kind {kind!r}; choose from {', '.join(KINDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if batch is None:
        return _one(kind, n, gen).contiguous()
    return torch.stack([_one(kind, n, gen) for _ in range(batch)]) if batch > 0 else torch.empty(0, n, n)
