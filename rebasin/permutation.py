"""A symmetry π of a resolved spec, and the one generic engine that applies it.

Convention (gather, indexed by *target* slots): for a plain group with permutation ``p``,
applying it to a tensor axis gives ``new[i] = old[p[i]]``. ``rebasin match SOURCE TARGET``
returns ``π`` with ``apply(SOURCE, π) ≈ TARGET``.

Tensors stored per group (the permutations file, :mod:`rebasin.io.perms_file`, holds exactly
these; integer keys int64, rotations float64):

===============================  ====================  =========================================
key                              shape                 meaning
===============================  ====================  =========================================
``G`` (plain group)              (size,)               unit ``i`` of the result is unit ``p[i]``
``G.heads`` (attention)          (n_kv_heads,)         KV-head slot ``k`` takes KV head ``σ[k]``
``G.qgroup``                     (n_kv_heads, q)       query ``j`` of slot ``k`` is query ``τ[k, j]``
                                                       of KV head ``σ[k]`` (q = heads per KV head)
``G.qk``                         (n_kv_heads, d_head)  Q/K dims of slot ``k`` (identity with RoPE)
``G.vo``                         (n_kv_heads, d_head)  V dims / O input columns of slot ``k``
``G.qk_rot`` (optional)          (n_kv_heads, d, d)    orthogonal map of slot ``k``'s Q/K dims
                                                       (RoPE: frequency-pair rotations only)
``G.vo_rot`` (optional)          (n_kv_heads, d, d)    orthogonal map of slot ``k``'s V dims / O columns
===============================  ====================  =========================================

So Q row ``((k·q + j)·d_head + d)`` of the result is, before rotations, Q row
``((σ[k]·q + τ[k,j])·d_head + ρ_qk[k,d])`` of the source; K/V rows and O columns likewise; a
rotation then maps each gathered head block, ``new = R[k] @ block``.

Each symmetry kind lives in :mod:`rebasin.symmetry` (keys, identity, random, validate, invert,
apply); this module keeps the historical names.
"""
from __future__ import annotations

from typing import Any

from rebasin.specs import Group
from rebasin.symmetry import (
    ATTN_PARTS,
    ROT_PARTS,
    SYMMETRIES,
    Perms,
    apply_axis,
    apply_to_state,
    axis_index,
    group_keys,
    has_rotation,
    has_rotations,
    identity,
    inverse_perm,
    invert,
    kind_of,
    moved_fraction,
    permute_tensor,
    random_perms,
    restrict,
    rotation_amount,
    validate,
)

__all__ = [
    "ATTN_PARTS", "ROT_PARTS", "SYMMETRIES", "Perms", "apply_axis", "apply_to_state", "axis_index", "group_keys",
    "has_rotation", "has_rotations", "identity", "inverse_perm", "invert", "moved_fraction", "part_shape",
    "permute_tensor", "random_perms", "restrict", "rotation_amount", "validate",
]


def part_shape(group: Group, part: str | None) -> tuple[int, ...]:
    return kind_of(group).shape(group, f"{group.name}.{part}" if part else group.name)


_MOVED_TO_IO = ("FORMAT", "FORMAT_VERSION", "load_perms", "save_perms")


def __getattr__(name: str) -> Any:
    # The file format now lives in rebasin.io.perms_file; rebasin/demo.py and tests/test_demo.py
    # still import it from here. Drop this once they import rebasin.io.perms_file.
    if name in _MOVED_TO_IO:
        from rebasin.io import perms_file

        return getattr(perms_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

