"""``rebasin demo``: move a fine-tune onto three kinds of new base, on small decoders trained here.

Nothing is downloaded. The models are Llama-style decoders (RoPE, grouped-query attention,
SwiGLU; :mod:`rebasin.toy`) trained at the character level on the Python standard library's
own sources: the bases on its docstrings (prose, the *general* task), the fine-tune on its
code (the *sub-task*). The pair set (:func:`rebasin.toy.build_pair_set`):

- A, the old base, and A_ft, A fine-tuned on code;
- three new bases B, each with B_ft (B fine-tuned on code the same way: the upper bound):
  (a) A trained further on prose — same lineage; (b) (a) with its hidden units, heads and
  head dimensions re-ordered by a random symmetry — the same function, so only re-basin can
  line A up with it; (c) another seed trained from scratch — independent.

For each B the fine-tune is moved through the public API (:func:`rebasin.transfer.transfer`):
diff ``B + α(A_ft − A)`` and rebasin ``B + α·π(A_ft − A)``, at α = 1 and at the data-free
calibrated α ("auto", with its verdict), and every model is evaluated on held-out code (the
fine-tune's task) and prose (B's own task). An aligned-merge check evaluates ½(A + B) and
½(π(A) + B) on prose. The first run trains the models (about 1.5 minutes on two idle cores) into the
cache (``--cache``, else ``$REBASIN_CACHE/toy``, else ``~/.cache/rebasin/toy``); later runs reuse
them. The output folder gets ``results.json``, ``results.md``, ``results.png`` and the written
models under ``transfers/``. Every number is measured by the run that prints it.

Entry points: :func:`run_demo_pipeline` returns a :class:`DemoResult`; :func:`format_demo`
renders it as the text ``rebasin demo`` (rebasin/cli.py) prints.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = "rebasin-demo-2"
FAMILY = "llama"
PROBES = {"tiny": {"probe_count": 8, "probe_length": 32}}  # calibration probes of the test-size run
KIND_TEXT = {
    "continued": "(a) same lineage: B = A trained further on prose",
    "permuted": "(b) same lineage, re-ordered: B = (a) with its units permuted (same function)",
    "independent": "(c) independent: B = another seed trained from scratch",
}


@dataclass
class DemoResult:
    """What the demo measured; ``results`` is the JSON written to ``results.json``."""

    output: Path
    results: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> dict[str, dict[str, Any]]:
        return self.results["kinds"]


def _methods() -> tuple[Any, ...]:
    from rebasin.toy.transfers import AUTO, FIXED

    return FIXED + AUTO


def run_demo_pipeline(output: str | Path, cache: str | Path | None = None, seed: int = 0, *, preset: str = "full",
                      progress: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Build (or load) the pair set, transfer with every method, evaluate, write the artifacts.

    ``preset`` is the size of :data:`rebasin.toy.PRESETS` ("full" for ``rebasin demo``, "tiny"
    for the tests). ``progress`` shows training bars; ``log`` gets a line per step of the run.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    output = Path(output)

    from rebasin.toy import KINDS, build_pair_set, recipe
    from rebasin.toy.cache import cache_root
    from rebasin.toy.evaluate import evaluate
    from rebasin.toy.families import hf_config, model_class
    from rebasin.toy.transfers import run_kind

    r = recipe(FAMILY, preset)
    root = cache_root(cache)
    log(f"models: {root} (built on the first run, reused after)")
    t0 = time.perf_counter()
    ps = build_pair_set(r, seed, cache=root, progress=progress, log=log)
    timings["models"] = time.perf_counter() - t0
    timings.update({f"build {k}": v for k, v in ps.timings.items()})

    evaluated: dict[Path, dict[str, float]] = {}
    t0 = time.perf_counter()
    refs = {"A": evaluate(r, ps.A), "A_ft": evaluate(r, ps.A_ft)}
    kinds: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        log(f"{KIND_TEXT[kind]}: match, calibrate, transfer, evaluate")
        k0 = time.perf_counter()
        res = run_kind(ps, kind, _methods(), output / "transfers", merges=True, evaluated=evaluated,
                       options=PROBES.get(preset), log=lambda m: log(f"  {m}"))
        timings[f"transfers {kind}"] = time.perf_counter() - k0
        kinds[kind] = {"label": KIND_TEXT[kind], "B": str(ps.B[kind]), "B_ft": str(ps.B_ft[kind]),
                       "base": res.base, "upper": res.upper, "rows": [_jsonable(row) for row in res.rows],
                       "merges": res.merges, "match": _match_summary(res.match)}
    timings["transfers"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    params = sum(p.numel() for p in model_class(r)(hf_config(r)).parameters())
    results = {
        "version": VERSION, "seed": seed, "preset": preset, "family": FAMILY, "recipe": r.params(),
        "params": params, "cache": str(ps.A.parent),
        "task": {"general": "next character of Python standard-library docstrings (prose), held out by file",
                 "sub": "next character of Python standard-library code (docstrings and comments removed)",
                 "metric": "loss, nats per character (lower is better)"},
        "references": refs, "models": {"A": str(ps.A), "A_ft": str(ps.A_ft)}, "kinds": kinds,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    files = _write_artifacts(output, results)
    return DemoResult(output, results, files)


def _match_summary(match: dict[str, Any] | None) -> dict[str, Any] | None:
    if not match:
        return None
    return {k: match[k] for k in ("objective_identity", "objective", "sweeps", "solver", "seconds") if k in match}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    cal = out.get("calibration")
    if cal:
        out["calibration"] = {k: cal.get(k) for k in ("alpha", "alphas", "kl_base", "kl_chosen", "kl_at_one",
                                                      "reduction", "curve", "verdict", "line", "seconds")}
    return out


# --------------------------------------------------------------------------- rendering


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{round(100 * x)}%"  # an int: never "-0%"


def _label(row: dict[str, Any]) -> str:
    formula = "B + α·π(A_ft − A)" if row["mode"] == "rebasin" else "B + α·(A_ft − A)"
    if isinstance(row["alpha_requested"], str):
        alpha = f"α = {row['alpha']:.2f} ({row['alpha_requested']})" if "alpha" in row else row["alpha_requested"]
    else:
        alpha = f"α = {row['alpha_requested']:g}"
    return f"{row['mode']:<8}{formula}, {alpha}"


def kind_table(kind: dict[str, Any], markdown: bool = False) -> list[str]:
    """The table of one kind of new base: one line per model, columns code / gain / prose."""
    lines: list[tuple[str, str, str, str]] = [("B (new base)", f"{kind['base']['sub']:.3f}", "0%",
                                               f"{kind['base']['general']:.3f}")]
    for row in kind["rows"]:
        if "error" in row:
            lines.append((_label(row), "failed", "", row["error"][:60]))
            continue
        lines.append((_label(row), f"{row['metrics']['sub']:.3f}", _pct(row["recovered"]),
                      f"{row['metrics']['general']:.3f}"))
    lines.append(("B_ft (B fine-tuned on code: the target)", f"{kind['upper']['sub']:.3f}", "100%",
                  f"{kind['upper']['general']:.3f}"))
    for key, name in (("plain", "½(A + B)      merge, no π"), ("aligned", "½(π(A) + B)   merge, aligned")):
        if key in kind["merges"]:
            lines.append((name, "", "", f"{kind['merges'][key]:.3f}"))
    head = ("model", "code loss", "gain", "prose loss")
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        return out
    w = max(len(x[0]) for x in [head, *lines])
    return [f"  {a:<{w}}  {b:>9}  {c:>5}  {d:>10}" for a, b, c, d in [head, *lines]]


def verdict_lines(kind: dict[str, Any]) -> list[str]:
    """The calibration's verdict per calibrated method, and the lineage line of the matching."""
    out = []
    for row in kind["rows"]:
        cal = row.get("calibration")
        if cal:
            out.append(f"{row['mode']} auto: {cal['line']}")
    lineage = next((row["lineage"] for row in kind["rows"] if row.get("lineage")), None)
    if lineage:
        out.append(f"lineage: {lineage}")
    return out


