"""How well a given π aligns A to B, without matching: the per-group statistics of a match.

``transfer --perms`` has no :class:`~rebasin.matching.engine.MatchResult`, yet its report and
``alignment.png`` show the same numbers a match would: per group the fraction of units moved,
the mean cosine of B's units to A's before (identity) and after π, and for a π holding rotations
(a format-version-2 file) how much they rotate and how many KV heads they map, plus
``J = Σ_W ⟨W_B, π(W_A)⟩`` at the identity and at π. Plain groups are accumulated streaming, one
tensor of A and B at a time; an attention group reads only its own layer's tensors.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from rebasin.matching.attention import head_cosines
from rebasin.matching.engine import attention_moved
from rebasin.matching.terms import as_rows
from rebasin.model import Model
from rebasin.permutation import identity, moved_fraction, permute_tensor
from rebasin.symmetry import kind_of


def alignment_stats(a: Model, b: Model, perms: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``{"objective_identity", "objective", "groups": [...]}`` for π applied to A, compared with B.

    ``groups`` has the fields of :class:`~rebasin.matching.engine.GroupStats` (name, kind,
    size, moved, cos_before, cos_after, template, layer, rotation: mean ‖R − I‖_F / (2√d) over
    the group's rotations), and where the kind has rotations ``rotated_blocks`` (KV-head slots
    a non-identity rotation maps) of ``rotation_blocks`` (n_kv_heads). Tensors whose shapes differ between
    A and B (a vocabulary change) are left out, as ``rebasin match`` leaves them out.
    """
    names = [n for n in a.spec.permuted_tensors() if b.spec.shapes.get(n) == a.spec.shapes[n]]
    spec = replace(a.spec, axes={n: a.spec.axes[n] for n in names}, shapes={n: a.spec.shapes[n] for n in names})
    ident = identity(spec)
    plain = {g.name: g for g in spec.groups.values() if not g.is_attention}
    acc: dict[str, list[torch.Tensor]] = {g: [torch.zeros(p.size, dtype=torch.float64) for _ in range(6)]
                                          for g, p in plain.items()}
    j_identity = j_pi = 0.0
    for name in names:
        ta = a.checkpoint.get(name, dtype=torch.float32, check_finite=True)
        tb = b.checkpoint.get(name, dtype=torch.float32, check_finite=True)
        pa = permute_tensor(spec, name, ta, perms)
        j_identity += float((tb.double() * ta.double()).sum())
        j_pi += float((tb.double() * pa.double()).sum())
        for axis, ref in enumerate(spec.axes[name]):
            if ref is None or ref.group not in plain:
                continue
            rb = as_rows(tb, axis).double()
            for k, x in ((0, as_rows(ta, axis).double()), (3, as_rows(pa, axis).double())):
                acc[ref.group][k] += (rb * x).sum(1)
                acc[ref.group][k + 1] += (x * x).sum(1)
                acc[ref.group][k + 2] += (rb * rb).sum(1)

    def cosine(dots: torch.Tensor, na: torch.Tensor, nb: torch.Tensor) -> float:
        return float((dots / (na.sqrt() * nb.sqrt()).clamp_min(1e-12)).mean())

    groups = []
    for group in spec.groups.values():
        if group.is_attention:
            tensors = spec.tensors_of(group.name)
            if not tensors:
                continue
            sa = {n: a.checkpoint.get(n, dtype=torch.float32) for n in tensors}
            sb = {n: b.checkpoint.get(n, dtype=torch.float32) for n in tensors}
            before, after = head_cosines(spec, sa, sb, group, ident), head_cosines(spec, sa, sb, group, perms)
            moved = attention_moved(spec, group, perms)
        else:
            d0, a0, b0, d1, a1, b1 = acc[group.name]
            before, after, moved = cosine(d0, a0, b0), cosine(d1, a1, b1), moved_fraction(perms, group.name)
        kind = kind_of(group)
        row = {"name": group.name, "kind": group.kind, "size": group.size, "moved": moved, "cos_before": before,
               "cos_after": after, "template": group.template, "layer": group.layer,
               "rotation": kind.rotation(group, perms)}
        if kind.rotation_blocks(group):
            row.update(rotated_blocks=kind.rotated_blocks(group, perms), rotation_blocks=kind.rotation_blocks(group))
        groups.append(row)
    return {"objective_identity": j_identity, "objective": j_pi, "groups": groups}
