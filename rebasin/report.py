"""Transfer reports: ``report.json``, ``report.md`` and a per-layer alignment plot."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def write_report(directory: Path, report: dict[str, Any]) -> list[str]:
    """Write report.json, report.md and (when matplotlib is installed) alignment.png."""
    written = ["report.json", "report.md"]
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot = plot_alignment(directory / "alignment.png", (report.get("match") or {}).get("groups", []))
    if plot:
        written.append("alignment.png")
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


def _layer_key(name: str) -> tuple[str, int] | None:
    m = re.search(r"layers\.(?:\d+\.)?(\d+)\.(\w+)$", name)
    if not m:
        return None
    prefix = name[: name.index("layers")]
    return f"{prefix}{m.group(2)}", int(m.group(1))


def plot_alignment(path: Path, groups: list[dict[str, Any]]) -> bool:
    """Per-layer cosine similarity of A's units to B's before and after π, one panel per group kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, list[tuple[int, float, float]]] = {}
    for g in groups:
        key = _layer_key(g["name"])
        if key:
            series.setdefault(key[0], []).append((key[1], g["cos_before"], g["cos_after"]))
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (kind, points) in zip(axes[0], sorted(series.items()), strict=True):
        points.sort()
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", label="before (identity)", color="#999999")
        ax.plot(xs, [p[2] for p in points], "o-", label="after π", color="#d62728")
        ax.set_title(kind)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean cosine, A vs B units")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Alignment of the old base to the new base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
