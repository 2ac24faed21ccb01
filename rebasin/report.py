"""Transfer reports: ``report.json``, ``report.md``, the per-layer alignment plot and the α curve."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_FILES = ("report.json", "report.md", "alignment.png", "alpha.png")


def write_report(directory: Path, report: dict[str, Any]) -> list[str]:
    """Write report.json, report.md and (when matplotlib is installed) alignment.png — from the
    match, or from the given permutations (``alignment``) — and alpha.png."""
    written = ["report.json", "report.md"]
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot = plot_alignment(directory / "alignment.png",
                          (report.get("match") or report.get("alignment") or {}).get("groups", []))
    if plot:
        written.append("alignment.png")
    if report.get("calibration") and plot_alpha(directory / "alpha.png", report["calibration"]):
        written.append("alpha.png")
    (directory / "report.md").write_text(markdown(report, plot))
    return written


def markdown(report: dict[str, Any], plot: bool) -> str:
    lines = [f"# rebasin transfer ({report['mode']} mode, α = {report['alpha']:.3g})", "",
             f"- family: {report['family']}", f"- old base (A): `{report['old_base']}`",
             f"- fine-tune (A_ft): `{report['finetuned']}`" + (" (LoRA adapter)" if report.get("adapter") else ""),
             f"- new base (B): `{report['new_base']}`",
             f"- tensors: {tensor_counts(report)}",
             f"- task vector norm ‖A_ft − A‖: {report['task_vector_norm']:.6g}"]
    if report.get("arithmetic"):
        ar = report["arithmetic"]
        lines.append(f"- arithmetic in {ar['dtype']}, rounded once to {', '.join(ar['output_dtypes']) or 'the output'}")
    if report.get("files_from_b"):
        lines.append(f"- files copied from B: {', '.join(f'`{f}`' for f in report['files_from_b'])}")
    if report.get("vocab"):
        v = report["vocab"]
        lines.append(f"- vocabulary: A {v['vocab_a']} rows, B {v['vocab_b']} rows; {v['shared_rows']} shared rows got "
                     f"the delta (mapped by {v['mapped_by']}), {v['b_rows_kept_from_b']} kept B's values")
    if report.get("verify"):
        lines.append(f"- verify: max |π(A)(x) − A(x)| = {report['verify']['max_abs_diff']:.3g} on random inputs")
    c = report.get("calibration")
    if not c and report.get("verdict_skipped"):
        lines.append(f"- verdict: not measured ({report['verdict_skipped']}); α = {report['alpha']:g} as given")
    if c:
        name = "KL" if c["divergence"] == "kl" else "NMSE"
        lines += ["", "## Calibration and verdict", "", f"**{c['line']}**", "",
                  f"- {name}({target_name(c)} ‖ B) = {c['kl_base']:.4g}; at the written α: {c['kl_chosen']:.4g} "
                  f"(relative reduction {c['reduction']:.1%})" + (f"; at α = 1: {c['kl_at_one']:.4g}"
                                                                    if c.get("kl_at_one") is not None else ""),
                  f"- probes: {c['probes']['count']} × {c['probes']['kind']}"
                  + (f", the curve measured on {settled_on(c)} (they settled it)" if settled_on(c) else "")
                  + (f", the null model on {c['null_probes']}" if c.get("null_probes") else "")
                  + f"; {c['seconds']:.1f} s"]
        if c.get("lowered"):
            lines.append(f"- the minimum, at α = {c['alpha_min']:.2f}, is within one standard error (paired over "
                         f"the probes) of {name} at α = {c['alpha']:.2f}, nearer to B: that α is written")
        if c.get("target") == "transferred":
            lines.append("- target A_ft→B: B's outputs moved by the fine-tune's change over A "
                         "(log p = log p_B + log p_A_ft − log p_A, renormalised)")
        if c.get("layer_fit"):
            f = c["layer_fit"]
            lines.append(f"- per-layer α {'kept' if f['kept'] else 'not kept'}: held-out {name} "
                         f"{f['heldout_layer']:.4g} (per layer) vs {f['heldout_global']:.4g} (global); "
                         + ", ".join(f"{k} {v:.2f}" for k, v in f["blocks"].items()))
        lines += ["", "![divergence from the fine-tune against α](alpha.png)"]
    if report.get("lineage"):
        lines += ["", report["lineage"]]
    m = report.get("match") or report.get("alignment")
    if m:
        how = (f"matched {m['objective']:.6g} ({m['sweeps']} sweep{'s' if m['sweeps'] != 1 else ''}, "
               f"{'converged' if m['converged'] else 'not converged'})" if report.get("match")
               else f"given π {m['objective']:.6g} (permutations from `{m['perms']}`"
               + (f", format version {m['format_version']}" if m.get("format_version") else "")
               + (", with within-head rotations" if m.get("rotations") else "") + ", no matching)")
        lines += ["", "## Alignment of A to B", "",
                  f"objective Σ⟨B, π(A)⟩: identity {m['objective_identity']:.6g} → {how}", ""]
        if plot:
            lines += ["![per-layer alignment](alignment.png)", ""]
        # within-head orthogonal maps (--symmetries full, or a format-version-2 permutations file)
        rotated = bool(m.get("rotations")) or any(g.get("rotation") for g in m["groups"])
        if rotated:
            lines += ["rotation: mean ‖R − I‖_F / (2√d_head) over a group's within-head maps (0: identity, "
                      "1: −I)" + ("; in brackets the KV heads a non-identity rotation maps"
                                  if any("rotated_blocks" in g for g in m["groups"]) else ""), ""]
        lines += ["| group | kind | size | moved | cos before | cos after |" + (" rotation |" if rotated else ""),
                  "|---|---|---:|---:|---:|---:|" + ("---:|" if rotated else "")]
        for g in m["groups"]:
            lines.append(f"| {g['name']} | {g['kind']} | {g['size']} | {g['moved']:.1%} | {g['cos_before']:.4f} | "
                         f"{g['cos_after']:.4f} |" + (f" {rotation_cell(g)} |" if rotated else ""))
    return "\n".join(lines) + "\n"


def rotation_cell(g: dict[str, Any]) -> str:
    """``0.412 (3/4 heads)``: the group's rotation amount and, where known, its rotated KV heads."""
    cell = f"{g.get('rotation', 0.0):.3f}"
    if "rotated_blocks" in g:
        cell += f" ({g['rotated_blocks']}/{g['rotation_blocks']} heads)"
    return cell