def format_demo(result: DemoResult | dict[str, Any]) -> str:
    """The demo's report as plain text: the setup, one table per kind of new base, verdicts, files."""
    res = result.results if isinstance(result, DemoResult) else result
    r, refs = res["recipe"], res["references"]
    lines = [
        f"Llama-style decoder ({r['layers']} layers, hidden {r['hidden']}, {r['heads']} heads / {r['kv_heads']} KV "
        f"heads, RoPE; {res['params']:,} parameters), character level, trained here on the Python standard "
        "library: bases on docstrings (prose), the fine-tune on code.",
        f"A (old base): code {refs['A']['sub']:.3f}, prose {refs['A']['general']:.3f}   ->   A_ft (A fine-tuned on "
        f"code): code {refs['A_ft']['sub']:.3f}, prose {refs['A_ft']['general']:.3f}   "
        "[held-out loss, nats/char, lower is better]",
        "gain = share of B_ft's improvement on code that the transfer reaches (100% = as good as fine-tuning B).",
    ]
    for kind in res["kinds"].values():
        lines += ["", kind["label"], *kind_table(kind), *(f"  {v}" for v in verdict_lines(kind))]
    if isinstance(result, DemoResult) and result.files:
        lines += ["", f"wrote {', '.join(str(result.output / f) for f in result.files)} and the models in "
                      f"{result.output / 'transfers'}; {res['timings_s']['total']:.0f} s"]
    return "\n".join(lines)


