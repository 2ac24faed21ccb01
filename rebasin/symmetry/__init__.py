"""Symmetries of a resolved spec, one home per kind (docs/design.md, Symmetries).

``base`` defines the seam (:class:`SymmetryKind`), ``plain`` and ``attention`` the two kinds,
``ops`` the whole-spec operations (identity, random, validate, invert, apply) that loop over a
spec's groups and defer to each group's kind. :mod:`rebasin.permutation` re-exports these
under their historical names.
"""
from rebasin.symmetry.attention import (
    ATTN_PARTS,
    ROT_PARTS,
    AttentionSymmetry,
    continuous_pairs,
    haar_orthogonal,
    pair_rotation,
    rope_pairs,
)
from rebasin.symmetry.base import Perms, SymmetryKind, inverse_perm
from rebasin.symmetry.ops import (
    KINDS,
    SYMMETRIES,
    all_keys,
    apply_axis,
    apply_to_state,
    axis_index,
    group_keys,
    has_rotation,
    has_rotations,
    identity,
    invert,
    kind_of,
    moved_fraction,
    norm_weights,
    permute_tensor,
    random_perms,
    restrict,
    rotated_rows,
    rotation_amount,
    validate,
)
from rebasin.symmetry.plain import PlainPermutation

__all__ = [
    "ATTN_PARTS",
    "KINDS",
    "ROT_PARTS",
    "SYMMETRIES",
    "AttentionSymmetry",
    "Perms",
    "PlainPermutation",
    "SymmetryKind",
    "all_keys",
    "apply_axis",
    "apply_to_state",
    "axis_index",
    "continuous_pairs",
    "group_keys",
    "haar_orthogonal",
    "has_rotation",
    "has_rotations",
    "identity",
    "inverse_perm",
    "invert",
    "kind_of",
    "moved_fraction",
    "norm_weights",
    "pair_rotation",
    "permute_tensor",
    "random_perms",
    "restrict",
    "rope_pairs",
    "rotated_rows",
    "rotation_amount",
    "validate",
]
