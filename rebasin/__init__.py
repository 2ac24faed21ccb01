"""rebasin — move a fine-tune onto a new base model without data.

Public API (imported lazily, so ``import rebasin`` stays light):

* :func:`match` — weight matching: π with ``apply(source, π) ≈ target``.
* :func:`apply_to_state`, :func:`invert`, :func:`random_perms` — the permutation engine.
* :func:`apply_checkpoint` — write a checkpoint with π applied.
* :func:`transfer` — ``B + α·π(A_ft − A)`` (rebasin) or ``B + α·(A_ft − A)`` (diff).
* :func:`solve` — batched linear assignment with a uniform contract.
* :func:`open_model` — lazy checkpoint plus resolved spec.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "match": "rebasin.matching",
    "MatchResult": "rebasin.matching",
    "apply_to_state": "rebasin.permutation",
    "invert": "rebasin.permutation",
    "random_perms": "rebasin.permutation",
    "save_perms": "rebasin.io.perms_file",
    "load_perms": "rebasin.io.perms_file",
    "apply_checkpoint": "rebasin.apply",
    "open_model": "rebasin.model",
    "solve": "rebasin.solvers",
    "transfer": "rebasin.transfer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rebasin' has no attribute {name!r}")
