"""Transfer reports: ``report.json``, ``report.md``, the per-layer alignment plot and the α curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(directory: Path, report: dict[str, Any]) -> list[str]:
    """Write report.json, report.md and (when matplotlib is installed) alignment.png."""
    written = ["report.json", "report.md"]
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot = plot_alignment(directory / "alignment.png", (report.get("match") or {}).get("groups", []))
    if plot:
        written.append("alignment.png")
    if report.get("calibration") and plot_alpha(directory / "alpha.png", report["calibration"]):
        written.append("alpha.png")
    (directory / "report.md").write_text(markdown(report, plot))
    return written


def markdown(report: dict[str, Any], plot: bool) -> str:
    lines = [f"# rebasin transfer ({report['mode']} mode, α = {report['alpha']})", "",
             f"- family: {report['family']}", f"- old base (A): `{report['old_base']}`",
             f"- fine-tune (A_ft): `{report['finetuned']}`" + (" (LoRA adapter)" if report.get("adapter") else ""),
             f"- new base (B): `{report['new_base']}`",
             f"- tensors: {report['tensors']['with_delta']} received the task vector, "
             f"{report['tensors']['copied_from_b']} copied from B",
             f"- task vector norm ‖A_ft − A‖: {report['task_vector_norm']:.6g}"]
    if report.get("vocab"):
        v = report["vocab"]
        lines.append(f"- vocabulary: A {v['vocab_a']} rows, B {v['vocab_b']} rows; {v['shared_rows']} shared rows got "
                     f"the delta (mapped by {v['mapped_by']}), {v['b_rows_kept_from_b']} kept B's values")
    if report.get("verify"):
        lines.append(f"- verify: max |π(A)(x) − A(x)| = {report['verify']['max_abs_diff']:.3g} on random inputs")
    c = report.get("calibration")
    if c:
        name = "KL" if c["divergence"] == "kl" else "NMSE"
        lines += ["", "## Calibration and verdict", "", f"**{c['line']}**", "",
                  f"- {name}(A_ft ‖ B) = {c['kl_base']:.4g}; at the written α: {c['kl_chosen']:.4g} "
                  f"(relative reduction {c['reduction']:.1%})" + (f"; at α = 1: {c['kl_at_one']:.4g}"
                                                                    if c.get("kl_at_one") is not None else ""),
                  f"- probes: {c['probes']['count']} × {c['probes']['kind']}; {c['seconds']:.1f} s"]
        if c.get("layer_fit"):
            f = c["layer_fit"]
            lines.append(f"- per-layer α {'kept' if f['kept'] else 'not kept'}: held-out {name} "
                         f"{f['heldout_layer']:.4g} (per layer) vs {f['heldout_global']:.4g} (global); "
                         + ", ".join(f"{k} {v:.2f}" for k, v in f["blocks"].items()))
        lines += ["", "![divergence from the fine-tune against α](alpha.png)"]
    if report.get("lineage"):
        lines += ["", report["lineage"]]
    m = report.get("match")
    if m:
        lines += ["", "## Alignment of A to B", "",
                  f"objective Σ⟨B, π(A)⟩: identity {m['objective_identity']:.6g} → matched {m['objective']:.6g} "
                  f"({m['sweeps']} sweeps, {'converged' if m['converged'] else 'not converged'})", ""]
        if plot:
            lines += ["![per-layer alignment](alignment.png)", ""]
        lines += ["| group | kind | size | moved | cos before | cos after |", "|---|---|---:|---:|---:|---:|"]
        for g in m["groups"]:
            lines.append(f"| {g['name']} | {g['kind']} | {g['size']} | {g['moved']:.1%} | {g['cos_before']:.4f} | "
                         f"{g['cos_after']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_alignment(path: Path, groups: list[dict[str, Any]]) -> bool:
    """Per-layer cosine similarity of A's units to B's before and after π, one panel per group template.

    ``groups``: the ``groups`` of :meth:`MatchResult.to_dict`; global groups (``layer`` None)
    are not plotted. Returns False when matplotlib is missing or nothing is per-layer.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, list[tuple[int, float, float]]] = {}
    for g in groups:
        if g.get("layer") is not None:
            series.setdefault(g["template"], []).append((g["layer"], g["cos_before"], g["cos_after"]))
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (template, points) in zip(axes[0], sorted(series.items()), strict=True):
        points.sort()
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="before (identity)", color="#999999")
        ax.plot(xs, [p[2] for p in points], "o-", label="after π", color="#d62728")
        ax.set_title(template)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean cosine, A vs B units")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Alignment of the old base to the new base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_alpha(path: Path, calibration: dict[str, Any]) -> bool:
    """Divergence of ``B + α·π(τ)`` from the fine-tune against α, with B's level and the chosen α."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs, ys = zip(*calibration["curve"], strict=True)
    name = "KL(A_ft ‖ output)" if calibration["divergence"] == "kl" else "NMSE(A_ft, output)"
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, ys, "o-", color="#1f77b4", label=name)
    ax.axhline(calibration["kl_base"], color="#999999", ls="--", label="the new base B (α = 0)")
    ax.axvline(calibration["alpha"], color="#d62728", ls=":", label=f"chosen α = {calibration['alpha']:.2f}")
    ax.set_xlabel("α")
    ax.set_ylabel(name)
    ax.set_ylim(bottom=0)
    ax.set_title(calibration["line"] if len(calibration["line"]) < 60 else calibration["verdict"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