def _write_artifacts(output: Path, results: dict[str, Any]) -> list[str]:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    plotted = _plot(output / "results.png", results)
    r = results["recipe"]
    md = ["# rebasin demo", "",
          f"Llama-style decoders ({r['layers']} layers, hidden {r['hidden']}, {r['heads']} heads / {r['kv_heads']} "
          f"KV heads, RoPE, {results['params']:,} parameters) trained at the character level on the Python "
          "standard library: the bases on docstrings (prose), the fine-tune A_ft on code. Held-out loss in "
          "nats per character (lower is better); *gain* is the share of B_ft's improvement on code the "
          "transfer reaches.", "",
          f"A: code {results['references']['A']['sub']:.3f}, prose {results['references']['A']['general']:.3f}; "
          f"A_ft: code {results['references']['A_ft']['sub']:.3f}, prose "
          f"{results['references']['A_ft']['general']:.3f}.", ""]
    for kind in results["kinds"].values():
        md += [f"## {kind['label']}", "", *kind_table(kind, markdown=True), ""]
        md += [f"- {v}" for v in verdict_lines(kind)] + [""]
    if plotted:
        md += ["![results](results.png)", ""]
    md.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    (output / "results.md").write_text("\n".join(md) + "\n")
    return ["results.json", "results.md"] + (["results.png"] if plotted else [])


def _plot(path: Path, results: dict[str, Any]) -> bool:
    """Left: gain recovered per kind and method; right: prose loss of B and of the two merges."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    kinds = list(results["kinds"].values())
    names = [row["method"] for row in kinds[0]["rows"]]
    x = np.arange(len(kinds))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    colors = {"diff α=1": "#aec7e8", "rebasin α=1": "#ffbb78", "diff auto": "#1f77b4", "rebasin auto": "#ff7f0e"}
    lowest = min([0.0] + [100 * r["recovered"] for k in kinds for r in k["rows"] if r.get("recovered") is not None])
    for j, name in enumerate(names):
        vals = []
        for kind in kinds:
            row = next((r for r in kind["rows"] if r["method"] == name), None)
            vals.append(100 * row["recovered"] if row and row.get("recovered") is not None else np.nan)
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, vals, width, label=name, color=colors.get(name))
        for bar, v in zip(bars, vals, strict=True):
            if np.isfinite(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v + (2 if v >= 0 else -2), f"{v:.0f}", ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(min(-20.0, lowest - 12), 115)
    ax.set_xticks(x, [k["label"].split(":")[0] for k in kinds])
    ax.set_ylabel("gain on code recovered (% of B_ft's)")
    ax.set_title("Fine-tune moved onto B (100% = fine-tuning B itself)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    for j, (key, name, color) in enumerate((("base", "B", "#7f7f7f"), ("plain", "½(A+B)", "#d62728"),
                                            ("aligned", "½(π(A)+B)", "#2ca02c"))):
        vals = [k["base"]["general"] if key == "base" else k["merges"].get(key, np.nan) for k in kinds]
        bx.bar(x + (j - 1) * 0.27, vals, 0.27, label=name, color=color)
    bx.set_xticks(x, [k["label"].split(" ")[0] for k in kinds])
    bx.set_ylabel("prose loss (nats/char), lower is better")
    bx.set_title("Weight averaging with B: without and with π", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


__all__ = ["DemoResult", "format_demo", "kind_table", "run_demo_pipeline", "verdict_lines"]
