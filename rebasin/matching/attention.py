"""Head-aware matching of an attention group (TransFusion; see docs/design.md, Matching).

Blocks, with ``KV`` KV heads, ``G`` query heads per KV head, ``dh`` head dims and ``M``
columns (the residual, already mapped through the current residual permutation):

    Q, O : (KV, G, dh, M)      K, V : (KV, dh, M)      per-head norms (qk_dim): (dh, M)

One update:

1. *Whole heads* from a cost that ignores within-head order: the singular values of each
   KV head's [Q group], K, V, [O group] blocks (invariant to any within-head permutation
   and to the residual permutation): ``C[k', k] = -Σ_blocks ‖s_B(k') − s_A(k)‖²``, one LAP
   for σ; then query heads inside each KV group likewise (a batch of KV problems of G×G).
2. *Within heads*, for all matched pairs at once (batches of KV problems of dh×dh):
   ``C_qk[k'] = Σ_j Q_B[k',j] Q_A[σk',τj]ᵀ + K_B[k'] K_A[σk']ᵀ`` (skipped with RoPE: the
   identity is the only permutation that keeps frequency pairs; summed over heads when a
   per-head norm ties them), ``C_vo[k'] = V_B[k'] V_A[σk']ᵀ + Σ_j O_B[k',j] O_A[σk',τj]ᵀ``,
   and τ refined exactly given ρ.

Both the current π (refined) and the spectral proposal (refined) are scored by the exact
objective restricted to the group's tensors; π changes only if the score improves, so the
global objective never decreases.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rebasin.matching.terms import as_rows, other_index
from rebasin.solvers import solve
from rebasin.specs import Group, Spec

State = Mapping[str, torch.Tensor]


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


def score(hb: HeadBlocks, sigma: torch.Tensor, tau: torch.Tensor, rqk: torch.Tensor, rvo: torch.Tensor) -> float:
    """Σ ⟨B, π(A)⟩ over the group's tensors (float64)."""
    total = (hb.qb.double() * _dims(_heads(hb.qa, sigma, tau), rqk).double()).sum()
    total += (hb.kb.double() * _dims(_heads(hb.ka, sigma), rqk).double()).sum()
    total += (hb.vb.double() * _dims(_heads(hb.va, sigma), rvo).double()).sum()
    total += (hb.ob.double() * _dims(_heads(hb.oa, sigma, tau), rvo).double()).sum()
    if hb.nb.shape[-1]:
        total += (hb.nb.double() * hb.na[rqk[0]].double()).sum()
    return float(total)


def _solve_perm(cost: torch.Tensor, solver: str) -> torch.Tensor:
    return solve(cost, method=solver).perm.to(cost.device)


def refine(hb: HeadBlocks, group: Group, sigma: torch.Tensor, tau: torch.Tensor, rqk: torch.Tensor,
           rvo: torch.Tensor, solver: str, rounds: int = 2) -> tuple[torch.Tensor, ...]:
    """Exact coordinate steps on ρ_qk, ρ_vo and τ with σ fixed (each never lowers the score)."""
    for _ in range(rounds):
        qa_h, ka_h = _heads(hb.qa, sigma, tau), _heads(hb.ka, sigma)
        if not group.rope:
            cqk = torch.einsum("kjam,kjbm->kab", hb.qb, qa_h) + torch.einsum("kam,kbm->kab", hb.kb, ka_h)
            if hb.nb.shape[-1]:
                cqk = cqk + (hb.nb @ hb.na.T)[None]
            if group.qk_shared:
                rqk = _solve_perm(cqk.sum(0), solver)[None].expand(group.n_kv_heads, -1).contiguous()
            else:
                rqk = _solve_perm(cqk, solver)
        cvo = (torch.einsum("kam,kbm->kab", hb.vb, _heads(hb.va, sigma))
               + torch.einsum("kjam,kjbm->kab", hb.ob, _heads(hb.oa, sigma, tau)))
        rvo = _solve_perm(cvo, solver)
        if group.q_per_kv > 1:
            qa_s = _dims(_heads(hb.qa, sigma), rqk)
            oa_s = _dims(_heads(hb.oa, sigma), rvo)
            ctau = torch.einsum("kiam,kjam->kij", hb.qb, qa_s) + torch.einsum("kiam,kjam->kij", hb.ob, oa_s)
            tau = _solve_perm(ctau, solver)
    return sigma, tau, rqk, rvo


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
    """σ and τ from within-head-order-invariant costs (singular-value spectra)."""
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


def current(perms: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, ...]:
    return tuple(perms[f"{name}.{p}"] for p in ("heads", "qgroup", "qk", "vo"))


def update_attention(spec: Spec, a: State, b: State, group: Group, perms: dict[str, torch.Tensor], *,
                     solver: str, timer, proposals: dict) -> bool:
    """One head-aware step on ``group``; returns whether π changed (only when the score rises).

    ``proposals``: group name -> spectral (σ, τ), filled on first use and reused by later sweeps.
    """
    with timer("cost"):
        hb = collect_blocks(spec, a, b, group, perms)
        cur = current(perms, group.name)
        base = score(hb, *cur)
    with timer("solve"):
        candidates = [refine(hb, group, *cur, solver=solver)]
        # spectra ignore every permutation, so the proposal is the same each sweep: cached per match
        if group.name not in proposals:
            proposals[group.name] = spectral_proposal(hb, group, solver)
        sigma, tau = proposals[group.name]
        ident_qk = torch.arange(group.d_head, device=sigma.device).expand(group.n_kv_heads, -1).contiguous()
        candidates.append(refine(hb, group, sigma, tau, ident_qk, ident_qk.clone(), solver=solver))
    with timer("cost"):
        scored = [(score(hb, *c), c) for c in candidates]
    best_score, best = max(scored, key=lambda sc: sc[0])
    scale = 1e-9 * max(abs(base), 1e-30)
    if best_score <= base + scale or all(torch.equal(x, y) for x, y in zip(best, cur, strict=True)):
        return False
    for part, value in zip(("heads", "qgroup", "qk", "vo"), best, strict=True):
        perms[f"{group.name}.{part}"] = value
    return True


def head_cosines(spec: Spec, a: State, b: State, group: Group, perms: Mapping[str, torch.Tensor]) -> float:
    """Mean over KV-head slots of cos(all blocks of slot k in B, same of π(A))."""
    device = next(iter(b.values())).device
    p = {k: v.to(device) for k, v in perms.items()}
    hb = collect_blocks(spec, a, b, group, p)
    sigma, tau, rqk, rvo = current(p, group.name)
    pairs = [(hb.qb, _dims(_heads(hb.qa, sigma, tau), rqk)), (hb.kb, _dims(_heads(hb.ka, sigma), rqk)),
             (hb.vb, _dims(_heads(hb.va, sigma), rvo)), (hb.ob, _dims(_heads(hb.oa, sigma, tau), rvo))]
    kv = group.n_kv_heads
    dots = sum((x.reshape(kv, -1) * y.reshape(kv, -1)).sum(1) for x, y in pairs)
    nb = sum((x.reshape(kv, -1) ** 2).sum(1) for x, _ in pairs)
    na = sum((y.reshape(kv, -1) ** 2).sum(1) for _, y in pairs)
    return float((dots / (nb.sqrt() * na.sqrt()).clamp_min(1e-12)).mean())
