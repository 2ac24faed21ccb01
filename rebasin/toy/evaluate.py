"""Evaluation of toy models: both tasks, the fine-tune gain a transfer recovers, weight-space merges."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rebasin.toy.families import Recipe, load_model, toy_task


def evaluate(r: Recipe, model: Any) -> dict[str, float]:
    """``{"sub": m, "general": m}`` of a model (or a model directory) on the held-out sets.

    ``m`` is the mean loss per predicted character (nats; text families, lower is better) or
    the accuracy (ViT, higher is better). "sub" is the fine-tune's task, "general" the bases'.
    """
    if isinstance(model, str | Path):
        model = load_model(r, model)
    return toy_task(r).evaluate(model)


def gain_recovered(r: Recipe, base: float, result: float, upper: float) -> float | None:
    """The fraction of the fine-tune's gain a transfer recovers: ``(result − base) / (upper − base)``.

    1 = as good as fine-tuning B directly, 0 = no better than B, < 0 = worse than B. Signs
    follow the metric (for a loss, a drop is a gain). None when the gain itself is below
    1e-6 (nothing to recover).
    """
    del r  # the ratio is the same for a loss and an accuracy: both differences flip sign together
    gain = upper - base
    if abs(gain) < 1e-6:
        return None
    return (result - base) / gain


def state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, float32 for floating-point ones."""
    from rebasin.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    return {k: (t.float() if t.is_floating_point() else t) for k in ckpt.tensors if (t := ckpt.get(k)) is not None}


def merge(r: Recipe, a: Path, b: Path, perms: Mapping[str, torch.Tensor] | None = None, weight: float = 0.5) -> Any:
    """The model ``(1 − weight)·B + weight·π(A)`` (π = identity when ``perms`` is None), in memory, eval mode.

    With ``weight = ½``: the midpoint of B and A (aligned to B by π) — git-re-basin's test of an
    alignment: the midpoint of unaligned independent models breaks down, of aligned ones much less.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from rebasin.model import open_model
    from rebasin.permutation import apply_to_state

    sa, sb = state(a), state(b)
    if perms is not None:
        sa = apply_to_state(open_model(a).spec, perms, sa)
    mixed = {k: (torch.lerp(v, sa[k], weight) if v.is_floating_point() else v).contiguous() for k, v in sb.items()}
    # through a checkpoint file: transformers maps checkpoint names to module names on loading (ViT's differ)
    with tempfile.TemporaryDirectory(prefix="rebasin-merge-") as tmp:
        save_file(mixed, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(Path(b) / "config.json", Path(tmp) / "config.json")
        return load_model(r, tmp)


@torch.no_grad()
def outputs(r: Recipe, model: Any, n: int = 8) -> torch.Tensor:
    """The logits of a model (or directory) on the first ``n`` held-out general-task inputs, float32."""
    if isinstance(model, str | Path):
        model = load_model(r, model)
    data = toy_task(r).eval_sets["general"]
    inputs = {k: v[:n] for k, v in data.items() if k != "labels"}
    return model(**inputs).logits.float()
