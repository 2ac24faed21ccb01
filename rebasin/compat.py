"""The one architecture-compatibility check shared by match and transfer."""
from __future__ import annotations

from rebasin.errors import IncompatibleInputsError
from rebasin.specs import Spec


def check_same_architecture(sa: Spec, sb: Spec, la: object, lb: object, roles: str = "") -> None:
    """Raise IncompatibleInputsError unless both specs have the same family and the same groups.

    ``la`` / ``lb`` name the two inputs (paths or labels) in the message; ``roles`` says what
    they are to the user (e.g. "the old base and the new base").
    """
    what = f"{roles} are " if roles else ""
    if sa.family != sb.family:
        raise IncompatibleInputsError(f"{what}different architectures: {la} is {sa.family}, {lb} is {sb.family}")
    if sa.groups != sb.groups:
        diff = next(g for g in sorted(set(sa.groups) | set(sb.groups)) if sa.groups.get(g) != sb.groups.get(g))
        raise IncompatibleInputsError(f"{what}not the same shape: group '{diff}' differs between {la} and {lb} "
                                      f"({_describe(sa, diff)} vs {_describe(sb, diff)})")


def _describe(spec: Spec, name: str) -> str:
    g = spec.groups.get(name)
    if g is None:
        return "absent"
    if g.is_attention:
        return f"{g.n_heads} heads, {g.n_kv_heads} KV heads of dim {g.d_head}"
    return f"size {g.size}"
