"""A checkpoint together with its resolved spec: the unit every command works on."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin.errors import ArchitectureError, InputFileError
from rebasin.io.checkpoint import Checkpoint, open_checkpoint
from rebasin.specs import Spec, resolve_spec


@dataclass
class Model:
    """A lazily read checkpoint and the spec that describes all of its tensors."""

    checkpoint: Checkpoint
    spec: Spec

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint.config

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.checkpoint.tensors.items()}


def open_model(path: str | Path, *, family: str | None = None, config: str | Path | None = None) -> Model:
    """Open a model directory or bare ``.safetensors`` file and resolve its spec.

    Args:
        path: HF model directory, or a ``.safetensors`` file (then ``config`` is needed
            for sizes unless the file sits beside a ``config.json``).
        family: force a family (``--arch``) instead of detecting it from ``model_type``.
        config: path of a ``config.json`` to use instead of the checkpoint's own.
    """
    ckpt = open_checkpoint(path)
    if config is not None:
        cpath = Path(config)
        try:
            ckpt.config = json.loads(cpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputFileError(f"cannot read config: {exc}", file=cpath) from None
    elif not ckpt.config and ckpt.path.is_file() and (ckpt.path.parent / "config.json").is_file():
        ckpt.config = json.loads((ckpt.path.parent / "config.json").read_text(encoding="utf-8"))
    if not ckpt.config:
        if family is None:
            raise ArchitectureError("a bare .safetensors file needs --arch FAMILY and --config config.json", file=path)
        raise ArchitectureError(f"family '{family}' needs the model's sizes: pass --config config.json", file=path)
    spec = resolve_spec(ckpt.config, {k: v.shape for k, v in ckpt.tensors.items()}, family=family, where=ckpt.path)
    return Model(ckpt, spec)
