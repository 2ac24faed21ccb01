"""Prove on random inputs that π(A) computes what A computes (``--verify``)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rebasin.errors import RebasinError
from rebasin.permutation import apply_to_state
from rebasin.specs import Spec, resolve_spec


def _inputs(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    mt = config.get("model_type")
    if mt == "vit":
        size, ch = config.get("image_size", 224), config.get("num_channels", 3)
        return {"pixel_values": torch.randn(2, ch, size, size, generator=gen)}
    if mt == "clip":
        v, t = config["vision_config"], config["text_config"]
        return {"pixel_values": torch.randn(2, v.get("num_channels", 3), v["image_size"], v["image_size"], generator=gen),
                "input_ids": torch.randint(0, t["vocab_size"], (2, 7), generator=gen)}
    return {"input_ids": torch.randint(0, config["vocab_size"], (2, 11), generator=gen)}


def verify_symmetry(model_dir: Path, spec: Spec, perms: Mapping[str, torch.Tensor], *, seed: int = 0) -> float:
    """Max abs difference between A's and π(A)'s outputs (residual-basis outputs un-permuted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise RebasinError("--verify needs transformers: pip install 'rebasin[hf]'") from exc
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    state = model.state_dict()
    # in-memory module names may differ from checkpoint names (transformers >= 5 renames some)
    mspec = resolve_spec(config.to_dict(), {k: tuple(v.shape) for k, v in state.items()}, family=spec.family,
                         where=model_dir)
    permuted = type(model)(model.config).eval()
    permuted.load_state_dict(apply_to_state(mspec, perms, state))
    if getattr(model.config, "tie_word_embeddings", False):
        permuted.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    inputs = _inputs(config.to_dict(), gen)
    with torch.no_grad():
        ya, yb = model(**inputs), permuted(**inputs)
    out_a = ya[0] if not hasattr(ya, "logits") else ya.logits
    out_b = yb[0] if not hasattr(yb, "logits") else yb.logits
    if hasattr(ya, "logits_per_image"):
        out_a, out_b = ya.logits_per_image, yb.logits_per_image
    if not hasattr(ya, "logits") and "residual" in perms and out_b.shape[-1] == perms["residual"].numel():
        out_b = out_b[..., torch.argsort(perms["residual"])]
    return float((out_a.float() - out_b.float()).abs().max())
