"""Head-aware matching of an attention group (TransFusion; see docs/design.md, Matching).

Blocks, with ``KV`` KV heads, ``G`` query heads per KV head, ``dh`` head dims and ``M``
columns (the residual, already mapped through the current residual permutation):

    Q, O : (KV, G, dh, M)      K, V : (KV, dh, M)      per-head norms (qk_dim): (dh, M)

Every step works from the cross inner products of B's and A's head rows (*grams*, built once
per step, like a plain group's cost): ``Xq[k', j, a, k, i, b] = ⟨row a of B's query head
(k', j), row b of A's query head (k, i)⟩`` and likewise K, V, O. For a KV slot ``k`` holding
A's head ``σ[k]``, the within-head maps are a gather ``ρ`` followed by an orthogonal ``R``
(``R = I`` under ``symmetries="perm"``), and the slot's share of J is ``⟨R P_ρ, C⟩`` with

    C_qk[k] = Σ_j Xq[k, j, :, σk, τ[k,j], :] + Xk[k, :, σk, :]
    C_vo[k] = Xv[k, :, σk, :] + Σ_j Xo[k, j, :, σk, τ[k,j], :]          (dh × dh each)

Maps given τ, each optimal for its cost (batched over slots):

* Q/K with RoPE: ``ρ = id``; ``R`` a rotation of each frequency pair ``(i, j)`` by
  ``θ = atan2(C_ji − C_ij, C_ii + C_jj)`` (closed form; only 0 or π where a per-dimension norm
  forbids other angles, see :mod:`rebasin.symmetry.attention`). With partial rotary the
  pass-through dims take the orthogonal Procrustes solution of their block of ``C`` (per class
  of equal norm weights under a per-dimension norm), block-diagonal with the pair rotations.
* Q/K without RoPE, V/O: ``ρ`` the linear assignment of ``C``; with rotations ``R`` is the
  orthogonal Procrustes solution of ``C[:, ρ]`` (``U Vᵀ`` of its SVD), so ``R P_ρ`` is the best
  orthogonal map and ``ρ`` its nearest permutation. A slot's ``R`` is kept only where it
  beats ``R = I`` by more than 0.1 % of the slot's value (``ROT_GAIN``: noise-fitting and
  rounding-level rotations stay exactly ``I``).
* τ given the maps: ``cost[k, j, i] = ⟨M_qk[k], Xq[k, j, :, σk, i, :]⟩ + ⟨M_vo[k], Xo[…]⟩``.

*Refining* alternates maps and τ (two rounds, then the maps once more). Candidates for σ:

1. the current π, refined;
2. a spectral proposal: σ, τ from singular-value spectra of each head's blocks (invariant to
   within-head maps and the residual permutation: computed once per match and cached);
3. a direct proposal: every (B slot, A head) pair is refined as if matched — τ first from
   relaxed query-pair scores (each query head with its own best map), then the alternation —
   and σ is the linear assignment of the pair values: the weight-matching objective itself,
   maximised jointly with the within-head maps.

All are scored by the exact float64 objective on the group's blocks; π changes only if the
best beats the current score by a relative 1e-9, so J never decreases.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rebasin.matching.terms import as_rows, other_index
from rebasin.solvers import solve
from rebasin.specs import Group, Spec
from rebasin.symmetry.attention import continuous_pairs, pass_classes, pass_dims, rope_pairs

State = Mapping[str, torch.Tensor]
# A slot's rotation must beat R = I by this fraction of the slot's share of J. Weights that differ
# only by drift (B = A + ε·noise) give noise-fitting rotations that gain ≈ ε²/2 (measured on the
# tiny models: ~1e-6 at ε = 0.01, ~1e-4 at ε = 0.1), independently trained heads 50–60 %: the dead
# zone keeps same-lineage pairs at the identity (diff and rebasin modes coincide) and rounding
# never leaves a near-identity rotation behind.
ROT_GAIN = 1e-3
# The σ starts each step refines and scores (module docstring); benchmarks/bench_heads.py drops
# "direct" to measure the spectra-only head step this replaced.
PROPOSALS = ("current", "spectral", "direct")


@dataclass
class HeadBlocks:
    """B and A blocks of one attention group, A's residual axes already mapped."""

    qb: torch.Tensor  # (KV, G, dh, Mq)
    qa: torch.Tensor
    kb: torch.Tensor  # (KV, dh, Mk)
    ka: torch.Tensor
    vb: torch.Tensor  # (KV, dh, Mv)
    va: torch.Tensor
    ob: torch.Tensor  # (KV, G, dh, Mo)
    oa: torch.Tensor
    nb: torch.Tensor  # (dh, Mn) per-head Q/K norms shared by all heads (Mn may be 0)
    na: torch.Tensor


