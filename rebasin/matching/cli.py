"""``rebasin match``: glue between the CLI, the engine, and the permutations file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rebasin.io.writer import atomic_output_file, ensure_output_free
from rebasin.matching.api import match
from rebasin.matching.engine import MatchResult
from rebasin.model import open_model
from rebasin.permutation import save_perms


def format_result(result: MatchResult) -> str:
    gain = result.objective - result.objective_identity
    lines = [
        f"objective  identity {result.objective_identity:.6g}  ->  found {result.objective:.6g}  "
        f"(+{gain:.4g}; {result.sweeps} sweep(s), {'converged' if result.converged else 'max sweeps reached'})",
        "per sweep  " + "  ".join(f"{j:.6g}" for j in result.objective_history),
        f"{'group':<28} {'kind':<9} {'size':>6} {'moved':>7} {'cos before':>11} {'cos after':>10}",
    ]
    for g in result.groups:
        lines.append(f"{g.name:<28} {g.kind:<9} {g.size:>6} {g.moved:>7.1%} {g.cos_before:>11.4f} {g.cos_after:>10.4f}")
    lines.append("time (s)   " + "  ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    return "\n".join(lines)


def run_match(args: argparse.Namespace) -> int:
    out = Path(args.output)
    ensure_output_free(out, args.overwrite)
    source = open_model(args.source, family=args.arch, config=args.config)
    target = open_model(args.target, family=args.arch, config=args.config)
    result = match(source, target, solver=args.solver, max_sweeps=args.max_sweeps, seed=args.seed, device=args.device)
    extra = {"objective_identity": repr(result.objective_identity), "objective": repr(result.objective),
             "solver": args.solver, "seed": str(args.seed)}
    atomic_output_file(out, lambda p: save_perms(p, result.perms, family=source.family, source=str(source.path),
                                                 target=str(target.path), extra=extra), overwrite=args.overwrite)
    if args.report:
        report = {"source": str(source.path), "target": str(target.path), "family": source.family,
                  "perms": str(out), **result.to_dict()}
        atomic_output_file(Path(args.report), lambda p: p.write_text(json.dumps(report, indent=2) + "\n"),
                           overwrite=True)
    print(format_result(result))
    print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0
