"""``laprust`` backend: Jonker-Volgenant by ``laprust.lapjv`` / ``laprust.lapjv_batch`` (Rust).

laprust 1.0 is lapx's ``lapjvr`` solver ported to Rust (same algorithm, same speed within noise
on 2 CPU cores); math and precision: see ``rebasin.solvers.jvr`` — exact, certified=True, gap=0.
"""
from __future__ import annotations

import functools
import importlib.util

from rebasin.solvers._common import Array, Assignment, SolverUnavailable
from rebasin.solvers.jvr import jvr_functions, solve_jvr


@functools.cache
def laprust_available() -> bool:
    """True when the laprust package with ``lapjv`` and ``lapjv_batch`` is importable."""
    if importlib.util.find_spec("laprust") is None:
        return False
    try:
        import laprust

        return hasattr(laprust, "lapjv") and hasattr(laprust, "lapjv_batch")
    except Exception:
        return False


def solve_laprust(cost: Array, maximize: bool = True, *, precision: str = "float64", n_threads: int = 0
                  ) -> Assignment:
    """Solve each (n, n) slice of a (b, n, n) cost with laprust's JV; perm (b, n).

    ``n_threads``: workers for a batch (0: the caller's thread budget, see ``jvr``)."""
    if not laprust_available():
        raise SolverUnavailable("solver 'laprust' needs the laprust package (pip install laprust); "
                                "it is not importable here")
    return solve_jvr("laprust", *jvr_functions("laprust"), cost, maximize, precision, n_threads)
