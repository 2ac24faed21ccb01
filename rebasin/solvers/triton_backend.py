"""``triton`` backend: the batched GPU Hungarian (``rebasin_kernels.hungarian``), one program per problem.

The kernel solves in fp32 and returns duals; the answer is checked by those duals in float64:
``gap`` bounds the distance to the optimum and ``certified`` says it is within round-off.
"""
from __future__ import annotations

import torch
from rebasin_kernels.backend import triton_installed
from rebasin_kernels.hungarian import batched_lap

from rebasin.solvers._common import Array, Assignment, make_result


def triton_available() -> bool:
    """True when triton is installed and a CUDA device is present."""
    return triton_installed() and torch.cuda.is_available()


def solve_triton(cost: Array, maximize: bool = True, **_: object) -> Assignment:
    """Solve each (n, n) slice of a (b, n, n) cost on the GPU (fp32), certified by float64 duals; perm (b, n)."""
    c = torch.as_tensor(cost)
    c = c if c.device.type == "cuda" else c.cuda()
    perm, u, v = batched_lap(c.float(), maximize=maximize, backend="triton")
    c64, u64, v64 = c.double(), u.double()[:, :, None], v.double()[:, None, :]
    red = (u64 + v64 - c64) if maximize else (c64 - u64 - v64)
    gap = float((-red.clamp(max=0).amin(dim=2)).sum(dim=1).max())
    tol = 1e-5 * max(1.0, float(c64.abs().amax())) * c.shape[-1]
    return make_result(c, perm.cpu().numpy(), "triton", certified=gap <= tol, gap=gap)
