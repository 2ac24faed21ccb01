"""Linear-assignment solvers: ``auto`` (and its parts ``jv``, ``certified``) against every peer
package, as a user would call it, on synthetic problems (rebasin.solvers.problems).

Peers (raw package calls on the numpy view of the float32 cost, the negation for maximisation
and any dtype conversion inside the timed call; † = float32 arithmetic, not exact):
  scipy     ``scipy.optimize.linear_sum_assignment(c, maximize=True)`` (float64 inside)
  lapx      ``lap.lapjvs`` on float64 (batches: ``lapjvs_batch``, ``n_threads``)
  lapx32 †  ``lap.lapjvs(..., prefer_float32=True)``
  lapjv     src-d ``lapjv.lapjv(c64, force_doubles=True)`` (float64)
  lapjv32 † src-d ``lapjv.lapjv(c32)`` (its default: float32 AVX kernel)
  laprust   ``laprust.lapjv`` on float32 costs with float64 potentials (exact; batches:
            ``lapjv_batch``, ``n_threads``) — the same solver as lapx's ``lapjvr``
  emd       POT ``ot.emd`` (network simplex) + argmax
Ours: ``solve(cost, "auto")``, and ``certified`` / ``jv`` where they apply.

Every case runs twice: with 1 thread (``torch.set_num_threads(1)``, peers' ``n_threads=1``) and
with the default number of torch threads (peers' ``n_threads=0``: their own default). Methods of
one case are timed interleaved (``measure``), so load from other tenants hits all of them alike;
the 1-minute load average is recorded per case. A peer whose predicted time (its time at the
previous size times (n / n_prev)^3) exceeds SKIP_S is skipped and recorded as such.

Per record: seconds per method, ``best_peer`` (fastest of all peers, float32 ones included) and
``best_exact_peer``, ``ratio_auto_vs_best_peer`` = best peer seconds / auto seconds (>= 0.83 meets
"auto within 1.2x of the best peer"), ``auto_matches`` (auto's float64 objective equals the
reference, scipy's where run, rtol 1e-9), ``<peer>_matches`` for the float32 peers.

Then the thread section (``threads under load``): a few cases with and without one extra busy
process (``python -c "while True: pass"``, started here and killed after), both thread settings:
auto, the dense peers, the certified solver's torch path (what runs without the C extension) with
the thread policy (scans single-threaded) and without it (``SCAN_THREADS = None``), and at
n = 256 the NaN/Inf check as it was (a threaded torch ``sum``) and as it is (one C pass).

Reproduce: ``python -m benchmarks solvers`` (about an hour on 2 loaded cores; ``--quick``: a
minute). Peers: ``pip install -e .[bench]`` (lapx, laprust, lapjv; scipy and POT are required).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from benchmarks.common import synchronize, timeit, torch_linear_assignment_baseline
from rebasin.solvers import _common, available_solvers, native, solve
from rebasin.solvers.problems import make_cost

SKIP_S = 120.0  # a peer predicted slower than this is skipped
INTERLEAVE_MAX_S = 15.0  # methods whose first call took longer are measured by that call alone
FLOAT32_PEERS = ("lapx32", "lapjv32")
PEERS = ("scipy", "lapx", "lapx32", "lapjv", "lapjv32", "laprust", "emd")


def _have(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


def available_peers() -> list[str]:
    need = {"scipy": "scipy", "lapx": "lap", "lapx32": "lap", "lapjv": "lapjv", "lapjv32": "lapjv",
            "laprust": "laprust", "emd": "ot"}
    return [p for p in PEERS if _have(need[p])]


def peer_versions() -> dict[str, str]:
    out = {}
    for dist in ("scipy", "lapx", "laprust", "lapjv", "POT", "numpy"):
        with contextlib.suppress(Exception):
            out[dist] = importlib.metadata.version(dist)
    return out


def peer_fn(name: str, cost: torch.Tensor, threads: int) -> Callable[[], np.ndarray]:
    """A zero-argument call of peer ``name`` on the (n, n) or (b, n, n) float32 CPU ``cost``
    (maximisation), returning perm (n,) / (b, n). ``threads``: the peers' batch ``n_threads``."""
    c = cost.numpy()
    batched = c.ndim == 3
    c3 = c if batched else c[None]
    nt = 1 if threads == 1 else 0

    def each(one: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
        if batched:
            return lambda: np.stack([one(x) for x in c3])
        return lambda: one(c)

    if name == "scipy":
        from scipy.optimize import linear_sum_assignment

        return each(lambda x: linear_sum_assignment(x, maximize=True)[1])
    if name in ("lapx", "lapx32"):
        import lap

        f32 = name == "lapx32"
        if batched:
            def batch() -> np.ndarray:
                _, rows, cols = lap.lapjvs_batch(np.negative(c3, dtype=np.float64), extend_cost=False, n_threads=nt,
                                                 prefer_float32=f32)
                perm = np.empty(c3.shape[:2], dtype=np.int64)
                for k, (r, q) in enumerate(zip(rows, cols, strict=True)):
                    perm[k, r] = q
                return perm
            return batch
        return lambda: lap.lapjvs(np.negative(c, dtype=np.float64), extend_cost=False, jvx_like=False,
                                  prefer_float32=f32)[1]
    if name == "lapjv":
        import lapjv

        return each(lambda x: lapjv.lapjv(np.negative(x, dtype=np.float64), force_doubles=True)[0])
    if name == "lapjv32":
        import lapjv

        return each(lambda x: lapjv.lapjv(np.negative(x))[0])
    if name == "laprust":
        import laprust

        if batched:
            return lambda: np.stack(laprust.lapjv_batch(np.negative(c3), return_cost=False, n_threads=nt)[1])
        return lambda: laprust.lapjv(np.negative(c), return_cost=False)[1]
    if name == "emd":
        from rebasin.solvers.emd_backend import _pot_emd

        emd = _pot_emd()

        def one(x: np.ndarray) -> np.ndarray:
            w = np.full(x.shape[0], 1.0 / x.shape[0])
            return emd(w, w, np.negative(x, dtype=np.float64), numItermax=10_000_000).argmax(axis=1)
        return each(one)
    raise ValueError(name)


def ours_fn(name: str, cost: torch.Tensor) -> Callable[[], np.ndarray]:
    if name == "auto":
        return lambda: solve(cost, method="auto").perm.numpy()
    return lambda: solve(cost, method=name).perm.numpy()


def objective(cost: torch.Tensor, perm: np.ndarray) -> np.ndarray:
    """float64 objective per problem (b,) of perm on cost."""
    c = cost.numpy().reshape(-1, cost.shape[-1], cost.shape[-1]).astype(np.float64)
    p = np.asarray(perm).reshape(c.shape[0], -1).astype(np.int64)
    return np.take_along_axis(c, p[:, :, None], axis=2)[:, :, 0].sum(axis=1)


def measure(calls: dict[str, Callable[[], np.ndarray]], device: str) -> tuple[dict, dict]:
    """Median seconds and last result per method.

    Every method is called once first (a warm-up: first calls pay page faults, imports, caches).
    Methods under INTERLEAVE_MAX_S are then timed *interleaved*: one call of each per round, in a
    shuffled order, for about a second's worth of rounds (5 to 51; 3 when a round takes longer
    than 1.5 s), so that load from the other tenants of a shared machine hits all of them alike.
    Slower methods keep their single first call.
    """
    times: dict[str, list[float]] = {}
    results: dict = {}
    for m, fn in calls.items():
        t0 = time.perf_counter()
        results[m] = fn()
        synchronize(device)
        times[m] = [time.perf_counter() - t0]
    inter = [m for m in calls if times[m][0] < INTERLEAVE_MAX_S]
    total = sum(times[m][0] for m in inter)
    rounds = min(51, max(5, int(1.0 / max(total, 1e-4)))) if total < 1.5 else 3
    for m in inter:
        times[m] = []
    order = random.Random(0)
    for _ in range(rounds if inter else 0):
        order.shuffle(inter)  # no method always runs right after the same (cache-polluting) one
        for m in inter:
            s, results[m] = timeit(calls[m], device=device, repeat=1, warmup=0)
            times[m].append(s)
    return {m: statistics.median(t) for m, t in times.items()}, results


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """One extra process spinning on a core for the duration (the 'competing process')."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def torch_path(scan_threads: int | None) -> Iterator[None]:
    """Run ``solve`` as installed without the C extension, with the given thread policy."""
    real, before = native.native_available, _common.SCAN_THREADS
    native.native_available = lambda: False
    _common.SCAN_THREADS = scan_threads
    try:
        yield
    finally:
        native.native_available, _common.SCAN_THREADS = real, before


def _summarise(rec: dict, times: dict, objs: dict, peers: list[str]) -> None:
    measured = [p for p in peers if p in times]
    exact = [p for p in measured if p not in FLOAT32_PEERS]
    ref = objs["scipy"] if "scipy" in objs else np.max([objs[p] for p in [*exact, "auto"]], axis=0)
    if measured:
        best = min(measured, key=times.get)
        rec["best_peer"] = best + (" †" if best in FLOAT32_PEERS else "")
        rec["best_peer_s"] = round(times[best], 5)
        rec["ratio_auto_vs_best_peer"] = round(times[best] / times["auto"], 3)
    if exact:
        best_exact = min(exact, key=times.get)
        rec["best_exact_peer"] = best_exact
        rec["ratio_auto_vs_best_exact_peer"] = round(times[best_exact] / times["auto"], 3)
    rec["auto_matches"] = bool(np.allclose(objs["auto"], ref, rtol=1e-9, atol=0))
    for p in FLOAT32_PEERS:
        if p in objs:
            rec[f"{p}_matches"] = bool(np.allclose(objs[p], ref, rtol=1e-9, atol=0))
    rec["objective"] = float(np.sum(objs["auto"]))
    rec["reference_objective"] = float(np.sum(ref))


def run_case(kind: str, n: int, batch: int | None, threads: int, device: str, peers: list[str],
             history: dict) -> dict:
    """One case at one thread setting; ``history`` holds each peer's last (n, seconds) per kind and
    thread setting, for the skip prediction."""
    cost = make_cost(kind, n, batch=batch, seed=1 if batch else 0).to(device)
    label = f"batch {batch}x{n}^2 {kind}" if batch else f"{kind} n={n}"
    rec: dict = {"case": label, "kind": kind, "n": n, "batch": batch or 1, "threads": threads,
                 "load1": round(os.getloadavg()[0], 2)}
    calls: dict[str, Callable[[], np.ndarray]] = {}
    for p in peers:
        last = history.get((p, kind, batch, threads))
        predicted = last[1] * (n / last[0]) ** 3 if last else 0.0
        if predicted > SKIP_S:
            rec[f"{p}_s"] = f"skipped (predicted {predicted:.0f} s > {SKIP_S:.0f} s)"
        else:
            calls[p] = peer_fn(p, cost, threads)
    ours = ["auto", "certified"] if not batch and n >= 1024 else ["auto"]
    if "jv" in available_solvers() and n <= 1024:
        ours.append("jv")
    for m in ours:
        calls[m] = ours_fn(m, cost)
    times, results = measure(calls, device)
    objs = {m: objective(cost, r) for m, r in results.items()}
    for m, t in times.items():
        rec[f"{m}_s"] = round(t, 5)
        if m in peers:
            history[(m, kind, batch, threads)] = (n, t)
    rec["auto_choice"] = solve(cost, method="auto").stats.get("auto_choice")
    _summarise(rec, times, objs, peers)
    if batch:
        rec.update(torch_linear_assignment_baseline(cost, device))
    print(f"[solvers] {label} threads={threads} load={rec['load1']}: auto {times['auto']:.4g}s "
          f"best peer {rec.get('best_peer')} {rec.get('best_peer_s')}s ratio {rec.get('ratio_auto_vs_best_peer')} "
          f"matches={rec['auto_matches']}", flush=True)
    return rec


def thread_section(quick: bool, device: str, default_threads: int) -> list[dict]:
    """Cases with and without one extra busy process, both thread settings: auto and the dense
    peers; where torch scans remain (the certified solver's torch path, taken without the C
    extension) that path with the thread policy (scans single-threaded) and without it
    (``SCAN_THREADS = None``: torch's threads); at n = 256 the NaN/Inf check as it was (a torch
    ``sum``, threaded) and as it is (one C pass)."""
    cases = [("weak", 256, None), ("weak", 64, 64)] if quick else \
        [("weak", 256, None), ("moderate", 1024, None), ("weak", 2048, None), ("weak", 4096, None),
         ("weak", 64, 1024), ("weak", 128, 256)]
    peers = [p for p in ("laprust", "lapx32", "scipy") if p in available_peers()]
    records = []
    for load in ("current", "+1 busy process"):
        ctx = busy_process() if load != "current" else contextlib.nullcontext()
        with ctx:
            for kind, n, batch in cases:
                for threads in sorted({1, default_threads}):
                    with torch_threads(threads):
                        records.append(_thread_case(kind, n, batch, threads, load, device, peers))
    return records


def _thread_case(kind: str, n: int, batch: int | None, threads: int, load: str, device: str,
                 peers: list[str]) -> dict:
    cost = make_cost(kind, n, batch=batch, seed=1 if batch else 0)
    calls = {p: peer_fn(p, cost, threads) for p in peers if not (p == "scipy" and n > 1024)}
    calls["auto"] = ours_fn("auto", cost)
    extra: dict[str, Callable[[], object]] = {}
    if not batch and n >= 2048:
        def certified_torch(policy: int | None) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                with torch_path(policy):
                    return solve(cost, method="certified").perm.numpy()
            return call
        calls["certified_torch_path"] = certified_torch(1)
        calls["certified_torch_path_threaded"] = certified_torch(None)
    if not batch and n <= 256:
        extra["nan_check_torch_sum"] = lambda: bool(torch.isfinite(cost.sum()))
        extra["nan_check_now"] = lambda: native.first_nonfinite(cost.numpy()) if native.native_available() else None
    label = f"batch {batch}x{n}^2 {kind}" if batch else f"{kind} n={n}"
    rec: dict = {"case": f"{label} [{load}]", "kind": kind, "n": n, "batch": batch or 1, "threads": threads,
                 "load": load, "load1": round(os.getloadavg()[0], 2)}
    times, results = measure({**calls, **extra}, device)
    objs = {m: objective(cost, r) for m, r in results.items() if m in calls}
    for m, t in times.items():
        rec[f"{m}_s"] = round(t, 6)
    _summarise(rec, {m: t for m, t in times.items() if m in calls}, objs, peers)
    if "certified_torch_path" in times:
        rec["ratio_policy_vs_threaded"] = round(
            times["certified_torch_path_threaded"] / times["certified_torch_path"], 3)
    print(f"[solvers/threads] {rec['case']} threads={threads} load1={rec['load1']}: auto {times['auto']:.4g}s, "
          f"ratio vs best peer {rec.get('ratio_auto_vs_best_peer')}, policy vs threaded "
          f"{rec.get('ratio_policy_vs_threaded', '')}, nan check torch/now "
          f"{times.get('nan_check_torch_sum', '')}/{times.get('nan_check_now', '')}", flush=True)
    return rec


def run(quick: bool, device: str) -> list[dict]:
    default_threads = torch.get_num_threads()
    peers = available_peers() if device == "cpu" else []
    sizes = [256, 1024] if quick else [256, 1024, 4096, 8192, 16384]
    batches = [(64, 64), (16, 128)] if quick else [(1024, 64), (256, 128)]
    records: list[dict] = []
    history: dict = {}
    print(f"[solvers] peers: {', '.join(peers)}; versions {peer_versions()}; default torch threads "
          f"{default_threads}; native: {native.native_available()}", flush=True)
    for threads in sorted({1, default_threads}):
        with torch_threads(threads):
            for kind in ("strong", "moderate", "weak", "uniform"):
                for n in sizes:
                    records.append(run_case(kind, n, None, threads, device, peers, history))
            for b, n in batches:
                records.append(run_case("weak", n, b, threads, device, peers, history))
    if device == "cpu":
        records.extend(thread_section(quick, device, default_threads))
    return records
