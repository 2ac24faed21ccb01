"""Entry point: ``python -m benchmarks NAME [--quick] [--device cpu|cuda] [--seeds N] [--json OUT]``.

NAME is a module ``benchmarks/bench_NAME.py``; ``python -m benchmarks --list`` lists them.
Results default to ``benchmarks/results/NAME-<device>.json`` plus a ``.md`` summary (a module
with ``write_report(records, info, json_path)`` writes its own, e.g. with a plot). ``--seeds``
goes to modules whose ``run`` takes ``seeds``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
from pathlib import Path

import torch

from benchmarks.common import device_info, write_results

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="benchmark to run: " + ", ".join(available()))
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, help="seeds to repeat over (benchmarks that take it, e.g. quality)")
    parser.add_argument("--json", type=Path, help="output JSON path")
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        print("\n".join(available()))
        return 0 if args.list else 2
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; choose from {', '.join(available())}")
    module = importlib.import_module(f"benchmarks.bench_{args.name}")
    extra = {"seeds": args.seeds} if args.seeds is not None and "seeds" in inspect.signature(module.run).parameters \
        else {}
    records = module.run(quick=args.quick, device=args.device, **extra)
    info = device_info(args.device)
    suffix = "-quick" if args.quick else ""
    out = args.json or HERE / "results" / f"{args.name}-{args.device}{suffix}.json"
    md = write_results(args.name, records, info, out)
    if hasattr(module, "write_report"):
        md = module.write_report(records, info, out)
    print(md.read_text())
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
