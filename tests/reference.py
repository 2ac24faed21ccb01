"""Exact reference answers shared by the solver and kernel tests."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def ref_objective(c: torch.Tensor, maximize: bool) -> np.ndarray:
    """scipy's optimal objective per problem of an (n, n) or (b, n, n) cost, float64, shape (b,)."""
    c64 = c.detach().cpu().double().numpy()
    if c64.ndim == 2:
        c64 = c64[None]
    out = []
    for m in c64:
        r, k = linear_sum_assignment(m, maximize=maximize)
        out.append(m[r, k].sum())
    return np.array(out)
