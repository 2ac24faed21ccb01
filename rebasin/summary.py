"""What ``rebasin inspect`` reports: family, groups, counts, and the memory a job needs."""
from __future__ import annotations

from typing import Any

from rebasin.io.writer import DEFAULT_SHARD_BYTES
from rebasin.model import Model


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def memory_estimate(model: Model, compute_bytes: int = 4) -> dict[str, int]:
    """Peak memory of a match and of a transfer, in bytes (see docs of each job).

    match: both models' permuted tensors held in the compute dtype, plus the largest
    cost matrix (float32) and its solver workspace (float64 copy).
    transfer: four tensors in flight (A, A_ft, B, result; float32) plus one output shard;
    rebasin mode adds the match.
    """
    ck, spec = model.checkpoint, model.spec
    permuted = sum(ck.tensors[t].numel for t in spec.permuted_tensors())
    largest_group = max((g.size if not g.is_attention else g.n_kv_heads for g in spec.groups.values()), default=0)
    cost = largest_group * largest_group * (4 + 8)
    largest_tensor = max((info.numel for info in ck.tensors.values()), default=0)
    shard = min(ck.nbytes(), DEFAULT_SHARD_BYTES)
    transfer = 4 * largest_tensor * 4 + shard
    match = 2 * permuted * compute_bytes + cost
    return {"match": match, "transfer_diff": transfer, "transfer_rebasin": transfer + match, "output_disk": ck.nbytes()}


def summarize(model: Model) -> dict[str, Any]:
    ck, spec = model.checkpoint, model.spec
    dtypes: dict[str, int] = {}
    for info in ck.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    templates: dict[str, dict[str, Any]] = {}
    for g in spec.groups.values():
        t = templates.setdefault(g.template, {"count": 0, "kind": g.kind, "size": g.size})
        t["count"] += 1
        if g.is_attention:
            t.update(n_heads=g.n_heads, n_kv_heads=g.n_kv_heads, d_head=g.d_head, rope=g.rope, qk_shared=g.qk_shared)
    return {
        "path": str(ck.path),
        "family": spec.family,
        "model_type": ck.config.get("model_type"),
        "architectures": ck.config.get("architectures"),
        "files": [str(f.name) for f in ck.files],
        "tensors": len(ck),
        "permuted_tensors": len(spec.permuted_tensors()),
        "invariant_tensors": len(spec.invariant_tensors()),
        "parameters": ck.numel(),
        "bytes": ck.nbytes(),
        "dtypes": dtypes,
        "groups": templates,
        "n_groups": len(spec.groups),
        "memory": memory_estimate(model),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"model       {s['path']}",
        f"family      {s['family']} (model_type={s['model_type']}, architectures={s['architectures']})",
        f"files       {', '.join(s['files'])}",
        f"tensors     {s['tensors']} ({s['permuted_tensors']} permuted, {s['invariant_tensors']} invariant)",
        f"parameters  {s['parameters']:,} ({human_bytes(s['bytes'])}; dtypes {s['dtypes']})",
        f"groups      {s['n_groups']}",
    ]
    for name, g in s["groups"].items():
        if g["kind"] == "attention":
            extra = (f"heads={g['n_heads']} kv_heads={g['n_kv_heads']} d_head={g['d_head']}"
                     + (" rope" if g["rope"] else "") + (" qk_shared" if g["qk_shared"] else ""))
        else:
            extra = f"size={g['size']}"
        lines.append(f"  {name:<28} x{g['count']:<4} {g['kind']:<9} {extra}")
    m = s["memory"]
    lines += [
        "memory (peak, estimated)",
        f"  match              {human_bytes(m['match'])}",
        f"  transfer (diff)    {human_bytes(m['transfer_diff'])}",
        f"  transfer (rebasin) {human_bytes(m['transfer_rebasin'])}",
        f"  output on disk     {human_bytes(m['output_disk'])}",
    ]
    return "\n".join(lines)
