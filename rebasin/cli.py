"""The ``rebasin`` command line: inspect, apply, match, transfer, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from rebasin.errors import RebasinError

EPILOG = """exit codes: 0 ok, 1 internal error, 2 bad usage, 3 bad input file, 4 architecture mismatch,
5 NaN/Inf, 6 output exists, 7 incompatible inputs, 8 write failed (nothing left behind)"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", metavar="FAMILY", help="force the architecture family instead of detecting it "
                   "from config.json (needed for a bare .safetensors file, with --config)")
    p.add_argument("--config", metavar="CONFIG_JSON", help="config.json giving the sizes of a bare .safetensors file")


def _parser() -> argparse.ArgumentParser:
    from rebasin.specs import list_families

    fams = ", ".join(list_families())
    parser = argparse.ArgumentParser(
        prog="rebasin",
        description="Move a fine-tune onto a new base model: weight matching of transformer checkpoints "
                    f"(permutation symmetries) and task-vector transfer. Families: {fams}.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="family, permutation groups, sizes and memory needs of a checkpoint",
                       description="Show a checkpoint's family, its permutation groups with sizes, tensor and "
                                   "parameter counts, and the memory a match and a transfer will need.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory or .safetensors file")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", help="write MODEL with permutations applied (a functionally identical model)",
                       description="Apply a permutations file to MODEL and write the result, atomically, as a "
                                   "Hugging Face model directory (sharded safetensors, config and tokenizer copied).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory or .safetensors file")
    p.add_argument("--perms", required=True, help="permutations .safetensors file (from `rebasin match`)")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--inverse", action="store_true", help="apply the inverse permutations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-size", type=float, default=2.0, metavar="GIB", help="shard size limit (default 2 GiB)")
    _model_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("match", help="find permutations aligning SOURCE to TARGET (weight matching)",
                       description="Weight matching: find the symmetry π (permutations of hidden units, heads "
                                   "and within-head dimensions) with apply(SOURCE, π) as close as possible to "
                                   "TARGET, by coordinate descent with exact assignment per group.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="model to permute (e.g. the old base)")
    p.add_argument("target", help="model to align to (e.g. the new base)")
    p.add_argument("-o", "--output", required=True, help="permutations .safetensors file to write")
    _match_args(p)
    p.add_argument("--report", help="write a JSON report (objective per sweep, per-group statistics)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _model_args(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("transfer", help="move a fine-tune from the old base to the new base",
                       description="Write NEW_BASE + alpha * π(FINETUNED - OLD_BASE) (rebasin mode) or "
                                   "NEW_BASE + alpha * (FINETUNED - OLD_BASE) (diff mode) as a model directory "
                                   "that transformers loads, with the permutations and a report.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-base", required=True, help="A: the base the fine-tune was trained from")
    p.add_argument("--finetuned", required=True, help="A_ft: full fine-tune directory or PEFT (LoRA) adapter directory")
    p.add_argument("--new-base", required=True, help="B: the new base release")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--mode", choices=["rebasin", "diff"], default="rebasin", help="default: rebasin")
    p.add_argument("--alpha", type=float, default=1.0, help="task-vector scale (default 1.0)")
    p.add_argument("--perms", help="reuse a permutations file instead of matching")
    _match_args(p)
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="output dtype (default: the new base's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, memory and disk needs; write nothing")
    p.add_argument("--verify", action="store_true", help="check on random inputs that π(A) computes what A does")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("demo", help="end-to-end demo on small ViTs trained here (nothing downloaded)",
                       description="Train (and cache) two small ViTs from different seeds on scikit-learn's "
                                   "digits, fine-tune one on a sub-task, transfer the fine-tune to the other in "
                                   "diff and rebasin modes, and print and plot the accuracies.")
    p.add_argument("-o", "--output", default="rebasin-demo", help="output folder for the table and plot")
    p.add_argument("--cache", default=None, help="model cache folder (default ~/.cache/rebasin/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def _match_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="auto", help="assignment solver: auto (default: the fastest exact one for "
                   "the size and device), scipy, lapx, emd, certified, sinkhorn (approximate)")
    p.add_argument("--max-sweeps", type=int, default=20, help="coordinate-descent sweeps at most (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the group visiting order (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from rebasin.model import open_model
    from rebasin.summary import format_summary, summarize

    s = summarize(open_model(args.model, family=args.arch, config=args.config))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from rebasin.apply import apply_checkpoint
    from rebasin.model import open_model
    from rebasin.permutation import load_perms

    model = open_model(args.model, family=args.arch, config=args.config)
    perms, _meta = load_perms(args.perms)
    out = apply_checkpoint(model, perms, args.output, inverse=args.inverse, overwrite=args.overwrite,
                           max_shard_bytes=int(args.max_shard_size * 2**30), perms_file=args.perms)
    print(f"wrote {out}")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    from rebasin.matching.cli import run_match

    return run_match(args)


def cmd_transfer(args: argparse.Namespace) -> int:
    from rebasin.transfer import run_transfer

    return run_transfer(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from rebasin.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RebasinError as exc:
        print(f"rebasin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rebasin: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
