"""Python API for backend users: match checkpoints, state dicts or ``nn.Module``s.

    >>> from rebasin import match
    >>> result = match("old-base/", "new-base/")          # directories, files, modules or state dicts
    >>> result.perms["residual"]                           # int64 (d_model,)
    >>> result.objective_identity, result.objective        # J before and after
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebasin.compat import check_same_architecture
from rebasin.errors import IncompatibleInputsError
from rebasin.io.checkpoint import ensure_finite
from rebasin.matching.engine import MatchResult, Timer, match_states
from rebasin.model import Model, open_model
from rebasin.specs import Spec, resolve_spec
from rebasin.vocab import VocabMap

Source = str | Path | Model | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class Loaded:
    """A model reduced to what matching needs: spec, a tensor getter, and a label."""

    spec: Spec
    get: Any  # Callable[[str], torch.Tensor]
    label: str
    config: dict[str, Any]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(source: Source, *, family: str | None = None, config: dict[str, Any] | None = None) -> Loaded:
    """Normalise any supported input; state dicts need ``config`` (a config.json dict)."""
    if isinstance(source, (str, Path)):
        source = open_model(source, family=family)
    if isinstance(source, Model):
        ck = source.checkpoint
        return Loaded(source.spec, lambda n: ck.get(n, check_finite=True), str(ck.path), ck.config)
    if isinstance(source, torch.nn.Module):
        cfg = config or source.config.to_dict()
        state = source.state_dict()
        label = type(source).__name__
    else:
        if config is None:
            raise IncompatibleInputsError("a state dict needs config= (the model's config.json as a dict)")
        cfg, state, label = config, dict(source), "state_dict"
    spec = resolve_spec(cfg, {k: tuple(v.shape) for k, v in state.items()}, family=family, where=label)
    return Loaded(spec, lambda n: ensure_finite(state[n].detach(), label, n), label, cfg)


def check_compatible(sa: Spec, sb: Spec, la: str, lb: str, vocab: VocabMap | None = None) -> list[str]:
    """Same family and group sizes; returns the tensors to match on (same shape in both, or
    differing only in vocabulary rows when ``vocab`` maps them)."""
    check_same_architecture(sa, sb, la, lb)
    names = []
    for name in sa.permuted_tensors():
        if name not in sb.axes:
            continue
        if sa.shapes[name] != sb.shapes[name]:
            if vocab is not None and _vocab_rows_only(sa, sb, name, vocab):
                names.append(name)
                continue
            warnings.warn(f"{name}: shapes differ ({list(sa.shapes[name])} vs {list(sb.shapes[name])}) "
                          "along invariant axes (vocabulary?); not used for matching", stacklevel=3)
            continue
        names.append(name)
    return names


def _vocab_rows_only(sa: Spec, sb: Spec, name: str, vocab: VocabMap) -> bool:
    a, b = sa.shapes[name], sb.shapes[name]
    return (len(a) == len(b) and a[1:] == b[1:] and sa.axes[name][0] is None
            and (a[0], b[0]) == (vocab.size_a, vocab.size_b))


def _compute_dtype(loaded: Loaded, names: list[str], device: torch.device) -> torch.dtype:
    """float32 on CPU (CPU half-precision matmuls are slow); on CUDA keep 16-bit checkpoints 16-bit
    (the cost kernels accumulate in float32) so that 8B-parameter pairs fit on one GPU."""
    if device.type != "cuda" or not names:
        return torch.float32
    probe = loaded.get(names[0])
    return probe.dtype if probe.dtype in (torch.bfloat16, torch.float16) else torch.float32


def match(source: Source, target: Source, *, family: str | None = None, config: dict[str, Any] | None = None,
          solver: str = "auto", max_sweeps: int = 20, seed: int = 0, device: str | torch.device | None = "auto",
          dtype: torch.dtype | None = None, progress: bool = False, vocab: VocabMap | None = None) -> MatchResult:
    """Find π with ``apply(source, π) ≈ target`` (weight matching, DESIGN §3).

    Args:
        source, target: model directories / ``.safetensors`` files, :class:`Model`s,
            ``transformers`` modules, or state dicts (then pass ``config``).
        solver: assignment solver (``auto`` picks the fastest exact one).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: compute dtype of the weights (default float32; costs always accumulate in float32).
        vocab: when the vocabularies differ, the shared rows of vocabulary-sized tensors to use.
    Returns:
        MatchResult with ``perms`` (name -> int64 tensor, see :mod:`rebasin.permutation`).
    """
    dev = resolve_device(device)
    timer = Timer(dev)
    with timer("load"):
        la, lb = load(source, family=family, config=config), load(target, family=family, config=config)
        names = check_compatible(la.spec, lb.spec, la.label, lb.label, vocab)
        cdtype = dtype or _compute_dtype(la, names, dev)
        a, b = {}, {}
        for n in names:
            ta, tb = la.get(n), lb.get(n)
            if ta.shape != tb.shape and vocab is not None:
                ta, tb = ta.index_select(0, vocab.a_rows), tb.index_select(0, vocab.b_rows)
            a[n], b[n] = ta.to(dev, cdtype), tb.to(dev, cdtype)
        spec = Spec(la.spec.family, la.spec.groups, {n: la.spec.axes[n] for n in names},
                    {n: tuple(a[n].shape) for n in names}, la.spec.sizes)
    return match_states(spec, a, b, solver=solver, max_sweeps=max_sweeps, seed=seed, progress=progress, timer=timer)
