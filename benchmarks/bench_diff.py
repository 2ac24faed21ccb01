"""``transfer --mode diff`` beside mergekit's ``task_arithmetic`` on the same float32 inputs.

The pair: a Llama-shaped model of 215.5 M parameters (11 layers of d_model 1024, d_ff 3072,
16 heads, 32000-token vocabulary, untied), float32, one 0.86 GB safetensors file each: ``A``
(random init), ``A_ft = A + 5 %`` noise, ``B = A + 20 %`` noise (built once, cached under
``$REBASIN_SCALE_CACHE`` or ``~/.cache/rebasin/scale``; ``--quick``: 2 layers of 128).

Both tools write ``B + (A_ft − A)``:

- ours: ``rebasin transfer --mode diff --alpha 1 --no-verdict`` (no calibration, the same
  arithmetic as mergekit's), float32 arithmetic;
- mergekit: ``mergekit-yaml`` with ``merge_method: task_arithmetic``, ``base_model: A``, models
  ``A_ft`` and ``B`` at weight 1, ``dtype: float32`` — ``A + (A_ft − A) + (B − A)``.

Each run is a fresh process timed by ``/usr/bin/time`` (wall seconds, peak RSS); the two tools
alternate, ``REPEATS`` times, after one untimed warm-up each (page cache warm for both). The
outputs are compared with the float64 reference ``B + (A_ft − A)``: max |error| per tool.
mergekit is found as ``$MERGEKIT_YAML`` or ``mergekit-yaml`` on PATH (install it in its own
environment: it pins transformers and accelerate); without it only our rows are written.

Reproduce: ``python -m benchmarks diff`` (~5 min on 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPEATS = 3
SHAPES = {
    "llama-215m-fp32": {"hidden_size": 1024, "num_hidden_layers": 11, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "intermediate_size": 3072, "vocab_size": 32000},
    "llama-tiny-fp32": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "intermediate_size": 256, "vocab_size": 1000},
}


def build(name: str, cache: Path) -> dict[str, Path]:
    """A, A_ft, B as float32 model directories (cached)."""
    import transformers as T
    from safetensors.torch import save_file

    root = cache / name
    dirs = {d: root / d for d in ("A", "Aft", "B")}
    if (root / "done").is_file():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    cfg = T.LlamaConfig(**SHAPES[name], max_position_embeddings=2048, tie_word_embeddings=False,
                        architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg)
    a = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for d, scale in (("A", 0.0), ("Aft", 0.05), ("B", 0.2)):
        dirs[d].mkdir(parents=True)
        cfg.save_pretrained(dirs[d])
        state = {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if scale else v for k, v in a.items()}
        save_file(state, dirs[d] / "model.safetensors", metadata={"format": "pt"})
    (root / "done").write_text(name)
    return dirs


def _timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, *cmd], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        wall, kib = f.read().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_gib": int(kib) * 1024 / 2**30}


def _max_error(out: Path, dirs: dict[str, Path]) -> float:
    from safetensors import safe_open

    files = sorted(out.glob("*.safetensors"))
    worst = 0.0
    with safe_open(str(dirs["A"] / "model.safetensors"), "pt") as fa, \
            safe_open(str(dirs["Aft"] / "model.safetensors"), "pt") as ff, \
            safe_open(str(dirs["B"] / "model.safetensors"), "pt") as fb:
        for path in files:
            with safe_open(str(path), "pt") as fo:
                for k in fo.keys():  # noqa: SIM118 - safe_open is not iterable
                    ref = fb.get_tensor(k).double() + ff.get_tensor(k).double() - fa.get_tensor(k).double()
                    worst = max(worst, float((fo.get_tensor(k).double() - ref).abs().max()))
    return worst


def run(quick: bool, device: str) -> list[dict]:
    from rebasin.model import open_model

    cache = Path(os.environ.get("REBASIN_SCALE_CACHE", Path.home() / ".cache" / "rebasin" / "scale"))
    name = "llama-tiny-fp32" if quick else "llama-215m-fp32"
    dirs = build(name, cache)
    params = open_model(dirs["A"]).checkpoint.numel()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    work = Path(tempfile.mkdtemp(prefix="rebasin-diff-"))
    ours = [sys.executable, "-m", "rebasin", "transfer", "--old-base", str(dirs["A"]), "--finetuned",
            str(dirs["Aft"]), "--new-base", str(dirs["B"]), "--mode", "diff", "--alpha", "1", "--no-verdict",
            "--overwrite", "-o", str(work / "ours")]
    tools = {"rebasin transfer --mode diff": ours}
    mk = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    if mk:
        yml = work / "ta.yml"
        yml.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(dirs["A"]), "dtype": "float32",
                                   "models": [{"model": str(dirs["Aft"]), "parameters": {"weight": 1.0}},
                                              {"model": str(dirs["B"]), "parameters": {"weight": 1.0}}]}))
        tools["mergekit task_arithmetic"] = [mk, str(yml), str(work / "mergekit"), "--quiet"]
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    try:
        for rep in range(REPEATS + 1):
            for tool, cmd in tools.items():
                shutil.rmtree(work / ("ours" if tool.startswith("rebasin") else "mergekit"), ignore_errors=True)
                res = _timed(cmd, env)
                if rep:  # the first round warms the page cache
                    runs[tool].append({**res, "load1": os.getloadavg()[0]})
                    print(f"[diff] {tool}: {res['wall_s']:.1f} s, {res['peak_rss_gib']:.2f} GiB", flush=True)
        records = []
        for tool, rs in runs.items():
            out = work / ("ours" if tool.startswith("rebasin") else "mergekit")
            walls = sorted(r["wall_s"] for r in rs)
            records.append({"case": f"{name}: {tool}", "tool": tool, "params": params, "dtype": "float32",
                            "wall_s_median": walls[len(walls) // 2], "wall_s_runs": walls,
                            "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                            "max_abs_error_vs_float64": _max_error(out, dirs),
                            "load1_mean": round(sum(r["load1"] for r in rs) / len(rs), 2)})
        if len(records) == 2:
            records[0]["ratio_vs_mergekit"] = round(records[1]["wall_s_median"] / records[0]["wall_s_median"], 3)
        return records
    finally:
        shutil.rmtree(work, ignore_errors=True)
