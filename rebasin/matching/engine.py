"""Weight matching by coordinate descent over permutation groups (git-re-basin; see docs/design.md, Matching).

Objective, maximised over symmetries π of the spec:

    J(π) = Σ_W ⟨W_B, π(W_A)⟩          (W over every permuted tensor)

Each step fixes all groups but one and solves that group's linear assignment problem
exactly; a step is kept only if J does not decrease, so J is monotone. Global groups
(residual streams, ALBERT's embedding space) first get a guess from the tensors whose
other axes are already placed (embeddings, norms), which avoids the poor optimum that
coordinate descent from the identity falls into. Attention groups are updated head-aware
(:mod:`rebasin.matching.attention`).

Memory and bookkeeping (docs/scale.md): weights come from a
:class:`~rebasin.matching.store.PairStore` (read per step, or cached when the budget allows);
a plain group's cost is accumulated term by term from the tensors that touch it. J is read
once per tensor at the start (one pass that also gives the report's identity cosines and the
NaN/Inf check) and then tracked from the costs: a step's gain is a gather of the cost matrix
it already built, the per-unit "after" similarity of the report is the same gather. Under
torch.distributed, ranks own layers' groups (:mod:`rebasin.distributed`).
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from rebasin.distributed import Dist, Ownership, plan_ownership
from rebasin.errors import NonFiniteError
from rebasin.io.checkpoint import all_finite
from rebasin.matching.attention import collect_blocks, current, score, update_attention
from rebasin.matching.store import (
    LazyState,
    PairStore,
    Side,
    Stats,
    accumulate_cost,
    head_dots,
    tensor_stats,
    unit_dots,
)
from rebasin.matching.terms import as_rows, group_terms, mapped_a, other_index
from rebasin.permutation import Perms, axis_index, identity, moved_fraction, permute_tensor
from rebasin.solvers import solve
from rebasin.specs import AxisRef, Group, Spec
from rebasin.symmetry import kind_of, matcher_step

State = Mapping[str, torch.Tensor]


@dataclass
class GroupStats:
    """Per-group outcome: fraction of units moved, mean cosine of matched units before/after.

    ``template`` and ``layer`` are the group's (see :class:`rebasin.specs.Group`). ``rotation``:
    how far the group's within-head orthogonal maps are from the identity, mean ‖R − I‖_F/(2√d)
    (0 without rotations, 1 for −I; :meth:`rebasin.symmetry.SymmetryKind.rotation`).
    """

    name: str
    kind: str
    size: int
    moved: float
    cos_before: float
    cos_after: float
    template: str = ""
    layer: int | None = None
    rotation: float = 0.0


@dataclass
class MatchResult:
    """Permutations plus the evidence: objective per sweep, per-group stats, timings.

    ``memory_mode``: ``streaming`` (weights read per step), ``cached`` (kept after the first
    read) or ``in-memory`` (state dicts / modules). ``io``: tensor pairs and bytes read.
    ``distributed``: world size and each rank's share, when run under torch.distributed.
    """

    perms: Perms
    objective_identity: float
    objective_history: list[float]
    sweeps: int
    converged: bool
    groups: list[GroupStats] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    solver: str = "auto"
    memory_mode: str = ""
    io: dict[str, int] = field(default_factory=dict)
    distributed: dict[str, Any] | None = None

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
            "memory_mode": self.memory_mode,
            "io": self.io,
            "distributed": self.distributed,
            "groups": [vars(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MatchResult:
        """The printable part of a result back from :meth:`to_dict` (``perms`` left empty)."""
        return cls({}, d["objective_identity"], list(d["objective_history"]), d["sweeps"], d["converged"],
                   [GroupStats(**g) for g in d.get("groups", [])], dict(d.get("timings_s", {})),
                   d.get("solver", "auto"), d.get("memory_mode", ""), dict(d.get("io") or {}), d.get("distributed"))


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
    """J(π) restricted to ``names`` (default: every permuted tensor), accumulated in float64.

    A pass over the tensors: the matcher itself tracks J from its costs and calls this only for
    the few tensors that carry one group on two axes (BERT's MLM transform).
    """
    total = 0.0
    for name in names if names is not None else spec.permuted_tensors():
        pa = permute_tensor(spec, name, a[name], perms)
        total += float(torch.sum(b[name].double() * pa.double()))
    return total


@dataclass
class Work:
    """What the steps of one match share: weights, ownership, the per-group report material."""

    spec: Spec
    store: PairStore
    dist: Dist
    own: Ownership
    stats: Stats = field(default_factory=Stats)
    # group -> (per-unit gathered cost at the chosen π_g, float64; the versions of its reads then)
    diag: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = field(default_factory=dict)
    inputs: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.store.device

    def my_terms(self, group: str, names: set[str] | None = None) -> list[Any]:
        """The terms of ``group`` this rank adds: all of them for a per-layer group (its owner
        reads them), the ones of its own tensors for a global group."""
        terms = [t for t in group_terms(self.spec, group) if names is None or t.name in names]
        if self.dist.active and self.own.group_owner.get(group) is None:
            terms = [t for t in terms if self.own.tensor_owner.get(t.name) == self.dist.rank]
        return terms


def plain_cost(work: Work, group: str, perms: Mapping[str, torch.Tensor], names: set[str] | None = None
               ) -> torch.Tensor:
    """C_g (n × n, float32): C[i, j] = Σ ⟨unit i of B, unit j of π_other(A)⟩ over the group's tensors.

    Accumulated term by term (each tensor read once, from the store); a global group's partial
    sums are all-reduced over ranks. ``names`` restricts the sum (used by the initial guess).
    """
    spec = work.spec
    n = spec.groups[group].size
    out = torch.zeros(n, n, dtype=torch.float32, device=work.device)
    terms = work.my_terms(group, names)
    for term in terms:
        tb, ta = work.store.pair(term.name)
        wa, idx = mapped_a(spec, term.name, term.axis, perms, ta)  # a rotated other axis: mapped copy
        accumulate_cost(out, as_rows(tb, term.axis), wa, idx)
        del tb, ta
    if work.dist.active and work.own.group_owner.get(group) is None:
        work.dist.all_reduce(out)
    if not all_finite(out):
        work.store.culprit([t.name for t in terms])
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


def _solve(work: Work, group: str, cost: torch.Tensor, solver: str) -> torch.Tensor:
    """π_g from ``cost``; for a global group under torch.distributed rank 0 solves and broadcasts."""
    shared = work.dist.active and work.own.group_owner.get(group) is None
    if not shared or work.dist.is_main:
        perm = solve(cost, method=solver).perm.to(cost.device)
    else:
        perm = torch.empty(cost.shape[0], dtype=torch.long, device=cost.device)
    if shared:
        work.dist.broadcast(perm)
    return perm


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
    symmetries: str = "full",
) -> MatchResult:
    """Find π maximising J(π) = Σ ⟨W_B, π(W_A)⟩ (so that π(A) ≈ B), from in-memory state dicts.

    Args:
        spec: resolved spec shared by A and B.
        a, b: name -> tensor for at least every permuted tensor, same shapes, on one device.
        solver: assignment solver name (see :mod:`rebasin.solvers`).
        max_sweeps: sweeps of coordinate descent at most; stops earlier when no group changes.
        seed: seeds the random group order (the result is deterministic for a seed).
        init: starting permutations (default: identity plus the global-group guess).
        symmetries: ``full`` (permutations and the exact within-head orthogonal maps: V/O, RoPE
            pair rotations, non-RoPE Q/K) or ``perm`` (permutations only).
    """
    device = next(iter(b.values())).device
    store = PairStore(Side(lambda n: a[n], lambda _n: "A"), Side(lambda n: b[n], lambda _n: "B"), device)
    return match_store(spec, store, solver=solver, max_sweeps=max_sweeps, seed=seed, init=init, progress=progress,
                       timer=timer, on_sweep=on_sweep, memory_mode="in-memory", symmetries=symmetries)


def _segments(order: list[str], spec: Spec, reads: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """Split a sweep's order into runs of per-layer groups that read none of each other (their
    steps are independent: run by their owners at once) and single global groups."""
    segs: list[list[str]] = []
    cur: list[str] = []
    for g in order:
        if spec.groups[g].layer is None:
            if cur:
                segs.append(cur)
                cur = []
            segs.append([g])
            continue
        if any(h in reads[g] or g in reads[h] for h in cur):
            segs.append(cur)
            cur = []
        cur.append(g)
    if cur:
        segs.append(cur)
    return segs


def _group_keys(group: Group, perms: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """The group's keys of π: the required ones, plus the optional ones (rotations) ``perms`` holds."""
    kind = kind_of(group)
    return kind.keys(group) + [k for k in kind.optional_keys(group) if perms is not None and k in perms]


