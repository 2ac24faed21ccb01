"""Quality study: how much of a fine-tune each transfer method carries onto each kind of new base.

For each toy family (Llama decoder with RoPE + GQA, BERT MLM, ViT on digits; :mod:`rebasin.toy`)
and each kind of new base B — (a) same lineage (A trained further), (b) (a) with its units
re-ordered by a random symmetry, (c) an independent seed — and each seed of the whole pair set:

- B, A_ft and B_ft (B fine-tuned directly: the upper bound) evaluated on the fine-tune's task
  (held out) and on B's original task;
- diff ``B + α(A_ft − A)`` and rebasin ``B + α·π(A_ft − A)`` at α = 1, "auto" and "auto-layer"
  (data-free calibration; its verdict and seconds);
- the fraction of the fine-tune gain recovered, ``(transfer − B) / (B_ft − B)`` on the fine-tune's
  task; the cost on B's task (transfer − B, positive = worse); whether the verdict was right
  ("carries over" → it recovered ≥ 10%; "does not carry over" → the output is ≈ B, |recovered|
  < 10%, and α = 1 of the same mode did not help either);
- the weight-averaging check ½(A + B) vs ½(π(A) + B) on B's task;
- rebasin with permutations only (``--symmetries perm``) at α = 1 and "auto", beside the default
  (``full``: permutations plus the exact rotations, V/O per head and RoPE frequency pairs), with
  each match's objective and mean cosine of matched units.

Records are aggregated over seeds (mean, sample standard deviation, per-seed values).
``python -m benchmarks quality [--quick] [--seeds N]``; writes ``results/quality-<device>.{json,md,png}``.
Models are cached (``$REBASIN_CACHE/toy`` or ``~/.cache/rebasin/toy``): a rerun only transfers.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILY_LABELS = {"llama": "Llama decoder (RoPE, GQA)", "bert": "BERT encoder (MLM)", "vit": "ViT (digits)"}
METHOD_ORDER = ("B", "A_ft", "diff α=1", "rebasin α=1", "diff auto", "rebasin auto", "rebasin α=1 (perm only)",
                "rebasin auto (perm only)", "diff auto-layer", "rebasin auto-layer", "B_ft", "merge ½(A+B)",
                "merge ½(π(A)+B)")


LAST_RUN: dict[str, Any] = {}  # wall time of the last run and what it trained, for the report


def _log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(quick: bool, device: str, seeds: int | None = None) -> list[dict[str, Any]]:
    """Measure every family × kind × method over ``seeds`` pair sets (default 2, ``--quick``: 1, smaller models)."""
    import torch

    from rebasin.toy import FAMILIES, KINDS, build_pair_set, recipe
    from rebasin.toy.evaluate import evaluate
    from rebasin.toy.train import pick_threads
    from rebasin.toy.transfers import AUTO, BUDGET, FIXED, LAYER, PERM_ONLY, TRANSFERRED, run_kind

    del device  # CPU study: the models are tiny
    torch.set_num_threads(pick_threads(2))
    _log(f"torch threads: {torch.get_num_threads()}")
    n_seeds = seeds if seeds is not None else (1 if quick else 2)
    methods = FIXED + AUTO + TRANSFERRED + PERM_ONLY + BUDGET + (() if quick else LAYER)
    preset = "quick" if quick else "full"
    raw: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    LAST_RUN.clear()
    LAST_RUN.update(seeds=n_seeds, preset=preset, threads=torch.get_num_threads(), trained=0, train_s=0.0)
    for family in FAMILIES:
        r = recipe(family, preset)
        for seed in range(n_seeds):
            t0 = time.perf_counter()
            ps = build_pair_set(r, seed, log=_log)
            LAST_RUN["trained"] += len(ps.timings)
            LAST_RUN["train_s"] += sum(ps.timings.values())
            if ps.timings:
                _log(f"{family} seed {seed}: trained {len(ps.timings)} models in {time.perf_counter() - t0:.0f} s")
            evaluated: dict[Path, dict[str, float]] = {}
            a_ft = evaluate(r, ps.A_ft)
            for kind in KINDS:
                with tempfile.TemporaryDirectory(prefix="rebasin-quality-") as tmp:
                    t1 = time.perf_counter()
                    res = run_kind(ps, kind, methods, Path(tmp), merges=True, evaluated=evaluated)
                    _log(f"{family} seed {seed} {kind}: {len(methods)} transfers in {time.perf_counter() - t1:.0f} s")
                common = {"family": family, "kind": kind, "seed": seed, "metric": r.metric}
                raw.append({**common, "method": "B", **_values(res.base, res.base)})
                raw.append({**common, "method": "A_ft", **_values(a_ft, res.base)})
                for row in res.rows:
                    rec = {**common, "method": row["method"]}
                    if "error" in row:
                        rec["error"] = row["error"]
                    else:
                        cal = row.get("calibration") or {}
                        check = row.get("verdict_check") or {}
                        rec.update(_values(row["metrics"], res.base), recovered=row["recovered"], alpha=row["alpha"],
                                   alphas=row.get("alphas"), verdict=cal.get("verdict"),
                                   verdict_right=check.get("right"), kl_reduction=cal.get("reduction"),
                                   calib_s=cal.get("seconds"), transfer_s=row["seconds"],
                                   evaluations=len(cal["curve"]) if cal.get("curve") else None,
                                   measured=cal.get("measured"), null_probes=cal.get("null_probes"),
                                   probe_tokens=_probe_tokens(cal.get("probes") or {}))
                        if row.get("match"):
                            rec.update(match_objective=row["match"]["objective"],
                                       match_objective_identity=row["match"]["objective_identity"],
                                       match_cos=row["match"]["cos_after"])
                    raw.append(rec)
                raw.append({**common, "method": "B_ft", **_values(res.upper, res.base), "recovered": 1.0})
                for key, name in (("plain", "merge ½(A+B)"), ("aligned", "merge ½(π(A)+B)")):
                    if key in res.merges:
                        raw.append({**common, "method": name, "general": res.merges[key],
                                    "cost": _cost(r.higher_is_better, res.base["general"], res.merges[key])})
    LAST_RUN["seconds"] = time.perf_counter() - t_all
    _log(f"done in {LAST_RUN['seconds']:.0f} s")
    return aggregate(raw)


def _probe_tokens(probes: dict[str, Any]) -> int | None:
    """Probe inputs × outputs each (tokens of a sequence, 1 for an image): the calibration's budget."""
    count = probes.get("count")
    if count is None:
        return None
    ids = (probes.get("shapes") or {}).get("input_ids")
    return int(count) * (int(ids[1]) if ids and len(ids) > 1 and "pixel_values" not in probes["shapes"] else 1)


