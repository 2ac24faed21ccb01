"""Row-chunked tensor work shared by ``apply``, ``transfer`` and the matcher.

A chunk is a range of rows of axis 0, sized so that its float32 copy is about
:data:`CHUNK_ELEMS` elements: the memory any per-tensor pass holds beyond its inputs is a
few chunks, whatever the tensor's size. Chunk boundaries depend only on the tensor's
shape, never on the memory mode, so streaming and cached runs do the same arithmetic.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
from collections.abc import Iterator, Mapping

import torch

from rebasin.errors import NonFiniteError
from rebasin.io.checkpoint import all_finite, ensure_finite
from rebasin.permutation import axis_index, has_rotation
from rebasin.specs import Spec
from rebasin.symmetry import gather, rotated_rows

CHUNK_ELEMS = 1 << 22  # 4 Mi elements: 16 MiB in float32
_MALLOPT_SET = False


def return_freed_memory() -> None:
    """Have glibc hand buffers of 1 MiB and more back to the OS as soon as they are freed.

    By default glibc raises its mmap threshold after the first large free, so later chunk-sized
    buffers come from the heap and freed ones stay resident: on the 0.5 B benchmark a streaming
    match peaked anywhere between 1.3 and 1.7 GiB with it, 1.0 GiB without (the work is the same).
    Called when a job starts streaming a checkpoint; process-wide, once; skipped when the user
    set ``MALLOC_MMAP_THRESHOLD_`` or the C library is not glibc.
    """
    global _MALLOPT_SET
    if _MALLOPT_SET or os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return
    _MALLOPT_SET = True
    _mallopt(mmap_threshold=1 << 20, trim_threshold=128 << 10)


def _mallopt(mmap_threshold: int, trim_threshold: int, trim: bool = False) -> None:
    """glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (fixed values: glibc stops adapting them), then
    ``malloc_trim(0)`` with ``trim``. Nothing off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
        if trim:
            libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, glibc keeps freed buffers for reuse: up to 32 MiB each (its largest mmap
    threshold) and 512 MiB at the top of the heap; on exit the streaming setting of
    :func:`return_freed_memory` comes back if it was in force, else the values glibc's own
    adaptive thresholds grow to (32 MiB per buffer, 64 MiB of trim: a mallopt call ends that
    adaptation for good, and 128 KiB would map every activation afresh), and the kept memory is
    handed back.

    For work that allocates the same large temporaries over and over — calibration's forwards
    (activations, logits): with every buffer of 1 MiB and more a fresh mapping, each use
    page-faults it in again (a 125 M calibration took 7.4 s that way, 5.2 s reusing). Skipped
    when the user set ``MALLOC_MMAP_THRESHOLD_``.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        yield
        return
    _mallopt(mmap_threshold=32 << 20, trim_threshold=512 << 20)
    try:
        yield
    finally:
        if _MALLOPT_SET:
            _mallopt(mmap_threshold=1 << 20, trim_threshold=128 << 10, trim=True)
        else:
            _mallopt(mmap_threshold=32 << 20, trim_threshold=64 << 20, trim=True)


def row_chunks(shape: tuple[int, ...] | torch.Size, elems: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of axis 0 covering ``shape`` (one range for a 0-d or empty tensor)."""
    elems = elems or CHUNK_ELEMS
    if len(shape) == 0:
        yield 0, 1
        return
    rows = shape[0]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, elems // per_row)
    if rows == 0:
        yield 0, 0
        return
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def permuted_rows(spec: Spec, name: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor] | None,
                  start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of π(tensor) (of ``tensor`` when ``perms`` is None), in ``tensor``'s dtype."""
    if tensor.dim() == 0:
        return tensor
    axes = spec.axes.get(name) if perms is not None else None
    if not axes:
        return tensor[start:stop]
    if any(ref is not None and has_rotation(spec, perms, ref) for ref in axes):
        return rotated_rows(spec, name, tensor, perms, start, stop)  # orthogonal maps mix rows/columns
    out = tensor
    for axis, ref in enumerate(axes):
        if ref is None:
            if axis == 0:
                out = out[start:stop]
            continue
        idx = axis_index(spec, perms, ref).to(out.device)
        out = gather(out, axis, idx[start:stop] if axis == 0 else idx)
    return out


def check_finite_chunk(chunk: torch.Tensor, inputs: list[tuple[torch.Tensor, object, str]], what: str,
                       wide: torch.Tensor | None = None) -> None:
    """NonFiniteError when ``chunk`` (a result) holds NaN/Inf: naming the input that does, else ``what``.

    The check runs on the result each pass produces anyway (NaN/Inf in any input reaches it),
    so finite inputs cost no copy of their own; only a failure looks at the inputs, to name the
    file and tensor at fault. ``wide``: the result before its cast to ``chunk``'s dtype (float32):
    then the test is its sum, one fast reduction (a NaN or Inf anywhere makes it non-finite; a
    sum that overflows on finite values only sends it to the exact test), plus, for a narrower
    dtype than bfloat16's range (float16), its largest magnitude against that dtype's maximum.
    """
    if not chunk.is_floating_point():
        return
    if wide is not None and wide.numel():
        fits = math.isfinite(float(wide.sum()))
        if fits and torch.finfo(chunk.dtype).max < torch.finfo(torch.bfloat16).max:
            fits = float(wide.abs().amax()) <= torch.finfo(chunk.dtype).max
        if fits:
            return
    if all_finite(chunk):
        return
    for tensor, file, name in inputs:
        ensure_finite(tensor, file, name)
    raise NonFiniteError(what)