def tensor_counts(report: dict[str, Any]) -> str:
    """``5 changed by the task vector, 98 unchanged (…), 2 copied from B`` — honest counts; when the
    task vector was scaled by 0 (one global α = 0), that instead of "unchanged"."""
    t = report["tensors"]
    if report.get("adapter"):
        return f"{t['changed']} adapter tensors written"
    if report["alpha"] == 0 and not (report.get("calibration") or {}).get("alphas"):
        return (f"the task vector scaled by 0: B's {t['changed'] + t.get('unchanged', 0)} tensors as they are, "
                f"{t['copied_from_b']} copied from B")
    parts = [f"{t['changed']} changed by the task vector"]
    if t.get("unchanged"):
        parts.append(f"{t['unchanged']} unchanged (zero task vector there, or below the output dtype's precision)")
    parts.append(f"{t['copied_from_b']} copied from B")
    return ", ".join(parts)


def plot_alignment(path: Path, groups: list[dict[str, Any]]) -> bool:
    """Per-layer cosine similarity of A's units to B's before and after π, one panel per group
    template, plus one panel for the global groups (residual streams, ALBERT's embedding).

    ``groups``: the ``groups`` of :meth:`MatchResult.to_dict` (or of
    :func:`rebasin.alignment.alignment_stats`). A per-layer group with within-head rotations
    also gets its rotation amount (``rotation``, dashed). Layers are integer ticks; the y-axis is the
    cosine scale, 0 to 1 (extended below 0 only for a negative value), never auto-zoomed, so
    a rise from 0 to 0.013 looks as small as it is. Returns False when matplotlib is missing
    or there are no groups.
    """
    if not groups:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    series: dict[str, list[tuple[int, float, float, float]]] = {}
    global_groups: list[tuple[str, float, float]] = []
    for g in groups:
        if g.get("layer") is not None:
            series.setdefault(g["template"], []).append((g["layer"], g["cos_before"], g["cos_after"],
                                                         g.get("rotation") or 0.0))
        else:
            global_groups.append((g["name"], g["cos_before"], g["cos_after"]))
    if not series and not global_groups:
        return False
    values = [v for g in groups for v in (g["cos_before"], g["cos_after"]) if v == v]
    lowest = min(values, default=0.0)
    bottom = 0.0 if lowest >= 0 else lowest - 0.05
    panels = len(series) + (1 if global_groups else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    for ax, (template, points) in zip(axes, sorted(series.items()), strict=False):
        points.sort()
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="before (identity)", color="#999999")
        ax.plot(xs, [p[2] for p in points], "o-", label="after π", color="#d62728")
        if any(p[3] for p in points):  # within-head rotations: how far from the identity, same 0–1 scale
            ax.plot(xs, [p[3] for p in points], "s--", label="rotation ‖R − I‖/(2√d)", color="#1f77b4")
            ax.legend(fontsize=8)
        ax.set_title(template)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(xs) == 1:
            ax.set_xticks(xs)
    if global_groups:
        ax = axes[-1]
        xs = range(len(global_groups))
        ax.bar([x - 0.2 for x in xs], [g[1] for g in global_groups], 0.4, label="before (identity)", color="#999999")
        ax.bar([x + 0.2 for x in xs], [g[2] for g in global_groups], 0.4, label="after π", color="#d62728")
        ax.set_xticks(list(xs), [g[0] for g in global_groups])
        ax.set_title("global groups")
    for ax in axes:
        ax.set_ylim(bottom, 1.0)
        ax.set_ylabel("mean cosine, A vs B units")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Alignment of the old base to the new base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def settled_on(calibration: dict[str, Any]) -> int | None:
    """The probes that settled the α curve when they were fewer than all made, else None."""
    measured = calibration.get("measured")
    return measured if measured is not None and measured < calibration["probes"]["count"] else None


