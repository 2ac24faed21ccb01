"""Write a checkpoint with a permutation set applied: a functionally identical model."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rebasin.io.writer import DEFAULT_SHARD_BYTES, CheckpointWriter, atomic_output_dir, copy_aux_files
from rebasin.model import Model
from rebasin.permutation import invert, permute_tensor, validate


def apply_checkpoint(model: Model, perms: Mapping[str, torch.Tensor], out: str | Path, *, inverse: bool = False,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     perms_file: object = None, progress: bool = False) -> Path:
    """Stream ``model`` tensor by tensor through π (or π⁻¹) into ``out``, atomically.

    Config, tokenizer and generation files are copied from the model directory. Peak
    memory is one output shard plus one tensor.
    """
    validate(model.spec, perms, where=perms_file)
    if inverse:
        perms = invert(model.spec, perms)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = CheckpointWriter(tmp, max_shard_bytes=max_shard_bytes)
        for name in tqdm(model.checkpoint.keys(), desc="apply", unit="tensor", disable=not progress):
            tensor = model.checkpoint.get(name)
            writer.add(name, permute_tensor(model.spec, name, tensor, perms))
        writer.close()
        copy_aux_files(model.checkpoint.directory, tmp)
    return out
