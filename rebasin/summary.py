"""What ``rebasin inspect`` reports: family, groups, counts, and the memory a job needs."""
from __future__ import annotations

from typing import Any

from rebasin.estimate import human
from rebasin.model import Model
from rebasin.symmetry import kind_of


def memory_estimate(model: Model, device: str = "cpu", world: int = 1) -> dict[str, Any]:
    """Predicted peak RSS (bytes) and time (seconds) of each job on a pair of checkpoints shaped
    like ``model`` (:mod:`rebasin.estimate`: a model of what the code allocates, with measured
    constants; the GEMM rate is measured on this machine in ~0.1 s).

    ``match`` streams (reads each tensor when a step needs it); ``match_cached`` keeps both
    models' permuted tensors after their first read, which ``match`` does when that fits the
    budget. Times: a match's first sweep (later sweeps re-evaluate only what changed; planted
    and same-lineage pairs converge in 2), a transfer's or apply's write.
    """
    import torch

    from rebasin.estimate import available_bytes, estimate_apply, estimate_match, estimate_write

    ck, spec = model.checkpoint, model.spec
    m = estimate_match(spec, model, model, torch.device(device), world)
    diff = estimate_write(model, model, rebasin=False)
    write = estimate_write(model, model, rebasin=True)
    apply = estimate_apply(model)
    return {"match": m.streaming, "match_cached": m.cached, "match_seconds_per_sweep": m.seconds_first_sweep,
            "match_seconds": m.seconds(2), "match_tflop_per_sweep": m.flops_sweep / 1e12,
            "transfer_diff": diff.peak, "transfer_diff_seconds": diff.seconds,
            "transfer_rebasin": max(m.streaming, write.peak), "transfer_rebasin_seconds": m.seconds(2) + write.seconds,
            "apply": apply.peak, "apply_seconds": apply.seconds,
            "output_disk": ck.nbytes(), "available": available_bytes()}


def summarize(model: Model) -> dict[str, Any]:
    ck, spec = model.checkpoint, model.spec
    dtypes: dict[str, int] = {}
    for info in ck.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    templates: dict[str, dict[str, Any]] = {}
    for g in spec.groups.values():
        t = templates.setdefault(g.template, {"count": 0, "kind": g.kind, "size": g.size, "fixed": g.fixed})
        t["count"] += 1
        if g.is_attention:
            t.update(n_heads=g.n_heads, n_kv_heads=g.n_kv_heads, d_head=g.d_head, rope=g.rope, qk_shared=g.qk_shared,
                     rope_layout=g.rope_layout if g.rope else None, rotations=kind_of(g).describe(g))
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
        "headless": spec.headless,
        "fixed_groups": spec.fixed_groups,
        "memory": memory_estimate(model),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"model       {s['path']}",
        f"family      {s['family']} (model_type={s['model_type']}, architectures={s['architectures']})",
        f"files       {', '.join(s['files'])}",
        f"tensors     {s['tensors']} ({s['permuted_tensors']} permuted, {s['invariant_tensors']} invariant)",
        f"parameters  {s['parameters']:,} ({human(s['bytes'])}; dtypes {s['dtypes']})",
        f"groups      {s['n_groups']}",
    ]
    for name, g in s["groups"].items():
        if g["kind"] == "attention":
            extra = (f"heads={g['n_heads']} kv_heads={g['n_kv_heads']} d_head={g['d_head']}"
                     + (f" rope ({g.get('rope_layout') or 'half'})" if g["rope"] else "")
                     + (" qk_shared" if g["qk_shared"] else ""))
            rot = g.get("rotations") or {}
            if rot:
                extra += f"; rotations (--symmetries full): V/O {rot['vo_rot']}, Q/K {rot['qk_rot']}"
        else:
            extra = f"size={g['size']}"
        if g.get("fixed"):
            extra += "  fixed: identity (headless)"
        lines.append(f"  {name:<28} x{g['count']:<4} {g['kind']:<9} {extra}")
    if s.get("headless"):
        lines += [f"headless    {s['headless']}",
                  f"            {', '.join(s['fixed_groups'])} stays the identity (permuting it would permute the "
                  "output features):",
                  "            match and apply move only the other groups; transfer still aligns it (its output is in "
                  "the new base's basis)"]
    m = s["memory"]
    lines += [
        "memory and time (predicted: peak RSS; time on this machine)",
        f"  match (streaming)  {human(m['match']):>10}   ~{m['match_seconds']:.0f} s for 2 sweeps "
        f"({m['match_seconds_per_sweep']:.0f} s per sweep, {m['match_tflop_per_sweep']:.2f} TFLOP)",
        f"  match (cached)     {human(m['match_cached']):>10}   used when it fits the budget (--memory)",
        f"  transfer (diff)    {human(m['transfer_diff']):>10}   ~{m['transfer_diff_seconds']:.0f} s",
        f"  transfer (rebasin) {human(m['transfer_rebasin']):>10}   ~{m['transfer_rebasin_seconds']:.0f} s",
        f"  apply              {human(m['apply']):>10}   ~{m['apply_seconds']:.0f} s",
        f"  output on disk     {human(m['output_disk']):>10}",
        f"  available now      {human(m['available']):>10}",
    ]
    over = [job for job in ("match", "transfer_diff", "transfer_rebasin", "apply") if m[job] > m["available"]]
    if over:
        lines.append(f"  warning: {', '.join(over)} would need more than the memory available now "
                     "(refused with exit 7 unless --memory allows it; see docs/scale.md for several processes)")
    return "\n".join(lines)