def target_name(calibration: dict[str, Any]) -> str:
    """What calibration compared the output with: ``A_ft``, or ``A_ft→B`` (the fine-tune's change applied to B)."""
    return "A_ft→B" if calibration.get("target") == "transferred" else "A_ft"


def plot_alpha(path: Path, calibration: dict[str, Any]) -> bool:
    """Divergence of ``B + α·π(τ)`` from the fine-tune against α, with B's level and the chosen α."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs, ys = zip(*calibration["curve"], strict=True)
    t = target_name(calibration)
    name = f"KL({t} ‖ output)" if calibration["divergence"] == "kl" else f"NMSE({t}, output)"
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, ys, "o-", color="#1f77b4", label=name)
    ax.axhline(calibration["kl_base"], color="#999999", ls="--", label="the new base B (α = 0)")
    noise, lowest = calibration.get("noise"), calibration.get("alpha_min")
    if noise and lowest is not None:  # what within_noise allows: the minimum plus one paired standard error
        floor = dict(map(tuple, calibration["curve"]))[lowest]
        ax.plot([a for a, _ in noise], [floor + se for _, se in noise], "--", color="#ff7f0e", lw=1,
                label="minimum + 1 standard error")
        if lowest != calibration["alpha"]:
            ax.axvline(lowest, color="#ff7f0e", ls=":", label=f"minimum at α = {lowest:.2f}")
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