def collect_blocks(spec: Spec, a: State, b: State, group: Group, perms: Mapping[str, torch.Tensor]) -> HeadBlocks:
    kv, g, dh = group.n_kv_heads, group.q_per_kv, group.d_head
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {r: [] for r in ("q", "k", "v", "o", "qk_dim")}
    for name, axes in spec.axes.items():
        for axis, ref in enumerate(axes):
            if ref is None or ref.group != group.name:
                continue
            xb = as_rows(b[name], axis).float()
            xa = as_rows(a[name], axis).float()
            idx = other_index(spec, name, axis, perms, tuple(a[name].shape), xa.device)
            if idx is not None:
                xa = xa[:, idx]
            if ref.role == "qkv":
                hq, hk = group.n_heads * dh, kv * dh
                for role, sl in (("q", slice(0, hq)), ("k", slice(hq, hq + hk)), ("v", slice(hq + hk, None))):
                    parts[role].append((xb[sl], xa[sl]))
            else:
                parts[ref.role].append((xb, xa))
    device = next(iter(b.values())).device

    def cat(role: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if not parts[role]:
            empty = torch.zeros(*shape, 0, device=device)
            return empty, empty
        xb = torch.cat([p[0] for p in parts[role]], dim=1)
        xa = torch.cat([p[1] for p in parts[role]], dim=1)
        return xb.reshape(*shape, -1), xa.reshape(*shape, -1)

    qb, qa = cat("q", (kv, g, dh))
    kb, ka = cat("k", (kv, dh))
    vb, va = cat("v", (kv, dh))
    ob, oa = cat("o", (kv, g, dh))
    nb, na = cat("qk_dim", (dh,))
    return HeadBlocks(qb, qa, kb, ka, vb, va, ob, oa, nb, na)


# ---- exact score on the blocks ------------------------------------------------------------------
def _heads(x: torch.Tensor, sigma: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
    """A's blocks in target-slot order: x[σ[k]] (and query head τ[k, j] inside the group)."""
    x = x[sigma]
    if tau is not None:
        x = torch.gather(x, 1, tau[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))
    return x


def _dims(x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Permute the dh axis of (KV, [G,] dh, M) blocks by ρ[k] per slot."""
    if x.dim() == 4:
        return torch.gather(x, 2, rho[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
    return torch.gather(x, 1, rho[:, :, None].expand(-1, -1, x.shape[2]))


def _mapped(x: torch.Tensor, rho: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    """(KV, [G,] dh, M) blocks through the within-head map of each slot: gather by ρ, then R (float64)."""
    x = _dims(x, rho).double()
    if rot is None:
        return x
    return torch.einsum("kab,kjbm->kjam" if x.dim() == 4 else "kab,kbm->kam", rot.to(x.device, torch.float64), x)


def score(hb: HeadBlocks, sigma: torch.Tensor, tau: torch.Tensor, rqk: torch.Tensor, rvo: torch.Tensor,
          qk_rot: torch.Tensor | None = None, vo_rot: torch.Tensor | None = None) -> float:
    """Σ ⟨B, π(A)⟩ over the group's tensors (float64). The norm weights are not rotated (an
    allowed Q/K rotation commutes with them), only gathered by ρ_qk."""
    total = (hb.qb.double() * _mapped(_heads(hb.qa, sigma, tau), rqk, qk_rot)).sum()
    total += (hb.kb.double() * _mapped(_heads(hb.ka, sigma), rqk, qk_rot)).sum()
    total += (hb.vb.double() * _mapped(_heads(hb.va, sigma), rvo, vo_rot)).sum()
    total += (hb.ob.double() * _mapped(_heads(hb.oa, sigma, tau), rvo, vo_rot)).sum()
    if hb.nb.shape[-1]:
        total += (hb.nb.double() * hb.na[rqk[0]].double()).sum()
    return float(total)


def current(perms: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor | None, ...]:
    """(σ, τ, ρ_qk, ρ_vo, R_qk, R_vo) of group ``name`` (an absent rotation is None)."""
    return (*(perms[f"{name}.{p}"] for p in ("heads", "qgroup", "qk", "vo")),
            perms.get(f"{name}.qk_rot"), perms.get(f"{name}.vo_rot"))


# ---- grams and per-slot costs -------------------------------------------------------------------
@dataclass
class SlotCosts:
    """Cross inner products for S (B slot, A head) pairs: ``q[s, j, a, i, b]`` = ⟨row a of B's
    query j of the slot, row b of A's query i of the head⟩; ``k``, ``v``: (S, dh, dh)."""

    q: torch.Tensor  # (S, G, dh, G, dh)
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # (S, G, dh, G, dh)


@dataclass
class Grams:
    """All B-head × A-head inner products of a group (float32): (KV, G, dh, KV, G, dh) for Q, O."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    n: torch.Tensor  # (dh, dh) norm weights: Σ over the norm tensors of b[a] a[b]

    @classmethod
    def of(cls, hb: HeadBlocks) -> Grams:
        kv, g, dh = hb.qb.shape[0], hb.qb.shape[1], hb.qb.shape[2]

        def gram(xb: torch.Tensor, xa: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            return (xb.reshape(-1, xb.shape[-1]) @ xa.reshape(-1, xa.shape[-1]).T).reshape(*shape, *shape)

        return cls(gram(hb.qb, hb.qa, (kv, g, dh)), gram(hb.kb, hb.ka, (kv, dh)), gram(hb.vb, hb.va, (kv, dh)),
                   gram(hb.ob, hb.oa, (kv, g, dh)), hb.nb @ hb.na.T)

    def slots(self, sigma: torch.Tensor) -> SlotCosts:
        """The costs of slot k against A's head σ[k]."""
        ar = torch.arange(sigma.numel(), device=sigma.device)
        return SlotCosts(self.q[ar, :, :, sigma], self.k[ar, :, sigma], self.v[ar, :, sigma], self.o[ar, :, :, sigma])

    def pairs(self) -> SlotCosts:
        """The costs of every (slot k', head k) pair, pair index k'·KV + k."""
        kv, g, dh = self.q.shape[:3]
        s = kv * kv
        return SlotCosts(self.q.permute(0, 3, 1, 2, 4, 5).reshape(s, g, dh, g, dh),
                         self.k.permute(0, 2, 1, 3).reshape(s, dh, dh), self.v.permute(0, 2, 1, 3).reshape(s, dh, dh),
                         self.o.permute(0, 3, 1, 2, 4, 5).reshape(s, g, dh, g, dh))


# ---- within-head maps --------------------------------------------------------------------------
@dataclass(frozen=True)
class Modes:
    """How each within-head map is solved: ``fixed`` (identity), ``perm`` (assignment),
    ``shared`` (one assignment for all heads, with the norm term), ``orth`` (assignment, then
    Procrustes), ``pairs`` (RoPE pair rotations); ``free`` marks the pairs that may take any
    angle (else 0 or π); ``blocks`` lists the classes of pass-through dims of partial rotary
    (int64 head dims each) that ``pairs`` maps by Procrustes (empty with full RoPE)."""

    qk: str
    vo: str
    free: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    blocks: tuple[torch.Tensor, ...] = ()


def modes_for(group: Group, rotations: bool, hb: HeadBlocks) -> Modes:
    if group.rope:
        qk = "pairs" if rotations else "fixed"
    elif group.qk_shared:
        qk = "shared"
    else:
        qk = "orth" if rotations else "perm"
    free = pairs = None
    blocks: tuple[torch.Tensor, ...] = ()
    if qk == "pairs":
        norms = hb.na.detach().cpu()
        pairs = rope_pairs(group).to(hb.qb.device)
        free = continuous_pairs(group, norms).to(hb.qb.device)
        classes = pass_classes(group, norms)
        if classes is None:  # unreachable with the weights at hand; only sign flips otherwise
            classes = [d[None] for d in pass_dims(group)]
        blocks = tuple(c.to(hb.qb.device) for c in classes)
    return Modes(qk, "orth" if rotations else "perm", free, pairs, blocks)


def _solve_perm(cost: torch.Tensor, solver: str) -> torch.Tensor:
    return solve(cost, method=solver).perm.to(cost.device)


def _gather_cols(cost: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """C[:, ρ] per slot: (S, dh, dh)."""
    return torch.gather(cost, 2, rho[:, None, :].expand(-1, cost.shape[1], -1))


def _value(cost: torch.Tensor, rho: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    """⟨R P_ρ, C⟩ per slot (float64): ``Σ_a C[a, ρ_a]`` without R, else ``⟨R, C[:, ρ]⟩``."""
    c = _gather_cols(cost, rho).double()
    if rot is None:
        return torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    return (rot * c).sum((-1, -2))


def _procrustes(c: torch.Tensor) -> torch.Tensor:
    """argmax over orthogonal R of ⟨R, C⟩ per slot: ``U Vᵀ`` of ``C = U S Vᵀ`` (float64)."""
    u, _, vh = torch.linalg.svd(c.double())
    return u @ vh


def _pair_rotation(cost: torch.Tensor, modes: Modes) -> torch.Tensor:
    """(S, dh, dh) cost -> (S, dh, dh) float64: the best rotation of each RoPE pair, closed form:
    ⟨R(θ), C_pair⟩ = a cos θ + b sin θ with a = C_ii + C_jj, b = C_ji − C_ij, maximised at
    θ = atan2(b, a) (or at 0 / π when restricted); partial rotary's pass-through classes by
    Procrustes on their diagonal blocks of C."""
    i, j = modes.pairs[:, 0], modes.pairs[:, 1]
    c = cost.double()
    a = c[:, i, i] + c[:, j, j]
    b = c[:, j, i] - c[:, i, j]
    h = torch.hypot(a, b)
    moves = h > 0
    cos = torch.where(moves, a / h.clamp_min(1e-300), torch.ones_like(a))
    sin = torch.where(moves, b / h.clamp_min(1e-300), torch.zeros_like(b))
    cos = torch.where(modes.free, cos, torch.where(a < 0, -1.0, 1.0).to(a.dtype))
    sin = torch.where(modes.free, sin, torch.zeros_like(sin))
    eye = torch.eye(cost.shape[-1], dtype=torch.float64, device=cost.device)
    r = eye.expand(cost.shape[0], -1, -1).clone()
    r[:, i, i] = cos
    r[:, j, j] = cos
    r[:, i, j] = -sin
    r[:, j, i] = sin
    for dims in modes.blocks:  # partial rotary: the best orthogonal map of each pass-through class
        sub = (dims[:, None], dims[None, :])
        r[(slice(None), *sub)] = _procrustes(c[(slice(None), *sub)])
    return r


def _snap(cost: torch.Tensor, rho: torch.Tensor, rot: torch.Tensor) -> torch.Tensor | None:
    """Slots whose rotation gains no more than a relative ``ROT_GAIN`` over R = I get exactly I."""
    with_rot, without = _value(cost, rho, rot), _value(cost, rho, None)
    keep = (with_rot - without) > ROT_GAIN * with_rot.abs().clamp_min(1e-300)
    if not bool(keep.any()):
        return None
    eye = torch.eye(rot.shape[-1], dtype=rot.dtype, device=rot.device)
    return torch.where(keep[:, None, None], rot, eye)


def _within(cost: torch.Tensor, mode: str, modes: Modes, solver: str,
            norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The best (ρ, R) per slot for one (S, dh, dh) cost (see the module docstring)."""
    s, dh = cost.shape[0], cost.shape[-1]
    ident = torch.arange(dh, device=cost.device).expand(s, dh).contiguous()
    if mode == "fixed":
        return ident, None
    if mode == "pairs":
        return ident, _snap(cost, ident, _pair_rotation(cost, modes))
    if mode == "shared":
        total = cost.sum(0) + (norm if norm is not None else 0)
        return _solve_perm(total, solver)[None].expand(s, -1).contiguous(), None
    rho = _solve_perm(cost, solver)
    if mode == "perm":
        return rho, None
    return rho, _snap(cost, rho, _procrustes(_gather_cols(cost, rho)))


def _best_value(cost: torch.Tensor, mode: str, modes: Modes, solver: str) -> torch.Tensor:
    """max over the allowed maps of ⟨M, C⟩ per problem (float64), for relaxed scores."""
    if mode == "fixed":
        return torch.diagonal(cost.double(), dim1=-2, dim2=-1).sum(-1)
    if mode == "orth":
        return torch.linalg.svdvals(cost.double()).sum(-1)
    if mode == "pairs":
        s, dh = cost.shape[0], cost.shape[-1]
        ident = torch.arange(dh, device=cost.device).expand(s, dh)
        return _value(cost, ident, _pair_rotation(cost, modes))
    return solve(cost, method=solver).objective.to(torch.float64).reshape(-1).to(cost.device)


def _dense(rho: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
    """M = R P_ρ per slot (float32), with P_ρ[a, b] = 1 iff b = ρ[a]."""
    p = torch.zeros(*rho.shape, rho.shape[-1], device=rho.device)
    p.scatter_(2, rho[:, :, None], 1.0)
    return p if rot is None else (rot.double() @ p.double()).float()


def _select(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(S, G, dh, G, dh) -> (S, G, dh, dh): B's query j against A's query τ[s, j]."""
    s, g, dh = x.shape[:3]
    return torch.gather(x, 3, tau[:, :, None, None, None].expand(s, g, dh, 1, dh)).squeeze(3)


@dataclass
class Maps:
    """Within-slot maps of S slots: query heads τ (S, G), gathers ρ (S, dh), rotations (or None)."""

    tau: torch.Tensor
    rqk: torch.Tensor
    rvo: torch.Tensor
    qk_rot: torch.Tensor | None
    vo_rot: torch.Tensor | None


def refine(c: SlotCosts, tau: torch.Tensor, modes: Modes, solver: str, norm: torch.Tensor | None = None,
           rounds: int = 2) -> tuple[Maps, torch.Tensor]:
    """Alternate the within-head maps (given τ) and τ (given the maps); returns the maps and each
    slot's value ⟨M_qk, C_qk⟩ + ⟨M_vo, C_vo⟩ (float64; the norm term left out)."""
    left = rounds if c.q.shape[1] > 1 else 0  # without GQA τ is trivial: one exact pass
    while True:
        cqk = _select(c.q, tau).sum(1) + c.k
        cvo = c.v + _select(c.o, tau).sum(1)
        rqk, qrot = _within(cqk, modes.qk, modes, solver, norm)
        rvo, vrot = _within(cvo, modes.vo, modes, solver)
        if left == 0:
            break
        left -= 1
        mqk, mvo = _dense(rqk, qrot), _dense(rvo, vrot)
        ctau = torch.einsum("sab,sjaib->sji", mqk, c.q) + torch.einsum("sab,sjaib->sji", mvo, c.o)
        tau = _solve_perm(ctau, solver)
    value = _value(cqk, rqk, qrot) + _value(cvo, rvo, vrot)
    return Maps(tau, rqk, rvo, qrot, vrot), value


# ---- proposals for σ ---------------------------------------------------------------------------
def _spectra(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each (r, M) block, descending, (..., min(r, M)).

    Via the eigenvalues of the smaller Gram matrix (a GEMM plus a small symmetric eigensolve,
    float64): much faster than an SVD of the wide blocks, and accurate enough for a feature.
    """
    if x.shape[-1] == 0:
        return torch.zeros(*x.shape[:-2], 0, device=x.device)
    x = x.float()
    gram = x @ x.transpose(-1, -2) if x.shape[-2] <= x.shape[-1] else x.transpose(-1, -2) @ x
    return torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt().flip(-1).float()


def spectral_proposal(hb: HeadBlocks, group: Group, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and τ from within-head-map-invariant costs (singular-value spectra)."""
    kv, g, dh = group.n_kv_heads, group.q_per_kv, group.d_head

    def group_feats(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, ob: torch.Tensor) -> torch.Tensor:
        return torch.cat([_spectra(qb.reshape(kv, g * dh, -1)), _spectra(kb), _spectra(vb),
                          _spectra(ob.reshape(kv, g * dh, -1))], dim=-1)

    fb, fa = group_feats(hb.qb, hb.kb, hb.vb, hb.ob), group_feats(hb.qa, hb.ka, hb.va, hb.oa)
    sigma = _solve_perm(-torch.cdist(fb.double(), fa.double()).pow(2).float(), solver)
    if g == 1:
        return sigma, torch.zeros(kv, 1, dtype=torch.long, device=sigma.device)
    qfb = torch.cat([_spectra(hb.qb), _spectra(hb.ob)], dim=-1)  # (KV, G, r)
    qfa = torch.cat([_spectra(hb.qa), _spectra(hb.oa)], dim=-1)[sigma]
    tau = _solve_perm(-torch.cdist(qfb.double(), qfa.double()).pow(2).float(), solver)
    return sigma, tau


def direct_proposal(grams: Grams, modes: Modes, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """σ, τ from the weight-matching objective of every (B slot, A head) pair, each pair's
    within-head maps and query heads optimised as if it were matched (module docstring, 3)."""
    kv, g, dh = grams.q.shape[:3]
    c = grams.pairs()
    s = kv * kv
    if g > 1:
        # relaxed start: each (query j of the slot, query i of the head) with its own best maps
        qv = _best_value(c.q.permute(0, 1, 3, 2, 4).reshape(s * g * g, dh, dh), modes.qk, modes, solver)
        ov = _best_value(c.o.permute(0, 1, 3, 2, 4).reshape(s * g * g, dh, dh), modes.vo, modes, solver)
        tau0 = _solve_perm((qv + ov).reshape(s, g, g).float(), solver)
    else:
        tau0 = torch.zeros(s, 1, dtype=torch.long, device=c.q.device)
    maps, value = refine(c, tau0, modes, solver)
    sigma = _solve_perm(value.reshape(kv, kv).float(), solver)
    tau = maps.tau.reshape(kv, kv, g)[torch.arange(kv, device=sigma.device), sigma]
    return sigma, tau


# ---- the step ----------------------------------------------------------------------------------
def update_attention(spec: Spec, a: State, b: State, group: Group, perms: dict[str, torch.Tensor], *,
                     solver: str, timer, proposals: dict, rotations: bool = False) -> bool:
    """One head-aware step on ``group``; returns whether π changed (only when the score rises).

    ``proposals``: group name -> spectral (σ, τ), filled on first use and reused by later sweeps.
    ``rotations``: also solve orthogonal V/O maps and RoPE pair (or non-RoPE orthogonal) Q/K maps.
    """
    with timer("cost"):
        hb = collect_blocks(spec, a, b, group, perms)
        grams = Grams.of(hb)
        cur = current(perms, group.name)
        base = score(hb, *cur)
    modes = modes_for(group, rotations, hb)
    norm = grams.n if modes.qk == "shared" else None
    with timer("solve"):
        starts = [(cur[0], cur[1])] if "current" in PROPOSALS else []
        if "spectral" in PROPOSALS:
            if group.name not in proposals:  # spectra ignore every map: the same each sweep
                proposals[group.name] = spectral_proposal(hb, group, solver)
            starts.append(proposals[group.name])
        if "direct" in PROPOSALS:
            starts.append(direct_proposal(grams, modes, solver))
        candidates = []
        for sigma, tau in starts:
            maps, _ = refine(grams.slots(sigma), tau, modes, solver, norm)
            candidates.append((sigma, maps.tau, maps.rqk, maps.rvo, maps.qk_rot, maps.vo_rot))
    with timer("cost"):
        scored = [(score(hb, *c), c) for c in candidates]
    best_score, best = max(scored, key=lambda sc: sc[0])
    scale = 1e-9 * max(abs(base), 1e-30)
    if best_score <= base + scale or all(_same(x, y) for x, y in zip(best, cur, strict=True)):
        return False
    for part, value in zip(("heads", "qgroup", "qk", "vo", "qk_rot", "vo_rot"), best, strict=True):
        key = f"{group.name}.{part}"
        if value is not None:
            perms[key] = value
        else:
            perms.pop(key, None)
    return True


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return torch.equal(x.to(y.device, y.dtype), y)


def head_cosines(spec: Spec, a: State, b: State, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
    """Mean over KV-head slots of cos(all blocks of slot k in B, same of π(A))."""
    device = next(iter(b.values())).device
    p = {k: v.to(device) for k, v in perms.items()}
    hb = collect_blocks(spec, a, b, group, p)
    sigma, tau, rqk, rvo, qrot, vrot = current(p, group.name)
    pairs = [(hb.qb, _mapped(_heads(hb.qa, sigma, tau), rqk, qrot)), (hb.kb, _mapped(_heads(hb.ka, sigma), rqk, qrot)),
             (hb.vb, _mapped(_heads(hb.va, sigma), rvo, vrot)), (hb.ob, _mapped(_heads(hb.oa, sigma, tau), rvo, vrot))]
    kv = group.n_kv_heads
    dots = sum((x.double().reshape(kv, -1) * y.reshape(kv, -1)).sum(1) for x, y in pairs)
    nb = sum((x.double().reshape(kv, -1) ** 2).sum(1) for x, _ in pairs)
    na = sum((y.reshape(kv, -1) ** 2).sum(1) for _, y in pairs)
    return float((dots / (nb.sqrt() * na.sqrt()).clamp_min(1e-12)).mean())