def match_store(
    spec: Spec,
    store: PairStore,
    *,
    solver: str = "auto",
    max_sweeps: int = 20,
    seed: int = 0,
    init: Perms | None = None,
    progress: bool = True,
    timer: Timer | None = None,
    on_sweep: Callable[[int, float], None] | None = None,
    dist: Dist | None = None,
    memory_mode: str = "",
    symmetries: str = "full",
) -> MatchResult:
    """The matcher proper (see :func:`match_states`), reading weights from ``store``."""
    device = store.device
    timer = timer or Timer(device)
    dist = dist or Dist()
    own = plan_ownership(spec, dist.world)
    work = Work(spec, store, dist, own)
    a, b = LazyState(store, 1).bind(spec), LazyState(store, 0).bind(spec)
    rng = random.Random(seed)
    perms = {k: v.to(device) for k, v in (init or identity(spec)).items()}
    show = progress and dist.is_main
    reads = read_sets(spec)

    plain = [g for g in spec.groups.values() if not g.is_attention]
    global_groups = [g.name for g in plain if g.layer is None and not g.fixed]  # fixed: stays the identity
    mine = [n for n in spec.permuted_tensors() if not dist.active or own.tensor_owner.get(n) == dist.rank]
    bar = tqdm(total=len(mine) + len(global_groups), desc="match: read", unit="step", disable=not show)
    if init is None:
        placed: set[str] = set()
        for name in global_groups:
            names = _placed_tensors(spec, name, placed)
            if names:
                with timer("cost"):
                    cost = dist.call(lambda name=name, names=names: plain_cost(work, name, perms, names))
                with timer("solve"):
                    perms[name] = _solve(work, name, cost, solver)
                del cost
            placed.add(name)
            bar.update(1)
    start = {k: v.clone() for k, v in perms.items()}
    ident = identity(spec)
    moved_init = any(not torch.equal(v, ident[k].to(device)) for k, v in start.items())

    def read_all() -> Stats:
        stats = Stats()
        for name in mine:
            tensor_stats(store, spec, name, start if moved_init else None, stats)
            bar.update(1)
        return stats

    with timer("objective"):
        stats = dist.call(read_all)
        if dist.active:
            # on the compute device: NCCL reduces CUDA tensors only
            stats = Stats.from_flat(spec, dist.all_reduce(stats.flat(spec).to(device)).cpu())
    bar.close()
    work.stats = stats
    j_identity, j = stats.j_identity, stats.j_init
    history: list[float] = [j]

    order = [name for name, g in spec.groups.items() if not g.fixed]
    proposals: dict = {}
    version = dict.fromkeys(spec.groups, 0)  # bumped whenever a group's permutation changes
    seen: dict[str, tuple[int, ...]] = {}  # versions of reads[g] when g was last evaluated
    converged = False
    sweep = 0
    for sweep in range(1, max_sweeps + 1):
        rng.shuffle(order)
        changed = False
        bar = tqdm(total=len(order), desc=f"match: sweep {sweep}", unit="group", disable=not show)
        for seg in _segments(order, spec, reads):
            todo = []
            for name in seg:
                inputs = tuple(version[r] for r in reads[name])
                # same inputs as at its last evaluation: the exact step would return the same π_g
                if seen.get(name) != inputs:
                    seen[name] = inputs
                    todo.append((name, inputs))

            def run(todo: list = todo, bar: Any = bar) -> dict[str, tuple[bool, float]]:
                out = {}
                for name, inputs in todo:
                    if not own.owns_group(name, dist.rank):
                        continue
                    group = spec.groups[name]
                    bar.set_postfix_str(name, refresh=False)
                    work.inputs = inputs
                    out[name] = matcher_step(group)(work, a, b, group, perms, solver=solver, timer=timer,
                                                    proposals=proposals, rotations=symmetries == "full")
                return out

            results = dist.call(run)
            if dist.active and any(spec.groups[n].layer is not None for n, _ in todo):
                shared = {}
                for part in dist.gather({n: (r, {k: perms[k].cpu() for k in _group_keys(spec.groups[n], perms)})
                                         for n, r in results.items() if spec.groups[n].layer is not None}):
                    shared.update(part)
                for n, (r, values) in shared.items():
                    results[n] = r
                    for k in _group_keys(spec.groups[n], perms):  # absent optional keys (rotations) mean I
                        perms.pop(k, None)
                    perms.update({k: v.to(device) for k, v in values.items()})
            for name, _ in todo:  # in the sweep's order: the same sum on every rank and in one process
                step, gain = results[name]
                if step:
                    version[name] += 1
                    j += gain
                    changed = True
            bar.update(len(seg))
        bar.close()
        history.append(j)
        if on_sweep:
            on_sweep(sweep, j)
        if not changed:
            converged = True
            break

    with timer("report"):
        stats_out = dist.call(lambda: _report(work, a, b, perms, reads, version))
    result = MatchResult({k: v.cpu() for k, v in perms.items()}, j_identity, history, sweep, converged, stats_out,
                         dict(timer.totals), solver, memory_mode,
                         {"tensor_reads": store.reads, "bytes_read": store.bytes_read})
    if dist.active:
        shares = dist.gather({**own.share(spec, dist.rank), "timings_s": dict(timer.totals),
                              "bytes_read": store.bytes_read})
        result.distributed = {"world_size": dist.world, "backend": dist.backend, "ranks": shares}
    return result


