"""Weight matching by coordinate descent over permutation groups (git-re-basin; see docs/design.md, Matching).

Objective, maximised over symmetries π of the spec:

    J(π) = Σ_W ⟨W_B, π(W_A)⟩          (W over every permuted tensor)

Each step fixes all groups but one and solves that group's linear assignment problem
exactly; a step is kept only if J does not decrease, so J is monotone. Global groups
(residual streams, ALBERT's embedding space) first get a guess from the tensors whose
other axes are already placed (embeddings, norms), which avoids the poor optimum that
coordinate descent from the identity falls into. Attention groups are updated head-aware
(:mod:`rebasin.matching.attention`).
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rebasin_kernels.cost_builder import gathered_cost
from tqdm.auto import tqdm

from rebasin.errors import NonFiniteError
from rebasin.matching.attention import update_attention
from rebasin.matching.terms import as_rows, group_terms, other_index
from rebasin.permutation import Perms, identity, moved_fraction, permute_tensor
from rebasin.solvers import solve
from rebasin.specs import Spec

State = Mapping[str, torch.Tensor]


@dataclass
class GroupStats:
    """Per-group outcome: fraction of units moved, mean cosine of matched units before/after.

    ``template`` and ``layer`` are the group's (see :class:`rebasin.specs.Group`).
    """

    name: str
    kind: str
    size: int
    moved: float
    cos_before: float
    cos_after: float
    template: str = ""
    layer: int | None = None


@dataclass
class MatchResult:
    """Permutations plus the evidence: objective per sweep, per-group stats, timings."""

    perms: Perms
    objective_identity: float
    objective_history: list[float]
    sweeps: int
    converged: bool
    groups: list[GroupStats] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    solver: str = "auto"

    @property
    def objective(self) -> float:
        return self.objective_history[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective_identity": self.objective_identity,
            "objective": self.objective,
            "objective_history": self.objective_history,
            "sweeps": self.sweeps,
            "converged": self.converged,
            "solver": self.solver,
            "timings_s": self.timings,
            "groups": [vars(g) for g in self.groups],
        }


class Timer:
    """Accumulates wall seconds per phase (synchronising CUDA so GPU work is counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0


def objective(spec: Spec, a: State, b: State, perms: Mapping[str, torch.Tensor],
              names: list[str] | None = None) -> float:
    """J(π) restricted to ``names`` (default: every permuted tensor), accumulated in float64."""
    total = 0.0
    for name in names if names is not None else spec.permuted_tensors():
        pa = permute_tensor(spec, name, a[name], perms)
        total += float(torch.sum(b[name].double() * pa.double()))
    return total


def plain_cost(spec: Spec, a: State, b: State, group: str, perms: Mapping[str, torch.Tensor],
               names: set[str] | None = None) -> torch.Tensor:
    """C_g (n × n, float32): C[i, j] = Σ ⟨unit i of B, unit j of π_other(A)⟩ over the group's tensors.

    ``names`` restricts the sum to some tensors (used by the initial guess).
    """
    n = spec.groups[group].size
    device = next(iter(b.values())).device
    out = torch.zeros(n, n, dtype=torch.float32, device=device)
    for term in group_terms(spec, group):
        if names is not None and term.name not in names:
            continue
        wb, wa = b[term.name], a[term.name]
        idx = other_index(spec, term.name, term.axis, perms, tuple(wa.shape), wa.device)
        gathered_cost(as_rows(wb, term.axis), as_rows(wa, term.axis), idx, out=out)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(f"cost matrix of group '{group}' has NaN/Inf (non-finite weights?)")
    return out


def _placed_tensors(spec: Spec, group: str, placed: set[str]) -> set[str]:
    """Tensors of ``group`` whose other permuted axes all belong to already-placed groups."""
    keep = set()
    for term in group_terms(spec, group):
        others = [r.group for i, r in enumerate(spec.axes[term.name]) if r is not None and i != term.axis]
        if all(g in placed for g in others):
            keep.add(term.name)
    return keep


def unit_cosines(spec: Spec, a: State, b: State, group: str, perms: Mapping[str, torch.Tensor],
                 own: torch.Tensor) -> float:
    """Mean over units i of cos(unit i of B, unit own[i] of π_other(A))."""
    dots = norms_a = norms_b = None
    for term in group_terms(spec, group):
        wb, wa = as_rows(b[term.name], term.axis).float(), as_rows(a[term.name], term.axis).float()
        idx = other_index(spec, term.name, term.axis, perms, tuple(a[term.name].shape), wa.device)
        if idx is not None:
            wa = wa[:, idx]
        wa = wa[own]
        d, na, nb = (wb * wa).sum(1), (wa * wa).sum(1), (wb * wb).sum(1)
        dots, norms_a, norms_b = (d, na, nb) if dots is None else (dots + d, norms_a + na, norms_b + nb)
    if dots is None:
        return float("nan")
    return float((dots / (norms_a.sqrt() * norms_b.sqrt()).clamp_min(1e-12)).mean())


def match_states(
    spec: Spec,
    a: State,
    b: State,
    *,
    solver: str = "auto",
    max_sweeps: int = 20,
    seed: int = 0,
    init: Perms | None = None,
    progress: bool = True,
    timer: Timer | None = None,
    on_sweep: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Find π maximising J(π) = Σ ⟨W_B, π(W_A)⟩ (so that π(A) ≈ B).

    Args:
        spec: resolved spec shared by A and B.
        a, b: name -> tensor for at least every permuted tensor, same shapes, on one device
            (float32 on CPU; float32/bf16 on CUDA — costs accumulate in float32).
        solver: assignment solver name (see :mod:`rebasin.solvers`).
        max_sweeps: sweeps of coordinate descent at most; stops earlier when no group changes.
        seed: seeds the random group order (the result is deterministic for a seed).
        init: starting permutations (default: identity plus the global-group guess).
    """
    device = next(iter(b.values())).device
    timer = timer or Timer(device)
    rng = random.Random(seed)
    perms = {k: v.to(device) for k, v in (init or identity(spec)).items()}
    with timer("objective"):
        j_identity = objective(spec, a, b, identity(spec))
    history: list[float] = []

    plain = [g for g in spec.groups.values() if not g.is_attention]
    global_groups = [g.name for g in plain if g.layer is None]
    if init is None:
        placed: set[str] = set()
        for name in global_groups:
            names = _placed_tensors(spec, name, placed)
            if names:
                with timer("cost"):
                    cost = plain_cost(spec, a, b, name, perms, names)
                with timer("solve"):
                    perms[name] = solve(cost, method=solver).perm.to(device)
            placed.add(name)
    with timer("objective"):
        history.append(objective(spec, a, b, perms))

    order = list(spec.groups)
    proposals: dict = {}
    reads = read_sets(spec)
    version = dict.fromkeys(order, 0)  # bumped whenever a group's permutation changes
    seen: dict[str, tuple[int, ...]] = {}  # versions of reads[g] when g was last evaluated
    converged = False
    sweep = 0
    bar = tqdm(total=max_sweeps * len(order), desc="match", unit="group", disable=not progress)
    for sweep in range(1, max_sweeps + 1):
        rng.shuffle(order)
        changed = False
        for name in order:
            group = spec.groups[name]
            bar.set_postfix_str(f"sweep {sweep} {name}", refresh=False)
            inputs = tuple(version[r] for r in reads[name])
            # same inputs as at its last evaluation: the exact step would return the same π_g
            if seen.get(name) != inputs:
                seen[name] = inputs
                if group.is_attention:
                    step = update_attention(spec, a, b, group, perms, solver=solver, timer=timer,
                                            proposals=proposals)
                else:
                    step = _update_plain(spec, a, b, name, perms, solver, timer)
                version[name] += step
                changed |= step
            bar.update(1)
        with timer("objective"):
            history.append(objective(spec, a, b, perms))
        if on_sweep:
            on_sweep(sweep, history[-1])
        if not changed:
            converged = True
            break
    bar.total = bar.n
    bar.close()

    stats = []
    ident = identity(spec)
    with timer("report"):
        for group in spec.groups.values():
            if group.is_attention:
                from rebasin.matching.attention import head_cosines

                before, after = head_cosines(spec, a, b, group, ident), head_cosines(spec, a, b, group, perms)
                moved = moved_fraction(perms, f"{group.name}.heads")
            else:
                before = unit_cosines(spec, a, b, group.name, ident, ident[group.name].to(device))
                after = unit_cosines(spec, a, b, group.name, perms, perms[group.name])
                moved = moved_fraction(perms, group.name)
            stats.append(GroupStats(group.name, group.kind, group.size, moved, before, after, group.template,
                                    group.layer))
    return MatchResult({k: v.cpu() for k, v in perms.items()}, j_identity, history, sweep, converged, stats,
                       dict(timer.totals), solver)


def read_sets(spec: Spec) -> dict[str, tuple[str, ...]]:
    """Per group, the groups whose permutations its coordinate step reads.

    A plain group's cost reads the groups on the other axes of its tensors; it also reads its
    own π when a tensor carries it on two axes, and an attention update always does (it refines
    the current heads), so those are re-evaluated after their own change.
    """
    reads: dict[str, set[str]] = {g: set() for g in spec.groups}
    for axes in spec.axes.values():
        groups = [r.group for r in axes if r is not None]
        for i, g in enumerate(groups):
            reads[g].update(groups[:i] + groups[i + 1:])
    for name, group in spec.groups.items():
        if group.is_attention:
            reads[name].add(name)
    return {g: tuple(sorted(r)) for g, r in reads.items()}


def _update_plain(spec: Spec, a: State, b: State, name: str, perms: Perms, solver: str, timer: Timer) -> bool:
    """One exact coordinate step on a plain group; keeps the old π_g unless J strictly improves."""
    with timer("cost"):
        cost = plain_cost(spec, a, b, name, perms)
    with timer("solve"):
        res = solve(cost, method=solver)
    new = res.perm.to(cost.device)
    cur = perms[name]
    if torch.equal(new, cur):
        return False
    idx = torch.arange(cost.shape[0], device=cost.device)
    gain = float(cost[idx, new].double().sum() - cost[idx, cur].double().sum())
    tensors = [t.name for t in group_terms(spec, name)]
    if any(sum(1 for r in spec.axes[t] if r is not None and r.group == name) > 1 for t in tensors):
        # a tensor with the group on two axes makes the cost an approximation: check J itself
        with timer("objective"):
            before = objective(spec, a, b, perms, tensors)
            trial = {**perms, name: new}
            gain = objective(spec, a, b, trial, tensors) - before
    scale = float(cost.abs().max()) * cost.shape[0] + 1e-30
    if gain <= 1e-9 * scale:
        return False
    perms[name] = new
    return True
