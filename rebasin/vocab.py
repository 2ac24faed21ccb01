"""Vocabulary alignment between two bases: which rows of A correspond to which rows of B.

Tokens are matched by their string through the tokenizer files when both models have them
(``tokenizer.json``, ``vocab.json`` or ``vocab.txt``); otherwise by index, with a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rebasin.io.jsonfile import read_json


@dataclass
class VocabMap:
    """Rows ``b_rows[i]`` of B correspond to rows ``a_rows[i]`` of A."""

    b_rows: torch.Tensor  # (k,) int64
    a_rows: torch.Tensor  # (k,) int64
    size_a: int
    size_b: int
    by: str  # "token" or "index"

    @property
    def shared(self) -> int:
        return int(self.b_rows.numel())

    def summary(self) -> dict[str, object]:
        return {"vocab_a": self.size_a, "vocab_b": self.size_b, "shared_rows": self.shared,
                "b_rows_kept_from_b": self.size_b - self.shared, "mapped_by": self.by}


def read_vocab(directory: Path | None) -> dict[str, int] | None:
    """token -> id from a model directory's tokenizer files, or None."""
    if directory is None:
        return None
    tj = directory / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj, what="tokenizer")
        model = data.get("model", {})
        vocab = model.get("vocab")
        out: dict[str, int] = {}
        if isinstance(vocab, dict):
            out = {str(k): int(v) for k, v in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            out = {str(p[0]): i for i, p in enumerate(vocab)}
        for tok in data.get("added_tokens", []):
            out[str(tok["content"])] = int(tok["id"])
        if out:
            return out
    vj = directory / "vocab.json"
    if vj.is_file():
        return {str(k): int(v) for k, v in read_json(vj, what="tokenizer vocabulary").items()}
    vt = directory / "vocab.txt"
    if vt.is_file():
        return {line.rstrip("\n"): i for i, line in enumerate(vt.read_text(encoding="utf-8").splitlines())}
    return None


def vocab_map(dir_a: Path | None, dir_b: Path | None, size_a: int, size_b: int) -> VocabMap:
    va, vb = read_vocab(dir_a), read_vocab(dir_b)
    if va is not None and vb is not None:
        pairs = sorted((ib, va[tok]) for tok, ib in vb.items() if tok in va and ib < size_b and va[tok] < size_a)
        b_rows = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        a_rows = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return VocabMap(b_rows, a_rows, size_a, size_b, "token")
    warnings.warn(f"vocabularies differ ({size_a} vs {size_b} rows) and tokenizer files are missing: "
                  "mapping rows by index", stacklevel=2)
    k = min(size_a, size_b)
    return VocabMap(torch.arange(k), torch.arange(k), size_a, size_b, "index")
