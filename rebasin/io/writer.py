"""Atomic, sharded writing of Hugging Face checkpoint directories.

Everything is written into a hidden temporary directory beside the destination and
renamed into place only when complete, so an interrupted or failed run (disk full,
Ctrl-C, bad input found half way) never leaves a half-written model at the destination.
A failed write (an OSError, or safetensors' I/O error) becomes a :class:`WriteError`
(exit 8) naming the destination.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
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
# Weight formats: never copied from an input directory (they hold the input's weights, not the output's).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx", ".onnx_data",
                   ".ot", ".gguf", ".tflite", ".mlmodel", ".npz", ".npy")
WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "tf_model.h5.index.json",
                "flax_model.msgpack.index.json")
DEFAULT_SHARD_BYTES = 2 * 2**30


def write_error(exc: BaseException, path: Path) -> WriteError:
    """The WriteError (exit 8) for a failed write at ``path``: one line with the OS's reason."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = getattr(exc, "filename", None)
    if where and Path(where) != Path(path):
        reason += f" ({where})"
    return WriteError(f"cannot write the output: {reason}; nothing was written", file=path)


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError when it is a failed write: an OSError, or safetensors' SafetensorError
    wrapping one (``I/O error: No space left on device (os error 28)``); None otherwise."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        m = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
        code = int(m.group(2)) if m else errno.EIO
        return OSError(code, m.group(1) if m else str(exc))
    return None


def check_writable(out: Path) -> None:
    """WriteError (exit 8) now, before any work, when ``out`` cannot be created: an ancestor is a
    file, or the nearest existing directory is not writable. Creates nothing."""
    out = Path(out).absolute()
    parent = out.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise WriteError(f"cannot write the output: {parent} is a file, not a directory; nothing was written",
                         file=out)
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise WriteError(f"cannot write the output: no permission to write in {parent}; nothing was written",
                         file=out)


def ensure_output_free(out: Path, overwrite: bool) -> None:
    """Raise OutputExistsError when ``out`` exists and ``overwrite`` is False, and WriteError
    when it cannot be created (see :func:`check_writable`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError("output already exists; choose another path or pass --overwrite", file=out)
    check_writable(out)


def _staging(out: Path, tag: str) -> Path:
    """Hidden sibling of ``out`` used while writing (``tmp``) or replacing (``old``) it."""
    return out.parent / f".{out.name}.rebasin-{tag}-{os.getpid()}"


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, path) from exc


def atomic_output_file(path: str | Path, write: Callable[[Path], object], *, overwrite: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure nothing is left behind.

    Raises OutputExistsError up front when ``path`` exists and ``overwrite`` is False, and
    WriteError (naming ``path``) when the write fails with an OSError.
    """
    atomic_output_files([(Path(path), write, overwrite)])


def save_safetensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode every other output gets (0666 less the
    umask; save_file itself creates 0600 files)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_output_files(files: Iterable[tuple[Path, Callable[[Path], object], bool]]) -> None:
    """Write several files all or nothing: each ``write(tmp_path)`` into a hidden sibling, then
    all renamed into place. ``files``: (path, write, overwrite). A failure removes every
    temporary file and every file this call had already put in place that did not exist before.
    """
    files = [(Path(p), w, o) for p, w, o in files]
    for path, _, overwrite in files:
        ensure_output_free(path, overwrite)
    temps: list[tuple[Path, Path, bool]] = []
    placed: list[Path] = []
    try:
        for path, write, _ in files:
            _make_parent(path)
            tmp = _staging(path, "tmp")
            temps.append((tmp, path, path.exists()))
            write(tmp)
        for tmp, path, existed in temps:
            os.replace(tmp, path)
            if not existed:
                placed.append(path)
    except BaseException as exc:
        for tmp, _, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for path in placed:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        err = as_os_error(exc)
        if err is not None:
            raise write_error(err, temps[-1][1] if temps else files[0][0]) from exc
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    Raises OutputExistsError up front when ``out`` exists and ``overwrite`` is False, and
    WriteError (exit 8, naming ``out``) when creating, filling or renaming it fails with an
    OSError. On any exception the temporary directory is removed and ``out`` is left untouched.
    """
    out = Path(out)
    ensure_output_free(out, overwrite)
    _make_parent(out)
    tmp = _staging(out, "tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise write_error(exc, out) from exc
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
        err = as_os_error(exc)
        if err is not None:
            raise write_error(err, out) from exc
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
        try:
            save_safetensors(self._pending, path, metadata=self.metadata)
        except Exception as exc:
            err = as_os_error(exc)
            if err is None:
                raise
            raise err from exc
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
    """Copy the named config/tokenizer/generation files that exist in ``src`` into ``dst``."""
    copied = []
    if src is None or not Path(src).is_dir():
        return copied
    for name in names:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, dst / name)
            copied.append(name)
    return copied


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_NAMES


def copy_model_files(src: Path | None, dst: Path, *, produced: Iterable[str] = ()) -> list[str]:
    """Copy every non-weight file of the model directory ``src`` (its whole tree) into ``dst``.

    Besides config, tokenizer and generation files this keeps what other libraries read next to
    the weights: sentence-transformers' ``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json``, ``config_sentence_transformers.json``, a model card, ... Left
    out: weight files (any format: they are the input's weights), hidden entries (``.git``,
    ``.cache``), a subdirectory holding weight files (``onnx/``, ``openvino/``: exports of the
    input's weights), and the names in ``produced`` (what the writer itself puts there).
    Returns the copied paths relative to ``src``, sorted (an empty folder as ``name/``).
    """
    if src is None or not Path(src).is_dir():
        return []
    src = Path(src)
    produced = set(produced)
    copied: list[str] = []
    for root, dirs, files in os.walk(src, followlinks=True):  # a hub snapshot links its files and folders
        rel_root = Path(root).relative_to(src)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _holds_weights(Path(root) / d))
        for d in dirs:  # kept even when empty: modules.json may name a folder with no files (2_Normalize)
            (dst / rel_root / d).mkdir(parents=True, exist_ok=True)
            if not any((Path(root) / d).iterdir()):
                copied.append((rel_root / d).as_posix() + "/")
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if name.startswith(".") or is_weight_file(name) or rel in produced:
                continue
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, target)
            copied.append(rel)
    return sorted(copied)


def _holds_weights(directory: Path) -> bool:
    return any(is_weight_file(f) for _, _, files in os.walk(directory, followlinks=True) for f in files)
