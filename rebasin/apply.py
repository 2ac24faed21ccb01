"""Write a checkpoint with a permutation set applied: a functionally identical model."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rebasin.estimate import check_budget, estimate_apply
from rebasin.io.checkpoint import DTYPES
from rebasin.io.stream_writer import Planned, StreamingCheckpointWriter
from rebasin.io.writer import DEFAULT_SHARD_BYTES, atomic_output_dir, copy_model_files
from rebasin.model import Model
from rebasin.permutation import invert, restrict, validate
from rebasin.streaming import check_finite_chunk, permuted_rows, return_freed_memory, row_chunks


def apply_checkpoint(model: Model, perms: Mapping[str, torch.Tensor], out: str | Path, *, inverse: bool = False,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     perms_file: object = None, progress: bool = False, memory: float | None = None,
                     symmetries: str = "full") -> Path:
    """Stream ``model`` tensor by tensor through π (or π⁻¹) into ``out``, atomically.

    Every tensor is checked for NaN/Inf as it is read (NonFiniteError, nothing written). Every
    non-weight file of the model directory (config, tokenizer, sentence-transformers modules,
    ...) is copied. For a headless model π must leave its output groups alone (``validate``).
    Peak memory is one tensor (when its rows move; else one chunk of rows) plus a chunk: shards
    are written as the tensors come (:mod:`rebasin.io.stream_writer`). The NaN/Inf check runs on
    each permuted chunk (a permutation moves values, so the chunk is non-finite exactly when the
    input is). ``memory``: budget in GiB (default: what the machine has free); a predicted peak
    above it is refused before any work (RefusedError, exit 7). ``symmetries="perm"`` applies
    only the permutations of π (its rotations, if any, are left out: still a symmetry).
    """
    perms = restrict(perms, symmetries)
    validate(model.spec, perms, where=perms_file, state=model.checkpoint.get)
    if inverse:
        perms = invert(model.spec, perms)
    out = Path(out)
    ck, spec = model.checkpoint, model.spec
    check_budget("apply", estimate_apply(model), memory)
    return_freed_memory()
    layout = [Planned(name, DTYPES[ck.tensors[name].dtype], ck.shape(name)) for name in ck.tensors]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = StreamingCheckpointWriter(tmp, layout, max_shard_bytes=max_shard_bytes)
        for name in tqdm(list(ck.tensors), desc="apply", unit="tensor", disable=not progress):
            moves_rows = bool(spec.axes.get(name)) and spec.axes[name][0] is not None
            # a tensor whose rows move is read whole (its rows come from anywhere); others a chunk at a time
            whole = ck.get(name) if moves_rows else None
            for start, stop in row_chunks(ck.shape(name)):
                src = whole if whole is not None else ck.get_rows(name, start, stop)
                chunk = permuted_rows(spec, name, src, perms, start if whole is not None else 0,
                                      stop if whole is not None else stop - start)
                check_finite_chunk(chunk, [(chunk, ck.where(name), name)], "")
                writer.write(name, chunk)
            del whole
        writer.close()
        copy_model_files(ck.directory, tmp)
    return out