def _report(work: Work, a: LazyState, b: LazyState, perms: Perms, reads: Mapping[str, tuple[str, ...]],
            version: Mapping[str, int]) -> list[GroupStats]:
    """Per-group moved fraction and cosines, from the statistics and costs already at hand.

    Plain groups: norms and identity dots from the first read; the "after" dots are the gather of
    the group's last cost at its π when that cost was built with today's permutations (always, at
    convergence), else one O(size) pass over the group's tensors. Attention groups: per KV-head
    slot, norms and identity dots from the first read, the "after" dots from one read of the
    layer's attention tensors (the same cosines as ``attention.head_cosines``).
    """
    spec, dist = work.spec, work.dist
    mine: dict[str, GroupStats] = {}
    for group in spec.groups.values():
        owner = work.own.group_owner.get(group.name)
        if (owner if owner is not None else 0) != dist.rank:
            continue
        if group.is_attention:
            before, after = _head_cosines(work, group, perms)
            moved = attention_moved(spec, group, perms)
        else:
            before, after = _plain_cosines(work, group.name, perms, reads, version)
            moved = moved_fraction(perms, group.name)
        mine[group.name] = GroupStats(group.name, group.kind, group.size, moved, before, after, group.template,
                                      group.layer, kind_of(group).rotation(group, perms))
    if dist.active:
        for part in dist.gather(mine):
            mine.update(part)
    return [mine[g] for g in spec.groups]


