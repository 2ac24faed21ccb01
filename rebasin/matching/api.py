"""Python API for backend users: match checkpoints, state dicts or ``nn.Module``s.

    >>> from rebasin import match
    >>> result = match("old-base/", "new-base/")          # directories, files, modules or state dicts
    >>> result.perms["residual"]                           # int64 (d_model,)
    >>> result.objective_identity, result.objective        # J before and after
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rebasin import distributed
from rebasin.compat import check_same_architecture
from rebasin.errors import IncompatibleInputsError, RebasinError
from rebasin.estimate import choose_mode, estimate_match
from rebasin.matching.engine import MatchResult, Timer, match_store
from rebasin.matching.store import PairStore, Side
from rebasin.model import Model, open_model
from rebasin.specs import Spec, resolve_spec
from rebasin.streaming import return_freed_memory
from rebasin.symmetry import SYMMETRIES
from rebasin.vocab import VocabMap

Source = str | Path | Model | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class Loaded:
    """A model reduced to what matching needs: spec, a tensor getter, and a label.

    ``get`` reads one tensor as stored (from the file for a checkpoint: nothing is kept);
    ``where`` names the file holding a tensor (for errors); ``model`` is the checkpoint, if any.
    """

    spec: Spec
    get: Any  # Callable[[str], torch.Tensor]
    label: str
    config: dict[str, Any]
    where: Any = None  # Callable[[str], object]
    model: Model | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(source: Source, *, family: str | None = None, config: dict[str, Any] | None = None) -> Loaded:
    """Normalise any supported input; state dicts need ``config`` (a config.json dict).

    Nothing is read here: tensors are read when the matcher asks for them, and checked for
    NaN/Inf in that same read (:func:`rebasin.matching.store.tensor_stats`).
    """
    if isinstance(source, (str, Path)):
        source = open_model(source, family=family)
    if isinstance(source, Model):
        ck = source.checkpoint
        return Loaded(source.spec, ck.get, str(ck.path), ck.config, ck.where, source)
    if isinstance(source, torch.nn.Module):
        cfg = config or source.config.to_dict()
        state = source.state_dict()
        label = type(source).__name__
    else:
        if config is None:
            raise IncompatibleInputsError("a state dict needs config= (the model's config.json as a dict)")
        cfg, state, label = config, dict(source), "state_dict"
    spec = resolve_spec(cfg, {k: tuple(v.shape) for k, v in state.items()}, family=family, where=label)
    return Loaded(spec, lambda n: state[n].detach(), label, cfg, lambda _n: label)


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


def match(source: Source, target: Source, *, family: str | None = None, config: dict[str, Any] | None = None,
          solver: str = "auto", max_sweeps: int = 20, seed: int = 0, device: str | torch.device | None = "auto",
          dtype: torch.dtype | None = None, progress: bool = False, vocab: VocabMap | None = None,
          memory: float | None = None, cache: bool | None = None, symmetries: str = "full") -> MatchResult:
    """Find π with ``apply(source, π) ≈ target`` (weight matching: docs/design.md, "Matching").

    Args:
        source, target: model directories / ``.safetensors`` files, :class:`Model`s,
            ``transformers`` modules, or state dicts (then pass ``config``).
        solver: assignment solver (``auto`` picks the fastest exact one).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: dtype the weights are held in (default: as stored; costs always accumulate in float32).
        vocab: when the vocabularies differ, the shared rows of vocabulary-sized tensors to use.
        memory: budget in GiB for checkpoints read from disk (default: what the machine has free,
            minus a margin). Both models' permuted tensors are kept after their first read when
            the predicted peak with that cache fits, else read per step (streaming); a predicted
            streaming peak above the budget is refused before any work (RefusedError, exit 7).
        cache: force caching (True) or streaming (False) instead of letting the budget decide.
        symmetries: ``full`` (default: permutations plus the exact within-head orthogonal maps —
            V/O per KV head, RoPE frequency-pair rotations or non-RoPE Q/K maps) or ``perm``.
    Returns:
        MatchResult with ``perms`` (name -> int64 tensor, see :mod:`rebasin.permutation`).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank calls this with the same arguments; ranks
    own layers' groups and all of them return the same result (:mod:`rebasin.distributed`).
    """
    if symmetries not in SYMMETRIES:
        raise RebasinError(f"unknown symmetries '{symmetries}' (choose from {', '.join(SYMMETRIES)})")
    dist, dev = distributed.context(resolve_device(device))
    timer = Timer(dev)
    with timer("load"):
        la, lb = load(source, family=family, config=config), load(target, family=family, config=config)
        names = check_compatible(la.spec, lb.spec, la.label, lb.label, vocab)
        shapes = {}
        for n in names:
            shape = tuple(la.spec.shapes[n])
            if shape != tuple(lb.spec.shapes[n]) and vocab is not None:
                shape = (len(vocab.a_rows), *shape[1:])
            shapes[n] = shape
        spec = replace(la.spec, axes={n: la.spec.axes[n] for n in names}, shapes=shapes)
        get_a, get_b = la.get, lb.get
        if vocab is not None:
            rows = {n for n in names if tuple(la.spec.shapes[n]) != tuple(lb.spec.shapes[n])}

            def get_a(n: str, _get=la.get) -> torch.Tensor:
                return _get(n).index_select(0, vocab.a_rows) if n in rows else _get(n)

            def get_b(n: str, _get=lb.get) -> torch.Tensor:
                return _get(n).index_select(0, vocab.b_rows) if n in rows else _get(n)
        if la.model is not None and lb.model is not None:
            return_freed_memory()
            est = estimate_match(spec, la.model, lb.model, dev, dist.world, dtype=dtype)
            mode = choose_mode(est, memory, cache)
        else:
            mode = "in-memory"
        store = PairStore(Side(get_a, la.where), Side(get_b, lb.where), dev, dtype, cache=mode == "cached")
    return match_store(spec, store, solver=solver, max_sweeps=max_sweeps, seed=seed, progress=progress,
                       timer=timer, dist=dist, memory_mode=mode, symmetries=symmetries)
