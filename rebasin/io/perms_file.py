"""The permutations file: π as a ``.safetensors`` file of tensors plus metadata.

One tensor per key of :mod:`rebasin.permutation` (``G`` for a plain group; ``G.heads``,
``G.qgroup``, ``G.qk``, ``G.vo`` for an attention group, int64; and, where π has them, the
rotations ``G.qk_rot``, ``G.vo_rot``, float64). Metadata (all strings):

==================  ===========================================================
``format``          :data:`FORMAT`, so other safetensors files are refused
``format_version``  ``"1"`` when π holds permutations only (readable by every version),
                    ``"2"`` when it holds rotations; both are read (:data:`SUPPORTED_VERSIONS`)
``family``          the spec family the permutations are for
``source``          the model π applies to, ``target`` the model it aligns it with
``convention``      ``apply(source, perms) ~= target; new[i] = old[perm[i]]`` (plus, with
                    rotations, ``then new_block = R @ block``)
==================  ===========================================================

plus any ``extra`` string pairs the writer passes (written last, so they win on a clash).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from rebasin.errors import InputFileError
from rebasin.io.checkpoint import read_header
from rebasin.io.writer import save_safetensors

FORMAT = "rebasin.permutations"
FORMAT_VERSION = "2"  # the newest version written
SUPPORTED_VERSIONS = ("1", "2")
ROTATION_SUFFIXES = (".qk_rot", ".vo_rot")


def save_perms(path: str | Path, perms: Mapping[str, torch.Tensor], *, family: str, source: str = "",
               target: str = "", extra: Mapping[str, str] | None = None) -> None:
    """Write π as a ``.safetensors`` file: int64 permutations, float64 rotations, plus metadata."""
    rotations = any(k.endswith(ROTATION_SUFFIXES) for k in perms)
    convention = "apply(source, perms) ~= target; new[i] = old[perm[i]]"
    if rotations:
        convention += "; then each head block of a rotated axis new_block = R @ block"
    metadata = {"format": FORMAT, "format_version": "2" if rotations else "1", "family": family,
                "source": str(source), "target": str(target), "convention": convention, **(extra or {})}
    tensors = {k: (v.to(torch.float64) if k.endswith(ROTATION_SUFFIXES) else v.to(torch.int64)).contiguous().cpu()
               for k, v in perms.items()}
    save_safetensors(tensors, path, metadata=metadata)


def load_perms(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a permutations file written by :func:`save_perms`: (key -> tensor, metadata).

    Raises InputFileError naming ``path`` when it is missing, truncated, not safetensors, or
    not a permutations file of a supported version. Keys and shapes are checked against a
    spec by :func:`rebasin.permutation.validate`, not here.
    """
    path = Path(path)
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            perms = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:
        raise InputFileError(f"cannot read permutations: {exc}", file=path) from None
    if meta.get("format") != FORMAT:
        raise InputFileError(f"not a rebasin permutations file (metadata format={meta.get('format')!r})", file=path)
    if meta.get("format_version") not in SUPPORTED_VERSIONS:
        raise InputFileError(f"unsupported permutations format version {meta.get('format_version')!r}", file=path)
    rotations = sorted(k for k in perms if k.endswith(ROTATION_SUFFIXES))
    if rotations and meta["format_version"] == "1":
        raise InputFileError(f"format version 1 holds permutations only, but '{rotations[0]}' is a rotation",
                             file=path)
    return perms, meta