def _head_cosines(work: Work, group: Group, perms: Perms) -> tuple[float, float]:
    """Mean over KV-head slots of cos(B's block k, π(A)'s block k), at the identity and at π. A
    slot's block norm is its head's (π moves whole heads and maps within heads orthogonally)."""
    u = work.stats.units.get(group.name)
    if u is None:
        return float("nan"), float("nan")
    sigma = perms[f"{group.name}.heads"].cpu()
    before = float((u.dot / (u.nb.sqrt() * u.na.sqrt()).clamp_min(1e-12)).mean())
    with work.store.hold():
        dots = head_dots(work.store, work.spec, group.name, perms)
    after = float((dots / (u.nb.sqrt() * u.na[sigma].sqrt()).clamp_min(1e-12)).mean())
    return before, after


def _plain_cosines(work: Work, group: str, perms: Perms, reads: Mapping[str, tuple[str, ...]],
                   version: Mapping[str, int]) -> tuple[float, float]:
    spec = work.spec
    u = work.stats.units.get(group)
    if u is None or not group_terms(spec, group):
        return float("nan"), float("nan")
    own = perms[group].cpu()
    before = float((u.dot / (u.nb.sqrt() * u.na.sqrt()).clamp_min(1e-12)).mean())
    kept = work.diag.get(group)
    if kept is not None and kept[1] == tuple(version[r] for r in reads[group]):
        dots = kept[0]
    else:
        with work.store.hold():
            dots = unit_dots(work.store, spec, group, perms, group_terms(spec, group), other_index)
    after = float((dots / (u.nb.sqrt() * u.na[own].sqrt()).clamp_min(1e-12)).mean())
    return before, after


