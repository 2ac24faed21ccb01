"""End to end: ``rebasin match`` on planted synthetic checkpoints, time per phase.

A checkpoint of a real architecture's shapes (built on the meta device, so nothing big is
initialised) is filled with random weights; the target is π0(source) plus 1% noise. We
record load / cost-build / solve / objective / report seconds, whether π0⁻¹ was recovered
exactly, and the objective before and after.

Shapes: ViT-B/16, BERT-base, and Llama-3-8B (32 layers on a GPU; on CPU a reduced-layer,
reduced-vocabulary version that fits 24 GiB).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rebasin.matching import match
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, invert, random_perms

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def configs(device: str, quick: bool) -> dict[str, tuple[str, dict]]:
    import transformers as T

    gpu = device.startswith("cuda")
    vit = T.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=224, patch_size=16, num_labels=1000)
    bert = T.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    llama_layers = 32 if gpu else 2
    llama = T.LlamaConfig(hidden_size=4096, num_hidden_layers=llama_layers, num_attention_heads=32,
                          num_key_value_heads=8, intermediate_size=14336,
                          vocab_size=128256 if gpu else 32000, rope_theta=500000.0)
    if quick:
        vit.num_hidden_layers = bert.num_hidden_layers = 2
        llama = T.LlamaConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                              intermediate_size=1792, vocab_size=4000)
    return {"vit-b16": ("ViTForImageClassification", vit), "bert-base": ("BertForMaskedLM", bert),
            f"llama3-8b-shape-{llama.num_hidden_layers}L": ("LlamaForCausalLM", llama)}


def synthetic_pair(arch: str, config, root: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Write source (random) and target (π0(source) + 1% noise) model dirs; return π0."""
    import transformers as T

    with torch.device("meta"):
        model = getattr(T, arch)(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if "norm" in name.lower() and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.02 * torch.randn(shape, generator=g)
    src, tgt = root / "source", root / "target"
    for d in (src, tgt):
        d.mkdir()
        config.architectures = [arch]
        (d / "config.json").write_text(config.to_json_string())
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    spec = open_model(src).spec
    p0 = random_perms(spec, g)
    moved = apply_to_state(spec, p0, state)
    del state
    moved = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in moved.items()}
    save_file(moved, str(tgt / "model.safetensors"), metadata={"format": "pt"})
    return src, tgt, p0


def run(quick: bool, device: str) -> list[dict]:
    records = []
    for case, (arch, config) in configs(device, quick).items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            src, tgt, p0 = synthetic_pair(arch, config, Path(tmp))
            gen_s = time.perf_counter() - t0
            spec = open_model(src).spec
            t0 = time.perf_counter()
            # match target -> source: the result should be π0 itself... we match source onto target
            result = match(src, tgt, device=device, progress=False)
            total = time.perf_counter() - t0
        recovered = all(torch.equal(result.perms[k], p0[k]) for k in p0)
        inv_ok = all(torch.equal(invert(spec, result.perms)[k], invert(spec, p0)[k]) for k in p0)
        params = sum(int(torch.tensor(s).prod()) for s in spec.shapes.values())
        rec = {"case": case, "device": device, "params": params, "groups": len(spec.groups),
               "seconds_total": total, **{f"seconds_{k}": v for k, v in result.timings.items()},
               "sweeps": result.sweeps, "recovered_exactly": recovered and inv_ok,
               "objective_identity": result.objective_identity, "objective": result.objective,
               "generate_s": gen_s}
        records.append(rec)
        print(json.dumps(rec))
    return records
