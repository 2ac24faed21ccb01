"""Prove on random inputs that π(A) computes what A computes (``--verify``)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rebasin.hf import load_hf_model, module_spec, primary_output
from rebasin.permutation import apply_to_state
from rebasin.specs import Spec


def _inputs(config: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
    mt = config.get("model_type")
    if mt == "vit":
        size, ch = config.get("image_size", 224), config.get("num_channels", 3)
        return {"pixel_values": torch.randn(2, ch, size, size, generator=gen)}
    if mt == "clip":
        v, t = config["vision_config"], config["text_config"]
        size = v["image_size"]
        return {"pixel_values": torch.randn(2, v.get("num_channels", 3), size, size, generator=gen),
                "input_ids": torch.randint(0, t["vocab_size"], (2, 7), generator=gen)}
    return {"input_ids": torch.randint(0, config["vocab_size"], (2, 11), generator=gen)}


def verify_symmetry(model_dir: Path, spec: Spec, perms: Mapping[str, torch.Tensor], *, seed: int = 0) -> float:
    """Max abs difference between A's and π(A)'s outputs (a headless model's output, in its
    residual stream's basis, un-permuted first)."""
    model = load_hf_model(model_dir, what="--verify")
    mspec = module_spec(model, spec.family, where=model_dir)
    permuted = type(model)(model.config).eval()
    permuted.load_state_dict(apply_to_state(mspec, perms, model.state_dict()))
    if getattr(model.config, "tie_word_embeddings", False):
        permuted.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    inputs = _inputs(model.config.to_dict(), gen)
    with torch.no_grad():
        ya, yb = model(**inputs), permuted(**inputs)
    out_a, out_b = primary_output(ya), primary_output(yb)
    if not hasattr(ya, "logits"):
        # a headless model's output is in its residual stream's basis: un-permute it to compare
        # (π of a transfer may move it, see docs/design.md, Headless models)
        stream = next((g for g in mspec.groups.values()
                       if g.output and g.name in perms and out_b.shape[-1] == g.size), None)
        if stream is not None:
            out_b = out_b[..., torch.argsort(perms[stream.name].to(out_b.device))]
    return float((out_a.float() - out_b.float()).abs().max())
