"""Atomic, sharded writing of Hugging Face checkpoint directories.

Everything is written into a hidden temporary directory beside the destination and
renamed into place only when complete, so an interrupted or failed run (disk full,
Ctrl-C, bad input found half way) never leaves a half-written model at the destination.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from rebasin.errors import OutputExistsError, WriteError

AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
    "chat_template.json", "sentencepiece.bpe.model", "spiece.model",
)
DEFAULT_SHARD_BYTES = 2 * 2**30


def ensure_output_free(out: Path, overwrite: bool) -> None:
    """Raise OutputExistsError when ``out`` exists and ``overwrite`` is False."""
    if out.exists() and not overwrite:
        raise OutputExistsError("output already exists; choose another path or pass --overwrite", file=out)


def _staging(out: Path, tag: str) -> Path:
    """Hidden sibling of ``out`` used while writing (``tmp``) or replacing (``old``) it."""
    return out.parent / f".{out.name}.rebasin-{tag}-{os.getpid()}"


def atomic_output_file(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure nothing is left behind.

    Raises OutputExistsError up front when ``path`` exists and ``overwrite`` is False, and
    WriteError (naming ``path``) when the write fails with an OSError.
    """
    path = Path(path)
    ensure_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"writing failed, nothing was written: {exc}", file=path) from exc
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    Raises OutputExistsError up front when ``out`` exists and ``overwrite`` is False.
    On any exception the temporary directory is removed and ``out`` is left untouched.
    """
    out = Path(out)
    ensure_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = _staging(out, "old")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WriteError(f"writing failed, nothing was written: {exc}", file=out) from exc
        raise


class CheckpointWriter:
    """Stream tensors into HF-style shards inside a directory (usually an atomic temp dir).

    One shard ``model.safetensors`` when everything fits under ``max_shard_bytes``;
    otherwise ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``,
    exactly the layout ``transformers.PreTrainedModel.from_pretrained`` reads.
    Memory held: at most one shard's worth of tensors.
    """

    def __init__(self, directory: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 basename: str = "model", metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.basename = basename
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush the last shard, give shards their final names, write the index."""
        self._flush()
        n = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._shards):
            name = (f"{self.basename}.safetensors" if n == 1
                    else f"{self.basename}-{i + 1:05d}-of-{n:05d}.safetensors")
            target = self.directory / name
            tmp.rename(target)
            final.append(target)
            weight_map.update(dict.fromkeys(names, name))
        if n > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def copy_aux_files(src: Path | None, dst: Path, names: tuple[str, ...] = AUX_FILES) -> list[str]:
    """Copy config/tokenizer/generation files that exist in ``src`` into ``dst``."""
    copied = []
    if src is None or not Path(src).is_dir():
        return copied
    for name in names:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, dst / name)
            copied.append(name)
    return copied
