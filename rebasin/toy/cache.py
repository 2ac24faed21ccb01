"""A cache of toy models as Hugging Face model directories (safetensors), keyed by their recipe.

A model's key is a hash of :data:`VERSION`, every hyperparameter it depends on (the recipe's
shared ones, see :meth:`Recipe.shared_params`, and its own stage's steps, learning rate and
seeds), the data's digest and, recursively, its parent's key: a changed hyperparameter never
reuses a stale model, and changing a fine-tune's learning rate does not retrain the bases.
Directories are written atomically (``rebasin.io.writer.atomic_output_dir``); when two processes
build the same model, the first one to finish wins and the other's work is dropped. The root is
``--cache``, else ``$REBASIN_CACHE/toy``, else ``~/.cache/rebasin/toy``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rebasin.errors import OutputExistsError, WriteError
from rebasin.io.writer import atomic_output_dir

VERSION = "rebasin-toy-1"
META_FILE = "toy.json"


def cache_root(cache: str | Path | None = None) -> Path:
    """The toy-model folder: ``cache`` if given, else ``$REBASIN_CACHE/toy``, else ``~/.cache/rebasin/toy``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("REBASIN_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "rebasin") / "toy"


def key(payload: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``payload`` (JSON, sorted keys) plus :data:`VERSION`."""
    blob = json.dumps({"version": VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_complete(path: Path) -> bool:
    """A finished model directory: config, weights and our metadata file."""
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", META_FILE))


class _Lost(Exception):
    """Another writer finished the same directory first."""


def cached_dir(dest: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> bool:
    """Make ``dest`` with ``write(tmp)`` unless it is already complete; True when this call built it.

    ``write`` fills a temporary directory; :data:`META_FILE` (``meta``) is added last and the
    directory is renamed to ``dest`` only when everything succeeded.
    """
    if is_complete(dest):
        return False
    try:
        with atomic_output_dir(dest) as tmp:
            write(tmp)
            (tmp / META_FILE).write_text(json.dumps({"version": VERSION, **meta}, indent=2, default=str) + "\n")
            if dest.exists():
                raise _Lost
    except (_Lost, OutputExistsError, WriteError):
        if is_complete(dest):
            return False
        raise
    return True


def save_model(model: Any) -> Callable[[Path], None]:
    """A ``write`` for :func:`cached_dir` that saves a ``transformers`` model as safetensors."""
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return write


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata a cached model was written with."""
    return json.loads((path / META_FILE).read_text())
