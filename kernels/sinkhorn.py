"""Batched log-domain Sinkhorn for square assignment problems.

Math (minimisation, uniform marginals of ones): find potentials ``f, g`` such that the plan

    P_ij = exp((f_i + g_j - C_ij) / eps)

has every row and column summing to 1. Alternating exact updates:

    f_i = -eps * logsumexp_j((g_j - C_ij) / eps)
    g_j = -eps * logsumexp_i((f_i - C_ij) / eps)

As ``eps -> 0`` (``f``, ``g``) tend to optimal duals of the linear assignment problem
``min_perm sum_i C[i, perm[i]]``; ``C - f[:, None] - g[None, :]`` is then a reduced cost
whose small entries mark the likely optimal edges.
"""
from __future__ import annotations

import torch


def sinkhorn_reference(
    cost: torch.Tensor, eps: float, n_iters: int = 100, tol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Plain torch log-domain Sinkhorn.

    Args:
        cost: (b, n, n) or (n, n) costs to *minimise*; computed in float32.
        eps: entropic regularisation, in the units of ``cost``.
        n_iters: maximum number of (f, g) update pairs.
        tol: stop when the largest row-marginal error ``max_i |sum_j P_ij - 1|`` is below it.

    Returns:
        f: (b, n) or (n,) row potentials, float32.
        g: (b, n) or (n,) column potentials, float32.
        iters: the number of update pairs run.
    """
    squeeze = cost.dim() == 2
    c = cost.float().unsqueeze(0) if squeeze else cost.float()
    b, n, m = c.shape
    if n != m:
        raise ValueError(f"sinkhorn needs square costs, got {tuple(cost.shape)}")
    f = torch.zeros(b, n, dtype=torch.float32, device=c.device)
    g = torch.zeros(b, n, dtype=torch.float32, device=c.device)
    scaled = c / eps
    it = 0
    for it in range(1, n_iters + 1):
        f = -eps * torch.logsumexp(g[:, None, :] / eps - scaled, dim=2)
        g = -eps * torch.logsumexp(f[:, :, None] / eps - scaled, dim=1)
        rows = torch.exp((f[:, :, None] + g[:, None, :]) / eps - scaled).sum(dim=2)
        if float((rows - 1).abs().max()) < tol:
            break
    if squeeze:
        return f[0], g[0], it
    return f, g, it
