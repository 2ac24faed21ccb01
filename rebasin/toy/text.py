"""A character-level text corpus built from the Python standard library's own source files.

Nothing is downloaded: the text ships with every Python installation. Two domains:

- **general** — prose: the docstrings of modules, classes and functions (``ast.get_docstring``);
- **sub** — Python code: the same files with docstrings and comment lines removed.

Files are read in sorted order (tests, IDLE and ``site-packages`` excluded) and never imported,
only parsed. Every tenth file is held out for evaluation in both domains. Characters are
ASCII codes (vocabulary 128; anything else becomes ``?``); code 0 (NUL, absent from the text)
is free for the encoder's ``[MASK]`` token. The same Python version gives the same corpus;
:attr:`TextCorpus.digest` identifies it (it enters every cache key).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 128
MASK_ID = 0
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__",
               "ensurepip", "venv"}
_DOC_SEP = "\n\n"


@dataclass(frozen=True)
class TextCorpus:
    """Token streams (1-D ``int64`` tensors of ASCII codes) of both domains, split by file."""

    general_train: torch.Tensor
    general_test: torch.Tensor
    sub_train: torch.Tensor
    sub_test: torch.Tensor
    files: int
    digest: str

    def stream(self, task: str, split: str) -> torch.Tensor:
        """The token stream of ``task`` ("general" or "sub") and ``split`` ("train" or "test")."""
        return getattr(self, f"{task}_{split}")


def encode(text: str) -> torch.Tensor:
    """ASCII codes of ``text`` as an ``int64`` tensor of shape ``(len(text),)``; non-ASCII becomes ``?``."""
    data = text.encode("ascii", "replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """Inverse of :func:`encode` for a 1-D tensor of codes < 128."""
    return bytes(int(i) for i in ids.tolist()).decode("ascii")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_PARTS.intersection(p.relative_to(root).parts) and "test" not in p.name)


def _split_file(source: str) -> tuple[str, str]:
    """(docstrings, code) of one source file: prose joined by blank lines; code without docstrings/comments."""
    tree = ast.parse(source)
    docs: list[str] = []
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body and isinstance(node.body[0], ast.Expr):
                docs.append(doc.strip())
                expr = node.body[0]
                drop.update(range(expr.lineno, (expr.end_lineno or expr.lineno) + 1))
    lines = [ln.rstrip() for i, ln in enumerate(source.splitlines(), 1)
             if i not in drop and not ln.lstrip().startswith("#")]
    code = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return _DOC_SEP.join(docs), code


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_chars: int = 1_200_000, holdout_every: int = 10) -> TextCorpus:
    """Build the corpus: up to ``max_chars`` training characters per domain, every ``holdout_every``-th file held out.

    Deterministic for a given Python installation; a few seconds (files are parsed, not imported).
    """
    parts: dict[str, list[str]] = {"general_train": [], "general_test": [], "sub_train": [], "sub_test": []}
    sizes = dict.fromkeys(parts, 0)
    files = 0
    for i, path in enumerate(_stdlib_files()):
        split = "test" if i % holdout_every == 0 else "train"
        if split == "train" and min(sizes["general_train"], sizes["sub_train"]) >= max_chars:
            continue
        if split == "test" and min(sizes["general_test"], sizes["sub_test"]) >= max_chars // holdout_every:
            continue
        try:
            docs, code = _split_file(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        files += 1
        for task, text in (("general", docs), ("sub", code)):
            key = f"{task}_{split}"
            if text and sizes[key] < (max_chars if split == "train" else max_chars // holdout_every):
                parts[key].append(text)
                sizes[key] += len(text) + len(_DOC_SEP)
    streams = {k: encode(_DOC_SEP.join(v)) for k, v in parts.items()}
    h = hashlib.sha256()
    for k in sorted(streams):
        h.update(k.encode())
        h.update(streams[k].to(torch.uint8).numpy().tobytes())
    return TextCorpus(**streams, files=files, digest=h.hexdigest()[:16])


def random_windows(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``seq`` tokens at random offsets: ``(batch, seq)`` int64."""
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq)]


def eval_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` fixed windows of ``seq`` tokens spread evenly over ``stream``: ``(n, seq)`` int64."""
    starts = torch.linspace(0, len(stream) - seq - 1, n).long()
    return stream[starts[:, None] + torch.arange(seq)]


def mask_tokens(ids: torch.Tensor, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of ``ids`` ``(batch, seq)``: ``(input_ids, labels)``, labels −100 where not masked.

    A ``rate`` fraction of positions is chosen (at least one per row); of those 80% become
    :data:`MASK_ID`, 10% a random code in 32..126 and 10% stay.
    """
    pick = torch.rand(ids.shape, generator=generator) < rate
    pick[torch.arange(ids.shape[0]), torch.randint(0, ids.shape[1], (ids.shape[0],), generator=generator)] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(pick & (roll < 0.8), torch.full_like(ids, MASK_ID), ids)
    rand = torch.randint(32, 127, ids.shape, generator=generator)
    inputs = torch.where(pick & (roll >= 0.8) & (roll < 0.9), rand, inputs)
    return inputs, labels
