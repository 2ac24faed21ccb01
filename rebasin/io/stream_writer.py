"""Sharded safetensors written as tensors are produced: nothing proportional to a shard is held.

:class:`CheckpointWriter` collects a shard's tensors in memory and saves them at once (up to
2 GiB held). Here the layout is planned up front from the names, dtypes and shapes the caller
will produce (a transfer or an apply knows them from the input headers), so every shard's
header can be written first and each tensor's bytes appended as they come, even a row chunk at
a time. Same files as :class:`CheckpointWriter`: ``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``, split by the same
rule, which ``transformers``' ``from_pretrained`` and ``safetensors`` read.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebasin.io.writer import DEFAULT_SHARD_BYTES, as_os_error

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(layout: Iterable[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Split ``layout`` in order: a new shard starts when the next tensor would pass the limit
    (the rule of :class:`CheckpointWriter`, so both writers shard a model alike)."""
    shards: list[list[Planned]] = []
    current: list[Planned] = []
    size = 0
    for item in layout:
        if current and size + item.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current:
        shards.append(current)
    return shards


class StreamingCheckpointWriter:
    """Write tensors (or row chunks of them) in the planned order straight into their shard files.

    ``write(name, chunk)`` appends ``chunk`` (rows of axis 0, or the whole tensor) to tensor
    ``name``, which must be the planned tensor in progress or the next one; dtype and trailing
    shape are checked. ``close()`` checks that every planned byte was written and writes the index.
    """

    def __init__(self, directory: Path, layout: Iterable[Planned], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 basename: str = "model", metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(layout), max_shard_bytes)
        n = len(self.shards)
        self.names = [f"{basename}.safetensors" if n == 1 else f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors"
                      for i in range(n)]
        self.basename = basename
        self._order = [(s, item) for s, shard in enumerate(self.shards) for item in shard]
        self._pos = -1          # index into _order of the tensor in progress
        self._written = 0       # bytes of it written so far
        self._shard = -1
        self._fh: Any = None

    def _open_shard(self, s: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for item in self.shards[s]:
            header[item.name] = {"dtype": ST_DTYPES[item.dtype], "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._fh = open(self.directory / self.names[s], "wb")  # noqa: SIM115 (closed by the next shard / close)
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._shard = s

    def _advance(self, name: str) -> Planned:
        if self._pos >= 0:
            _, item = self._order[self._pos]
            if item.name == name and self._written < item.nbytes:
                return item
            if self._written != item.nbytes:
                raise RuntimeError(f"tensor '{item.name}': {self._written} of {item.nbytes} bytes written")
        nxt = self._pos + 1
        if nxt >= len(self._order) or self._order[nxt][1].name != name:
            want = self._order[nxt][1].name if nxt < len(self._order) else "nothing"
            raise RuntimeError(f"tensor '{name}' written out of the planned order (expected {want})")
        self._pos = nxt
        s, item = self._order[nxt]
        if s != self._shard:
            self._open_shard(s)
        self._written = 0
        return item

    def write(self, name: str, chunk: torch.Tensor) -> None:
        item = self._advance(name)
        if chunk.dtype != item.dtype or (item.shape and tuple(chunk.shape[1:]) != item.shape[1:]):
            raise RuntimeError(f"tensor '{name}': got {chunk.dtype} {list(chunk.shape)}, planned {item.dtype} "
                               f"{list(item.shape)}")
        data = chunk.detach().cpu().contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if self._written + nbytes > item.nbytes:
            raise RuntimeError(f"tensor '{name}': more bytes than its planned shape {list(item.shape)}")
        if nbytes:
            self._write_bytes(memoryview(data.view(torch.uint8).numpy()))
        self._written += nbytes
        if item.nbytes == 0:
            self._written = 0  # an empty tensor is complete at once

    add = write

    def _write_bytes(self, view: memoryview) -> None:
        try:
            self._fh.write(view)
        except Exception as exc:
            err = as_os_error(exc)
            if err is None:
                raise
            raise err from exc

    def close(self) -> list[Path]:
        """Check completeness, close the last shard, write the index when sharded."""
        if self._pos >= 0:
            _, item = self._order[self._pos]
            if self._written != item.nbytes and item.nbytes:
                raise RuntimeError(f"tensor '{item.name}': {self._written} of {item.nbytes} bytes written")
        if self._pos != len(self._order) - 1:
            raise RuntimeError(f"{len(self._order) - 1 - self._pos} planned tensor(s) never written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.shards) > 1:
            total = sum(item.nbytes for shard in self.shards for item in shard)
            weight_map = {item.name: self.names[s] for s, shard in enumerate(self.shards) for item in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.directory / n for n in self.names]
