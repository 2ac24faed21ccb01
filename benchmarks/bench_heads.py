"""Head matching under noise: B = π0(A) + noise with the noise std equal to each tensor's std.

Tiny Llamas (random weights, random norm weights) with standard multi-head attention and with
GQA. Per setting and head step: the fraction of KV heads put where π0 put them, and the cosine
over all permuted weights of π(A) to B for the found π and for the planted π0⁻¹ (the optimum
can only be closer than the planted one). Head steps: ``spectra`` (the current π and the
singular-value-spectra proposal only: the step before issue 11) and ``direct`` (plus the pair
scores of the weight-matching objective, the default), each with ``--symmetries perm`` and
``full``.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = {  # name -> (hidden size, query heads, KV heads)
    "mha-8x8": (64, 8, 8),
    "mha-4x8": (32, 4, 4),
    "gqa-8/2x8": (64, 8, 2),
}
STEPS = {"spectra": ("current", "spectral"), "direct": ("current", "spectral", "direct")}


def _pair(hidden: int, heads: int, kv: int, seed: int, noise: float):
    import transformers as T

    from rebasin.permutation import apply_to_state, invert, random_perms
    from rebasin.specs import resolve_spec

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                        intermediate_size=48, vocab_size=61, max_position_embeddings=64)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    sd = dict(model.state_dict())
    spec = resolve_spec(model.config.to_dict(), {k: tuple(v.shape) for k, v in sd.items()})
    p0 = random_perms(spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    moved = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
             for k, v in apply_to_state(spec, p0, sd).items()}
    return model.config.to_dict(), spec, sd, moved, invert(spec, p0)


def _cosine(spec, perms, a, b) -> float:
    from rebasin.permutation import apply_to_state

    pa = apply_to_state(spec, perms, a)
    names = spec.permuted_tensors()
    dot = sum(float((pa[n].double() * b[n].double()).sum()) for n in names)
    na = sum(float(pa[n].double().pow(2).sum()) for n in names)
    nb = sum(float(b[n].double().pow(2).sum()) for n in names)
    return dot / math.sqrt(na * nb)


def run(quick: bool = False, device: str = "cpu", seeds: int | None = None) -> list[dict]:
    from rebasin.matching import attention, match

    n_seeds = seeds or (2 if quick else 5)
    records = []
    for setting, (hidden, heads, kv) in SETTINGS.items():
        for step, proposals in STEPS.items():
            for symmetries in ("perm", "full"):
                attention.PROPOSALS = proposals
                rec = tot = worse = 0
                found = planted = 0.0
                try:
                    for seed in range(n_seeds):
                        cfg, spec, sd, moved, inv = _pair(hidden, heads, kv, seed, 1.0)
                        r = match(moved, sd, config=cfg, progress=False, device=device, symmetries=symmetries)
                        for k in (k for k in inv if k.endswith(".heads")):
                            rec += int((inv[k] == r.perms[k]).sum())
                            tot += inv[k].numel()
                        f, p = _cosine(spec, r.perms, moved, sd), _cosine(spec, inv, moved, sd)
                        found, planted, worse = found + f, planted + p, worse + (f < p - 1e-9)
                finally:
                    attention.PROPOSALS = STEPS["direct"]
                records.append({"setting": setting, "head_step": step, "symmetries": symmetries, "seeds": n_seeds,
                                "heads_recovered": rec / tot, "cos_found": found / n_seeds,
                                "cos_planted": planted / n_seeds, "found_below_planted": worse})
                print(records[-1], file=sys.stderr, flush=True)
    return records


def write_report(records: list[dict], info: dict, json_path: Path) -> Path:
    lines = ["# Head matching at noise = signal (B = π0(A) + noise, noise std = each tensor's std)", "",
             f"device: {info.get('device', '')}", "",
             "| setting | head step | symmetries | heads recovered | cos found | cos planted | seeds below planted |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['setting']} | {r['head_step']} | {r['symmetries']} | {r['heads_recovered']:.0%} | "
                     f"{r['cos_found']:.4f} | {r['cos_planted']:.4f} | {r['found_below_planted']}/{r['seeds']} |")
    md = json_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md
