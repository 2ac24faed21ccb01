"""Architecture specs: families as data files, detection from ``config.json``, resolution."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from rebasin.errors import ArchitectureError
from rebasin.specs.schema import ATTENTION_ROLES, AxisRef, FamilySpec, Group, Spec

FAMILIES_DIR = Path(__file__).resolve().parent / "families"

__all__ = ["ATTENTION_ROLES", "AxisRef", "FamilySpec", "Group", "Spec", "detect_family", "list_families",
           "load_family", "resolve_spec"]


def list_families() -> list[str]:
    return sorted(p.stem for p in FAMILIES_DIR.glob("*.toml"))


@functools.cache
def load_family(name: str) -> FamilySpec:
    path = FAMILIES_DIR / f"{name}.toml"
    if not path.is_file():
        raise ArchitectureError(f"unsupported architecture family '{name}'; supported: {', '.join(list_families())}")
    return FamilySpec.from_file(path)


def detect_family(config: dict[str, Any], *, where: object = None) -> FamilySpec:
    """Pick the family whose ``model_types`` lists ``config['model_type']``."""
    model_type = config.get("model_type")
    if not model_type:
        raise ArchitectureError("config has no 'model_type'; pass the family explicitly (--arch)", file=where)
    for name in list_families():
        fam = load_family(name)
        if model_type in fam.model_types:
            return fam
    raise ArchitectureError(f"unsupported model_type '{model_type}'; supported families: "
                            f"{', '.join(list_families())}", file=where)


def resolve_spec(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, family: str | None = None,
                 where: object = None) -> Spec:
    """Resolve a family (given, or detected from ``config``) against a checkpoint's tensors."""
    fam = load_family(family) if family else detect_family(config, where=where)
    return fam.resolve(config, shapes, where=where)