def _cost(higher_is_better: bool, base: float, value: float) -> float:
    return base - value if higher_is_better else value - base


def _values(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Both metrics, plus B's general metric for :func:`aggregate` to turn into a cost."""
    return {"sub": metrics["sub"], "general": metrics["general"], "_base_general": base["general"]}


def aggregate(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per family × kind × method: means and sample standard deviations over seeds, plus per-seed values."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for rec in raw:
        if "_base_general" in rec:
            base = rec.pop("_base_general")
            rec["cost"] = (base - rec["general"]) if rec["metric"] == "accuracy" else (rec["general"] - base)
        groups.setdefault((rec["family"], rec["kind"], rec["method"]), []).append(rec)
    out = []
    for (family, kind, method), recs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        agg: dict[str, Any] = {"family": family, "kind": kind, "method": method, "metric": recs[0].get("metric"),
                               "seeds": len(recs)}
        for field in ("sub", "recovered", "general", "cost", "alpha", "kl_reduction", "calib_s", "transfer_s",
                      "evaluations", "measured", "null_probes", "probe_tokens", "match_objective",
                      "match_objective_identity",
                      "match_cos"):
            vals = [r[field] for r in recs if r.get(field) is not None]
            if vals:
                agg[field] = statistics.fmean(vals)
                if field in ("sub", "recovered", "general", "cost") and len(vals) > 1:
                    agg[f"{field}_sd"] = statistics.stdev(vals)
        verdicts = [r["verdict"] for r in recs if r.get("verdict")]
        if verdicts:
            agg["verdict"] = ", ".join(f"{v} ×{verdicts.count(v)}" for v in sorted(set(verdicts)))
            rights = [r["verdict_right"] for r in recs if r.get("verdict_right") is not None]
            agg["verdict_right"] = f"{sum(rights)}/{len(rights)}"
        errors = [r["error"] for r in recs if r.get("error")]
        if errors:
            agg["error"] = errors[0]
        agg["per_seed"] = [{k: v for k, v in r.items() if k not in ("family", "kind", "method", "metric")}
                           for r in recs]
        out.append(agg)
    return out


def _order(k: tuple[str, str, str]) -> tuple[int, int, int]:
    from rebasin.toy import FAMILIES, KINDS

    return (FAMILIES.index(k[0]), KINDS.index(k[1]),
            METHOD_ORDER.index(k[2]) if k[2] in METHOD_ORDER else len(METHOD_ORDER))


# --------------------------------------------------------------------------- report


def _pm(rec: dict[str, Any], field: str, fmt: str, scale: float = 1.0) -> str:
    if field not in rec:
        return ""
    s = format(scale * rec[field], fmt)
    if f"{field}_sd" in rec:
        s += " ± " + format(scale * rec[f"{field}_sd"], fmt)
    return s


def markdown(records: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The study as markdown: a summary of the recovered fractions, then one table per family."""
    from rebasin.toy import FAMILIES, KIND_LABELS, KINDS
    from rebasin.toy.families import TASK_NAMES

    machine = ", ".join(f"{k}={v}" for k, v in info.items())
    seeds = max((r["seeds"] for r in records), default=0)
    run = ""
    if LAST_RUN.get("seconds") is not None:
        run = (f"Run: {LAST_RUN['seconds']:.0f} s wall with {LAST_RUN['threads']} torch thread(s), of which "
               f"{LAST_RUN['train_s']:.0f} s building {LAST_RUN['trained']} models (trained, or permuted for kind "
               "(b); models already in the cache are not rebuilt); load averages above are at the end of the run.")
    lines = ["# quality: fine-tune transfer onto three kinds of new base", "", f"Machine: {machine}", "", run, "",
             f"Seeds: {seeds} (whole pair sets; ± is the sample standard deviation over seeds). *gain* = "
             "(transfer − B) / (B_ft − B) on the fine-tune's held-out task: 100% = as good as fine-tuning B "
             "directly, 0% = no better than B. *cost* = how much worse than B on B's own task (loss: nats/char, "
             "positive = worse; ViT: accuracy points lost). *right* = the calibration's verdict held: "
             "\"carries over\" and it recovered ≥ 10%, or \"does not carry over\" and the output is ≈ B "
             "(|gain| < 10%) while α = 1 of the same mode did not help either.", "",
             "## Gain recovered (mean over seeds)", "",
             "| family | kind | diff α=1 | rebasin α=1 | diff auto | rebasin auto | diff auto-layer | "
             "rebasin auto-layer | rebasin α=1, perm only | rebasin auto, perm only |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["family"], r["kind"], r["method"]): r for r in records}
    methods = ("diff α=1", "rebasin α=1", "diff auto", "rebasin auto", "diff auto-layer", "rebasin auto-layer",
               "rebasin α=1 (perm only)", "rebasin auto (perm only)")
    for fam in FAMILIES:
        for kind in KINDS:
            if (fam, kind, "B") not in by:
                continue
            cells = []
            for m in methods:
                rec = by.get((fam, kind, m))
                cells.append("" if rec is None else ("failed" if "error" in rec else _pm(rec, "recovered", ".0%")))
            lines.append(f"| {fam} | {KIND_LABELS[kind]} | " + " | ".join(cells) + " |")
    lines += target_section(by)
    lines += budget_section(by)
    lines += symmetries_section(by)
    lines += ["", "## Was the verdict right? (seeds where it held / seeds)", "",
              "| family | " + " | ".join(KIND_LABELS[k] for k in KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for fam in FAMILIES:
        if not any(r["family"] == fam for r in records):
            continue
        cells = []
        for kind in KINDS:
            parts = [f"{m.replace(' auto', '')}: {by[(fam, kind, m)]['verdict_right']}"
                     for m in methods[2:6] if "verdict_right" in by.get((fam, kind, m), {})]
            cells.append(", ".join(parts))
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    for fam in FAMILIES:
        recs = [r for r in records if r["family"] == fam]
        if not recs:
            continue
        metric = recs[0]["metric"]
        unit = "accuracy" if metric == "accuracy" else "loss, nats/char"
        scale, fmt = (100.0, ".1f") if metric == "accuracy" else (1.0, ".3f")
        tasks = TASK_NAMES[fam]
        lines += ["", f"## {FAMILY_LABELS[fam]}", "",
                  f"Fine-tune task: {tasks['sub']}; B's task: {tasks['general']}; {unit}.", "",
                  f"| kind | model | {tasks['sub']} | gain | cost on {tasks['general']} | α | verdict | right | "
                  "calib s |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in recs:
            if "error" in r:
                lines.append(f"| {KIND_LABELS[r['kind']]} | {r['method']} | failed: {r['error'][:80]} "
                             "| | | | | | |")
                continue
            lines.append("| " + " | ".join([
                KIND_LABELS[r["kind"]], r["method"], _pm(r, "sub", fmt, scale),
                _pm(r, "recovered", ".0%") if r["method"] not in ("B", "A_ft") else "",
                _pm(r, "cost", fmt, scale) if r["method"] != "B" else "",
                f"{r['alpha']:.2f}" if "alpha" in r else "", r.get("verdict", ""), r.get("verdict_right", ""),
                f"{r['calib_s']:.1f}" if "calib_s" in r else ""]) + " |")
    return "\n".join(lines) + "\n"


def target_section(by: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Markdown: calibration imitating A_ft (the default) vs A_ft's change carried onto B (``→B``)."""
    from rebasin.toy import FAMILIES, KIND_LABELS, KINDS

    lines = ["", "## Calibration target: A_ft itself vs the fine-tune's change carried onto B "
             "(`--alpha-target transferred`, rows marked →B)", "",
             "Means over seeds; cost on B's task as in the family tables (loss: nats/char; ViT: points); right: "
             "seeds where the verdict held.", "",
             "| family | kind | mode | gain A_ft | gain →B | α A_ft | α →B | cost A_ft | cost →B | right A_ft "
             "| right →B |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fam in FAMILIES:
        for kind in KINDS:
            for mode in ("diff", "rebasin"):
                plain, moved = by.get((fam, kind, f"{mode} auto")), by.get((fam, kind, f"{mode} auto →B"))
                if not plain or not moved or "error" in plain or "error" in moved:
                    continue
                scale, fmt = (100.0, ".1f") if plain["metric"] == "accuracy" else (1.0, ".3f")
                lines.append(f"| {fam} | {KIND_LABELS[kind]} | {mode} | {_pm(plain, 'recovered', '.0%')} | "
                             f"{_pm(moved, 'recovered', '.0%')} | {_pm(plain, 'alpha', '.2f')} | "
                             f"{_pm(moved, 'alpha', '.2f')} | {_pm(plain, 'cost', fmt, scale)} | "
                             f"{_pm(moved, 'cost', fmt, scale)} | {plain.get('verdict_right', '')} | "
                             f"{moved.get('verdict_right', '')} |")
    return lines


def budget_section(by: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Markdown: rebasin auto with the small-model probe default vs the ≥100M default shape and half of it."""
    from rebasin.toy import FAMILIES, KIND_LABELS, KINDS
    from rebasin.toy.transfers import BUDGETS

    names = ["rebasin auto", *(f"rebasin auto [{b}]" for b in BUDGETS)]
    lines = ["", "## Probe budget: the small-model default vs the ≥100M default shape (64 × 16 tokens; 128 images "
             "for image classifiers) and half its probes", "",
             "Calibration on ≥ 100M-parameter models samples fewer, shorter probes (their forwards cost ∝ "
             "parameters × tokens); here that shape runs on the study's small models. Per budget: probe "
             "tokens (images for ViT), gain, α, right (seeds where the verdict held). Means over seeds.", "",
             "| family | kind | " + " | ".join(f"{n.removeprefix('rebasin auto').strip(' []') or 'default'}: "
                                              "tokens, gain, α, right" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for fam in FAMILIES:
        for kind in KINDS:
            recs = [by.get((fam, kind, n)) for n in names]
            if any(r is None or "error" in r for r in recs):
                continue
            cells = [f"{r.get('probe_tokens', 0):.0f}, {_pm(r, 'recovered', '.0%')}, {_pm(r, 'alpha', '.2f')}, "
                     f"{r.get('verdict_right', '')}" for r in recs]
            lines.append(f"| {fam} | {KIND_LABELS[kind]} | " + " | ".join(cells) + " |")
    return lines


def symmetries_section(by: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """Markdown: the match objective, matched units' cosine and the gain, permutations only vs full."""
    from rebasin.toy import FAMILIES, KIND_LABELS, KINDS

    lines = ["", "## Symmetries: permutations only vs full (permutations + V/O and RoPE-pair rotations)", "",
             "Objective: the weight-matching objective Σ⟨W_B, π(W_A)⟩ the match reached (identity: before "
             "matching); cosine: size-weighted mean cosine of matched units; gain: rebasin auto (α = 1 in "
             "brackets). Means over seeds.", "",
             "| family | kind | objective: identity | perm only | full | full vs perm | cosine perm → full "
             "| gain perm only | gain full |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fam in FAMILIES:
        for kind in KINDS:
            perm, full = by.get((fam, kind, "rebasin α=1 (perm only)")), by.get((fam, kind, "rebasin α=1"))
            if not perm or not full or "match_objective" not in perm or "match_objective" not in full:
                continue
            rise = (full["match_objective"] - perm["match_objective"]) / abs(perm["match_objective"])
            gains = []
            for auto, one in (("rebasin auto (perm only)", perm), ("rebasin auto", full)):
                a = by.get((fam, kind, auto), {})
                gains.append(f"{_pm(a, 'recovered', '.0%')} ({_pm(one, 'recovered', '.0%')})")
            lines.append(f"| {fam} | {KIND_LABELS[kind]} | {full['match_objective_identity']:.5g} | "
                         f"{perm['match_objective']:.5g} | {full['match_objective']:.5g} | {rise:+.2%} | "
                         f"{perm['match_cos']:.3f} → {full['match_cos']:.3f} | {gains[0]} | {gains[1]} |")
    return lines


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Gain recovered per family (panel), kind (group) and method (bar); error bars: seed min..max."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    from rebasin.toy import FAMILIES, KIND_LABELS, KINDS

    methods = [m for m in ("diff α=1", "rebasin α=1", "diff auto", "rebasin auto", "diff auto-layer",
                           "rebasin auto-layer") if any(r["method"] == m for r in records)]
    colors = {"diff α=1": "#aec7e8", "rebasin α=1": "#ffbb78", "diff auto": "#1f77b4", "rebasin auto": "#ff7f0e",
              "diff auto-layer": "#17becf", "rebasin auto-layer": "#d62728"}
    fams = [f for f in FAMILIES if any(r["family"] == f for r in records)]
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.6), sharey=True, squeeze=False)
    by = {(r["family"], r["kind"], r["method"]): r for r in records}
    width = 0.8 / max(1, len(methods))
    lowest = min((100 * s["recovered"] for r in records for s in r.get("per_seed", [])
                  if s.get("recovered") is not None), default=0.0)
    for ax, fam in zip(axes[0], fams, strict=True):
        x = np.arange(len(KINDS))
        for j, m in enumerate(methods):
            vals, lo, hi = [], [], []
            for kind in KINDS:
                rec = by.get((fam, kind, m))
                seeds = [s["recovered"] for s in (rec or {}).get("per_seed", []) if s.get("recovered") is not None]
                v = 100 * statistics.fmean(seeds) if seeds else np.nan
                vals.append(v)
                lo.append(v - 100 * min(seeds) if seeds else 0)
                hi.append(100 * max(seeds) - v if seeds else 0)
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=2, label=m,
                   color=colors.get(m), error_kw={"lw": 0.8})
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [KIND_LABELS[k].replace(", ", ",\n") for k in KINDS], fontsize=8)
        ax.set_title(FAMILY_LABELS[fam], fontsize=10)
        ax.set_ylim(min(-50.0, lowest - 10), 130)
    axes[0][0].set_ylabel("fine-tune gain recovered (% of B_ft's)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(records: list[dict[str, Any]], info: dict[str, Any], json_path: Path) -> Path:
    """Replace the generic markdown beside ``json_path`` with :func:`markdown` and write the plot (``.png``)."""
    md_path = json_path.with_suffix(".md")
    text = markdown(records, info)
    png = json_path.with_suffix(".png")
    if plot(records, png):
        text += f"\n![gain recovered]({png.name})\n"
    md_path.write_text(text)
    return md_path
