"""A checkpoint together with its resolved spec: the unit every command works on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin.errors import ArchitectureError
from rebasin.io.checkpoint import Checkpoint, open_checkpoint
from rebasin.io.jsonfile import read_json
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
        ckpt.config = read_json(config, what="model config")
    elif not ckpt.config and ckpt.path.is_file() and (ckpt.path.parent / "config.json").is_file():
        ckpt.config = read_json(ckpt.path.parent / "config.json", what="model config")
    if not ckpt.config:
        if ckpt.directory is not None:
            raise ArchitectureError("no config.json in this model directory: the architecture and its sizes are "
                                    "read from it (or pass --arch FAMILY --config config.json)", file=path)
        if family is None:
            raise ArchitectureError("a bare .safetensors file needs --arch FAMILY and --config config.json", file=path)
        raise ArchitectureError(f"family '{family}' needs the model's sizes: pass --config config.json", file=path)
    spec = resolve_spec(ckpt.config, {k: v.shape for k, v in ckpt.tensors.items()}, family=family, where=ckpt.path)
    return Model(ckpt, spec)
