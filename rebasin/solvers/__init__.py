"""Linear-assignment solvers: one contract, several backends (docs/design.md, Solvers).

    from rebasin.solvers import solve, Assignment, available_solvers, SOLVERS
    res = solve(cost, method="auto", maximize=True)

``cost``: torch.Tensor or numpy array of shape (n, n) or (b, n, n), any float dtype, any device.
Returns an :class:`Assignment` (perm int64 (n,)/(b, n) on the input's device, float64 objective,
certified, gap, method, stats). Every backend returns valid permutations or raises.

Modules: ``registry`` (``SOLVERS``, ``solve``), ``auto`` (the default policy: row bound, then
the fastest exact backend), and one per backend: ``scipy_backend`` (reference), ``jv_backend``
(the C dense JV), ``lapx_backend`` and ``laprust_backend`` (lapjvr JV, shared code in ``jvr``),
``emd_backend`` (POT network simplex), ``sinkhorn_backend`` (entropic, approximate, with a dual
gap bound), ``certified`` (reduction/Sinkhorn duals -> sparse exact -> dense dual certificate),
``triton_backend`` (batched GPU Hungarian). ``native`` wraps the C extension ``_lapcore``
(``_lapcore.c``: the dense JV, the certified solver's passes, auto's fused first pass, the
per-solve checks), built by setup.py when a C compiler is present; without it every solver
still works, on its numpy/torch path.
"""
from rebasin.solvers._common import Assignment, SolverSpec, SolverUnavailable
from rebasin.solvers.registry import SOLVERS, available_solvers, solve, solver_names

__all__ = ["SOLVERS", "Assignment", "SolverSpec", "SolverUnavailable", "available_solvers", "solve", "solver_names"]