def attention_moved(spec: Spec, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
    """Fraction of an attention group's n_heads·d_head units that moved: a unit (query head h,
    dim d) moved when its Q row or its O column comes from elsewhere — whole KV heads, query
    heads inside a group, and Q/K and V/O within-head dims all count."""
    q = axis_index(spec, perms, AxisRef(group.name, "q")).cpu()
    o = axis_index(spec, perms, AxisRef(group.name, "o")).cpu()
    here = torch.arange(q.numel())
    return float(((q != here) | (o != here)).float().mean()) if q.numel() else 0.0


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


def plain_step(work: Work, a: LazyState, b: LazyState, group: Group, perms: Perms, *, solver: str,
               timer: Timer, proposals: dict, rotations: bool = False) -> tuple[bool, float]:
    """The matcher step of a plain group (``symmetry.ops.MATCHER_STEPS``): :func:`_update_plain`.
    ``proposals`` and ``rotations`` concern attention groups only."""
    return _update_plain(work.spec, a, b, group.name, perms, solver, timer, work)


def attention_step(work: Work, a: LazyState, b: LazyState, group: Group, perms: Perms, *, solver: str,
                   timer: Timer, proposals: dict, rotations: bool = False) -> tuple[bool, float]:
    """One head-aware step (:func:`rebasin.matching.attention.update_attention`) and its exact
    gain in J: the score of the group's blocks before and after (the blocks do not depend on
    the group's own permutations, so they are gathered once)."""
    spec = work.spec
    with work.store.hold():
        with timer("cost"):
            hb = collect_blocks(spec, a, b, group, perms)
            base = score(hb, *current(perms, group.name))
        step = update_attention(spec, a, b, group, perms, solver=solver, timer=timer, proposals=proposals,
                                rotations=rotations)
        gain = score(hb, *current(perms, group.name)) - base if step else 0.0
    return bool(step), gain


def _update_plain(spec: Spec, a: State, b: State, name: str, perms: Perms, solver: str, timer: Timer,
                  work: Work) -> tuple[bool, float]:
    """One exact coordinate step on a plain group; keeps the old π_g unless J strictly improves.

    Returns (changed, gain in J). The gain is a gather of the cost just built; the same gather
    at the chosen π_g is kept for the report.
    """
    with timer("cost"):
        cost = plain_cost(work, name, perms)
    with timer("solve"):
        new = _solve(work, name, cost, solver)
    cur = perms[name]
    idx = torch.arange(cost.shape[0], device=cost.device)
    at_cur = cost[idx, cur].double()
    if torch.equal(new, cur):
        work.diag[name] = (at_cur.cpu(), work.inputs)
        return False, 0.0
    at_new = cost[idx, new].double()
    gain = float(at_new.sum() - at_cur.sum())
    tensors = [t.name for t in group_terms(spec, name)]
    if any(sum(1 for r in spec.axes[t] if r is not None and r.group == name) > 1 for t in tensors):
        # a tensor with the group on two axes makes the cost an approximation: check J itself
        with timer("objective"), work.store.hold():
            before = objective(spec, a, b, perms, tensors)
            trial = {**perms, name: new}
            gain = objective(spec, a, b, trial, tensors) - before
    scale = float(cost.abs().max()) * cost.shape[0] + 1e-30
    if gain <= 1e-9 * scale:
        work.diag[name] = (at_cur.cpu(), work.inputs)
        return False, 0.0
    perms[name] = new
    work.diag[name] = (at_new.cpu(), work.inputs)
    return True, gain
