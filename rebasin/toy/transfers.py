"""Run the public transfer API on a pair set and measure every result (shared by the demo and the study).

For one kind of new base B: every requested :class:`Method` (``diff``/``rebasin`` × α = a number,
"auto" or "auto-layer") is written with :func:`rebasin.transfer.transfer` and evaluated on both
tasks, next to B and B_ft. The first rebasin transfer runs the weight matching; the others reuse
its ``permutations.safetensors``. A method that raises is recorded with its error and skipped.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebasin.toy.evaluate import evaluate, gain_recovered, merge
from rebasin.toy.pairs import PairSet

HELPED = 0.10  # fraction of the fine-tune gain a transfer must recover to count as "it helped"
NEAR_B = 0.10  # |fraction| under which a transfer counts as "≈ B"


@dataclass(frozen=True)
class Method:
    """One way to move the fine-tune: ``mode``, ``alpha`` and ``symmetries`` exactly as
    :func:`rebasin.transfer.transfer` takes them."""

    mode: str
    alpha: float | str
    symmetries: str = "full"
    target: str = "finetune"  # the calibration's (``alpha_target``)
    probes: str = ""  # the calibration's probe budget: "" the model's default, or a key of BUDGETS

    @property
    def name(self) -> str:
        a = self.alpha if isinstance(self.alpha, str) else f"α={self.alpha:g}"
        return (f"{self.mode} {a}" + (" (perm only)" if self.symmetries == "perm" else "")
                + (" →B" if self.target == "transferred" else "") + (f" [{self.probes}]" if self.probes else ""))

    @property
    def slug(self) -> str:
        a = self.alpha if isinstance(self.alpha, str) else f"a{self.alpha:g}"
        return (f"{self.mode}-{a}" + ("-perm" if self.symmetries == "perm" else "")
                + ("-transferred" if self.target == "transferred" else "") + (f"-{self.probes}" if self.probes else ""))


BUDGETS = {"≥100M probes": 1.0, "half ≥100M probes": 0.5}  # the default probe shape of a model of
# rebasin.calibrate.LARGE_PARAMS parameters and more, with this share of its probe count (see probe_budget)


def probe_budget(budget: str, config: dict[str, Any]) -> dict[str, int]:
    """``probe_count`` and ``probe_length`` of ``budget`` (a key of :data:`BUDGETS`) for a model with
    checkpoint ``config``: what calibration would use were the model ≥ ``LARGE_PARAMS`` parameters."""
    from rebasin.calibrate import LARGE_PARAMS, probe_shape

    count, length = probe_shape(LARGE_PARAMS, config=config)
    return {"probe_count": max(1, round(count * BUDGETS[budget])), "probe_length": length}


FIXED = (Method("diff", 1.0), Method("rebasin", 1.0))
AUTO = (Method("diff", "auto"), Method("rebasin", "auto"))
LAYER = (Method("diff", "auto-layer"), Method("rebasin", "auto-layer"))
PERM_ONLY = (Method("rebasin", 1.0, "perm"), Method("rebasin", "auto", "perm"))  # --symmetries perm
TRANSFERRED = (Method("diff", "auto", target="transferred"),  # --alpha-target transferred
               Method("rebasin", "auto", target="transferred"))
BUDGET = tuple(Method("rebasin", "auto", probes=b) for b in BUDGETS)  # the ≥100M probe shape on small models


@dataclass
class KindResult:
    """Everything measured for one kind of new base.

    ``base`` and ``upper`` are B's and B_ft's metrics (``{"sub", "general"}``); ``rows`` one dict
    per method (keys: method, mode, alpha_requested, alpha, alphas, metrics, recovered, cost,
    calibration, lineage, seconds, path, error; ``match``: objective, identity objective and the
    size-weighted mean cosine of matched units, on the row that ran the match for its symmetries);
    ``merges`` B's-task metric of ½(A + B) and ½(π(A) + B).
    """

    kind: str
    base: dict[str, float]
    upper: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    perms: Path | None = None
    match: dict[str, Any] | None = None
    merges: dict[str, float] = field(default_factory=dict)

    def row(self, method: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["method"] == method), None)


def verdict_check(row: dict[str, Any], fixed: dict[str, Any] | None) -> dict[str, Any] | None:
    """Was the calibration's verdict right?  None without a calibration.

    "carries over" is right when the written model recovered ≥ :data:`HELPED` of the gain;
    "does not carry over" is right when the written model is ≈ B (|recovered| < :data:`NEAR_B`)
    and the same mode at α = 1 (``fixed``, if measured) did not help either.
    """
    cal = row.get("calibration")
    rec = row.get("recovered")
    if not cal or rec is None:
        return None
    helped = rec >= HELPED
    if cal["verdict"] == "carries over":
        return {"helped": helped, "right": helped}
    fixed_helped = bool(fixed and fixed.get("recovered") is not None and fixed["recovered"] >= HELPED)
    return {"helped": helped, "right": abs(rec) < NEAR_B and not fixed_helped, "alpha_one_helped": fixed_helped}


def run_kind(ps: PairSet, kind: str, methods: Sequence[Method], out: Path, *, merges: bool = False,
             evaluated: dict[Path, dict[str, float]] | None = None, options: dict[str, Any] | None = None,
             progress: bool = False, log: Callable[[str], None] | None = None) -> KindResult:
    """Transfer A_ft onto ``ps.B[kind]`` with every method into ``out/<kind>-<method>``; evaluate all.

    ``evaluated`` caches metrics by directory across calls; ``options`` are passed on to every
    :func:`rebasin.transfer.transfer` call (e.g. ``probe_count``). With ``merges``, also evaluates
    ½(A + B) and ½(π(A) + B) on B's task (π from the first rebasin transfer).
    """
    from rebasin.io.checkpoint import open_checkpoint
    from rebasin.io.perms_file import load_perms
    from rebasin.transfer import transfer

    cache = evaluated if evaluated is not None else {}
    r = ps.recipe

    def ev(path: Path) -> dict[str, float]:
        if path not in cache:
            cache[path] = evaluate(r, path)
        return cache[path]

    b, b_ft = ps.B[kind], ps.B_ft[kind]
    res = KindResult(kind, ev(b), ev(b_ft))
    perms_by: dict[str, Path] = {}  # π per symmetries setting, from the first rebasin transfer that matched
    order = sorted(methods, key=lambda m: (m.mode != "rebasin", not isinstance(m.alpha, float), m.alpha != 1.0))
    a_config = open_checkpoint(ps.A).config if any(m.probes for m in methods) else {}  # for probe budgets
    for m in order:
        dest = out / f"{kind}-{m.slug}"
        row: dict[str, Any] = {"method": m.name, "mode": m.mode, "alpha_requested": m.alpha, "path": str(dest)}
        if log is not None:
            log(f"{kind}: transfer {m.name}")
        t0 = time.perf_counter()
        try:
            budget = probe_budget(m.probes, a_config) if m.probes else {}
            t = transfer(ps.A, ps.A_ft, b, dest, mode=m.mode, alpha=m.alpha, overwrite=True, progress=progress,
                         perms=perms_by.get(m.symmetries) if m.mode == "rebasin" else None,
                         symmetries=m.symmetries, alpha_target=m.target, **{**(options or {}), **budget})
        except Exception as exc:  # a method that fails is a result too: it is reported, the others still run
            row.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
            res.rows.append(row)
            if log is not None:
                log(f"{kind}: {m.name} failed: {row['error']}")
            continue
        row["seconds"] = time.perf_counter() - t0
        if m.mode == "rebasin" and m.symmetries not in perms_by:
            perms_by[m.symmetries] = Path(t.output) / "permutations.safetensors"
            row["match"] = match_summary(t.report.get("match"))
            if m.symmetries == "full":
                res.perms, res.match = perms_by["full"], t.report.get("match")
        cal = t.report.get("calibration")
        row.update(alpha=cal["alpha"] if cal else float(m.alpha), alphas=cal.get("alphas") if cal else None,
                   calibration=cal, lineage=t.report.get("lineage"))
        metrics = ev(Path(t.output))
        row.update(metrics=metrics, recovered=gain_recovered(r, res.base["sub"], metrics["sub"], res.upper["sub"]),
                   cost=_cost(r.higher_is_better, res.base["general"], metrics["general"]))
        res.rows.append(row)
    rank = {m.name: i for i, m in enumerate(methods)}
    res.rows.sort(key=lambda row: rank[row["method"]])
    for row in res.rows:
        fixed = res.row(f"{row['mode']} α=1")
        row["verdict_check"] = verdict_check(row, fixed) if "error" not in row else None
    if merges and res.perms is not None:
        perms, _ = load_perms(res.perms)
        task = toy_general(r)
        res.merges = {"plain": task(merge(r, ps.A, b)), "aligned": task(merge(r, ps.A, b, perms))}
    return res


def match_summary(match: dict[str, Any] | None) -> dict[str, float] | None:
    """Objective, identity objective and size-weighted mean cosine of matched units of a match report."""
    from rebasin.transfer import unit_means

    if not match:
        return None
    return {"objective": match["objective"], "objective_identity": match["objective_identity"],
            "cos_after": unit_means(match)[1]}


def _cost(higher_is_better: bool, base: float, value: float) -> float:
    """How much worse than B a model is on B's own task (positive = worse), in the metric's units."""
    return base - value if higher_is_better else value - base


def toy_general(r: Any) -> Callable[[Any], float]:
    """A function: model -> its metric on the general (B's original) task."""
    def f(model: Any) -> float:
        return evaluate(r, model)["general"]
    return f
