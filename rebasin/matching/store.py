"""Where the matcher's weights come from, and the passes over them.

:class:`PairStore` hands out a tensor of A and of B by name, as stored (bf16 stays bf16), read
on demand (*streaming*: nothing proportional to the model is held) or kept after the first
read (*cached*: both models' permuted tensors in memory). Both modes run the same arithmetic
in the same order, so they return bit-identical results; only where the bytes come from
differs. The budget decides which (:mod:`rebasin.estimate`).

Passes:

- :func:`accumulate_cost` — ``out += W_B @ W_A[:, idx]ᵀ`` for one term of a plain group's cost,
  in float32 column chunks on CPU (a chunk of the stored tensor is converted, never the whole
  tensor: :data:`rebasin.streaming.CHUNK_ELEMS`), through the gathered-cost kernel on CUDA;
- :func:`tensor_stats` — one read of a tensor for everything the matcher needs besides costs:
  ⟨W_B, W_A⟩ and ⟨W_B, π₀(W_A)⟩ (J at the identity and after the initial guess), per-unit
  squared norms and identity dots of every plain group on its axes (the report's cosines) and
  the NaN/Inf check (a non-finite input makes its squared norm non-finite).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rebasin_kernels.cost_builder import gathered_cost

from rebasin import streaming
from rebasin.io.checkpoint import ensure_finite
from rebasin.permutation import axis_index, has_rotation
from rebasin.specs import Spec
from rebasin.streaming import permuted_rows, row_chunks

Getter = Callable[[str], torch.Tensor]


@dataclass
class Side:
    """One model as the store sees it: a tensor getter and what to name in an error."""

    get: Getter
    where: Callable[[str], object]


@dataclass
class PairStore:
    """Tensors of A and B by name: read per request (streaming) or kept (``cache=True``)."""

    a: Side
    b: Side
    device: torch.device
    dtype: torch.dtype | None = None
    cache: bool = False
    reads: int = 0
    bytes_read: int = 0
    _kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _held: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_B, W_A) as stored (or in ``dtype``), on the device."""
        got = self._kept.get(name)
        if got is None and self._held is not None:
            got = self._held.get(name)
        if got is not None:
            return got
        tb, ta = self._read(self.b, name), self._read(self.a, name)
        self.reads += 1
        self.bytes_read += tb.numel() * tb.element_size() + ta.numel() * ta.element_size()
        if self.cache:
            self._kept[name] = (tb, ta)
        elif self._held is not None:
            self._held[name] = (tb, ta)
        return tb, ta

    def _read(self, side: Side, name: str) -> torch.Tensor:
        t = side.get(name)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep what is read inside the block until it ends (a layer's attention tensors read by
        several functions in a row), then drop it."""
        if self._held is not None or self.cache:
            yield
            return
        self._held = {}
        try:
            yield
        finally:
            self._held = None

    def culprit(self, names: list[str]) -> None:
        """Raise the NonFiniteError naming the first of ``names`` holding NaN/Inf (slow path)."""
        for name in names:
            tb, ta = self.pair(name)
            ensure_finite(ta, self.a.where(name), name)
            ensure_finite(tb, self.b.where(name), name)

    @property
    def a_state(self) -> LazyState:
        return LazyState(self, 1)

    @property
    def b_state(self) -> LazyState:
        return LazyState(self, 0)


class LazyState(Mapping):
    """A read-on-demand ``name -> tensor`` view of one side of a store, for code that takes a
    state dict (the attention step). Iteration starts with the smallest tensor: callers that
    take ``next(iter(state.values())).device`` then read a norm vector, not the embedding."""

    def __init__(self, store: PairStore, side: int, names: list[str] | None = None) -> None:
        self.store, self.side = store, side
        self._names = names

    def bind(self, spec: Spec) -> LazyState:
        names = sorted(spec.axes, key=lambda n: (_numel(spec.shapes[n]), n))
        return LazyState(self.store, self.side, names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.store.pair(name)[self.side]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names or [])

    def __len__(self) -> int:
        return len(self._names or [])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- costs --------------------------------------------------------------------------------------
def accumulate_cost(out: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor, idx: torch.Tensor | None) -> None:
    """``out += wb @ wa[:, idx]ᵀ`` (``wb``, ``wa``: (n, m) views of stored tensors; fp32 ``out``).

    CPU: column chunks of about ``CHUNK_ELEMS`` elements, each converted to float32 (the
    gather happens on the stored dtype, before the conversion). CUDA: the gathered-cost kernel
    reads 16-bit inputs directly and accumulates in float32.
    """
    if out.device.type == "cuda":
        gathered_cost(wb, wa, idx, out=out)
        return
    n, m = wb.shape
    if m == 0:
        return
    step = max(1, streaming.CHUNK_ELEMS // max(n, wa.shape[0], 1))
    a_rows_major = wa.dim() == 2 and wa.stride(0) == 1 and wa.shape[0] > 1  # a transposed view (wa = W.T)
    for c0 in range(0, m, step):
        c1 = min(m, c0 + step)
        bc = wb[:, c0:c1].float()
        if idx is None:
            ac = wa[:, c0:c1]
        elif a_rows_major:
            ac = wa.T.index_select(0, idx[c0:c1]).T  # gather whole rows of W, not strided columns
        else:
            ac = wa.index_select(1, idx[c0:c1])
        out.addmm_(bc, ac.float().T)


# ---- one read per tensor: J at the identity and at π₀, per-unit statistics, NaN/Inf ----------------
@dataclass
class UnitStats:
    """Per unit of a plain group (per KV-head slot of an attention group), summed over its
    tensors: Σ‖row of B‖², Σ‖row of A‖², Σ⟨row of B, row of A⟩ (identity)."""

    nb: torch.Tensor
    na: torch.Tensor
    dot: torch.Tensor


@dataclass
class Stats:
    j_identity: float = 0.0
    j_init: float = 0.0
    units: dict[str, UnitStats] = field(default_factory=dict)

    def unit(self, group: str, n: int) -> UnitStats:
        if group not in self.units:
            z = torch.zeros(n, dtype=torch.float64)
            self.units[group] = UnitStats(z.clone(), z.clone(), z.clone())
        return self.units[group]

    def flat(self, spec: Spec) -> torch.Tensor:
        """Everything as one float64 vector (for an all-reduce), groups in spec order."""
        parts = [torch.tensor([self.j_identity, self.j_init], dtype=torch.float64)]
        for g in spec.groups:
            u = self.unit(g, unit_count(spec, g))
            parts += [u.nb, u.na, u.dot]
        return torch.cat(parts)

    @classmethod
    def from_flat(cls, spec: Spec, flat: torch.Tensor) -> Stats:
        out = cls(float(flat[0]), float(flat[1]))
        pos = 2
        for g in spec.groups:
            n = unit_count(spec, g)
            out.units[g] = UnitStats(flat[pos:pos + n].clone(), flat[pos + n:pos + 2 * n].clone(),
                                     flat[pos + 2 * n:pos + 3 * n].clone())
            pos += 3 * n
        return out


def unit_count(spec: Spec, group: str) -> int:
    """Units the report compares: a plain group's size, an attention group's KV heads."""
    g = spec.groups[group]
    return g.n_kv_heads if g.is_attention else g.size


def plain_groups(spec: Spec) -> list[str]:
    return [name for name, g in spec.groups.items() if not g.is_attention]


def head_slots(spec: Spec, group: str, role: str) -> torch.Tensor | None:
    """KV-head slot of every index along an axis of ``role`` (None for the per-head norm weights,
    which every head shares: not part of a head's block)."""
    g = spec.groups[group]
    qd, kd = g.q_per_kv * g.d_head, g.d_head
    q = torch.arange(g.n_heads * g.d_head) // qd
    k = torch.arange(g.n_kv_heads * g.d_head) // kd
    return {"q": q, "o": q, "k": k, "v": k, "qkv": torch.cat([q, k, k])}.get(role)


def _dots(x: torch.Tensor, y: torch.Tensor, axis: int) -> torch.Tensor:
    """Σ x·y over every axis but ``axis`` (float32 in, float64 out)."""
    return _sum_to(x * y, axis)


def _sum_to(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Σ p over every axis but ``axis`` (float32 sums, float64 out)."""
    if p.dim() == 1:
        return p.double()
    dims = [d for d in range(p.dim()) if d != axis]
    return p.sum(dim=dims).double()


def _add_units(stats: Stats, spec: Spec, ref: Any, axis: int, start: int, stop: int,
               products: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """Per-unit sums along ``axis`` of this chunk's products (B², A², A·B) into ``stats``;
    returns the chunk's totals (‖B‖², ‖A‖², ⟨B, A⟩)."""
    group = spec.groups[ref.group]
    vals = [_sum_to(p, axis) for p in products]
    totals = tuple(float(v.sum()) for v in vals)
    u = stats.unit(ref.group, unit_count(spec, ref.group))
    if group.is_attention:
        slots = head_slots(spec, ref.group, ref.role)
        if slots is None:
            return totals
        if axis == 0:
            slots = slots[start:stop]
        for vec, v in zip((u.nb, u.na, u.dot), vals, strict=True):
            vec.index_add_(0, slots, v.cpu())
    else:
        for vec, v in zip((u.nb, u.na, u.dot), vals, strict=True):
            if axis == 0:
                vec[start:stop] += v.cpu()
            else:
                vec += v.cpu()
    return totals


def tensor_stats(store: PairStore, spec: Spec, name: str, init: Mapping[str, torch.Tensor] | None,
                 stats: Stats) -> None:
    """Add tensor ``name``'s share to ``stats`` in one read (see the module docstring).

    Per row chunk, converted to float32 once, the products B², A² and A·B once each: per-unit
    squared norms and identity dots along every permuted axis, whose sums are also
    the chunk's ‖B‖², ‖A‖² (the NaN/Inf check) and ⟨B, A⟩ (J at the identity); ⟨B, π₀(A)⟩ when
    the initial guess moved one of its axes. ``init``: π₀ (None: the identity). Raises
    NonFiniteError naming the file and tensor when A's or B's copy holds NaN/Inf.
    """
    tb, ta = store.pair(name)
    axes = spec.axes[name]
    moved = init is not None and any(r is not None and _moves(spec, init, r) for r in axes)
    sq_b = sq_a = 0.0
    for start, stop in row_chunks(tuple(tb.shape)):
        bc = (tb[start:stop] if tb.dim() else tb.reshape(1)).float()
        ac = (ta[start:stop] if ta.dim() else ta.reshape(1)).float()
        products = (bc * bc, ac * ac, ac * bc)  # each computed once, reduced along every permuted axis
        totals = None
        for axis, ref in enumerate(axes):
            if ref is not None:
                t = _add_units(stats, spec, ref, axis, start, stop, products)
                totals = totals or t
        if totals is None:  # no permuted axis (not matched): totals only
            totals = tuple(float(p.sum(dtype=torch.float64)) for p in products)
        del products
        sq_b += totals[0]
        sq_a += totals[1]
        stats.j_identity += totals[2]
        if moved:
            ap = permuted_rows(spec, name, ta, init, start, stop).float().reshape(-1)
            stats.j_init += float(torch.dot(ap, bc.reshape(-1)))
        else:
            stats.j_init += totals[2]
    if not (abs(sq_a) < float("inf") and abs(sq_b) < float("inf")):
        store.culprit([name])
        # finite after all: squares of values above ~1.8e19 overflow float32; the run goes on
    del tb, ta


def head_dots(store: PairStore, spec: Spec, group: str, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per KV-head slot k of an attention group: ⟨B's block k, π(A)'s block k⟩ over its Q, K, V, O
    rows and columns (float64). One read of the group's tensors, π applied whole (rotations too)."""
    from rebasin.permutation import permute_tensor

    g = spec.groups[group]
    out = torch.zeros(g.n_kv_heads, dtype=torch.float64)
    for name in spec.tensors_of(group):
        for axis, ref in enumerate(spec.axes[name]):
            if ref is None or ref.group != group or head_slots(spec, group, ref.role) is None:
                continue
            tb, ta = store.pair(name)
            pa = permute_tensor(spec, name, ta.float(), perms)
            out.index_add_(0, head_slots(spec, group, ref.role), _dots(tb.float(), pa, axis).cpu())
            del pa
    return out


def _moves(spec: Spec, perms: Mapping[str, torch.Tensor], ref: Any) -> bool:
    if has_rotation(spec, perms, ref):
        return True
    idx = axis_index(spec, perms, ref)
    return not bool((idx == torch.arange(idx.numel(), device=idx.device)).all())


def unit_dots(store: PairStore, spec: Spec, group: str, perms: Mapping[str, torch.Tensor],
              terms: list[Any], other_index: Callable[..., torch.Tensor | None]) -> torch.Tensor:
    """Per unit i of ``group``: Σ over its terms of ⟨row i of B, row π(i) of π_other(A)⟩ (float64).

    A pass over the group's tensors, O(size) each: what the report needs when no cost matrix
    built at the final π is at hand (a group not re-evaluated after its inputs last changed).
    """
    from rebasin.matching.terms import as_rows, mapped_a

    n = spec.groups[group].size
    own = perms[group].to(store.device)
    out = torch.zeros(n, dtype=torch.float64)
    for term in terms:
        tb, ta = store.pair(term.name)
        wb = as_rows(tb, term.axis)
        wa, idx = mapped_a(spec, term.name, term.axis, perms, ta)  # other_index, or a copy where rotations act
        m = wb.shape[1]
        step = max(1, streaming.CHUNK_ELEMS // max(n, 1))
        for c0 in range(0, m, step):
            c1 = min(m, c0 + step)
            bc = wb[:, c0:c1].float()
            ac = (wa[:, c0:c1] if idx is None else wa.index_select(1, idx[c0:c1])).index_select(0, own).float()
            out += (bc * ac).sum(1).double().cpu()
    return out
