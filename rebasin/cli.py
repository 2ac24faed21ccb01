"""The ``rebasin`` command line: inspect, apply, match, transfer, demo.

The one home of argument parsing and printing: the library (``rebasin.match``,
``rebasin.transfer``, ...) returns results and never prints. Every option is validated when
parsed (exit 2 with the valid values); a :class:`~rebasin.errors.RebasinError` becomes one
line on stderr and its exit code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from rebasin.errors import EXIT_CODES_HELP, RebasinError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MODES = ("rebasin", "diff")
SYMMETRIES = ("full", "perm")  # rebasin.symmetry.SYMMETRIES, default first


# ---- option types: each rejects a bad value at parse time (argparse turns ValueError into exit 2) ----
def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def alpha_value(text: str) -> float | str:
    from rebasin.transfer import ALPHA_MODES, check_alpha_value

    try:
        return check_alpha_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {', '.join(ALPHA_MODES)} or a finite number, got {text!r}") \
            from None


def alpha_target(text: str) -> str:
    from rebasin.calibrate import TARGETS

    if text not in TARGETS:
        raise argparse.ArgumentTypeError(f"must be {' or '.join(TARGETS)}, got {text!r}")
    return text


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def device_choice(text: str) -> str:
    if text not in DEVICES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(DEVICES)})")
    if text == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("cuda: this torch build has no usable CUDA device (use cpu or auto)")
    return text


def _solver_names() -> list[str]:
    from rebasin.solvers import solver_names

    return solver_names()


# ---- parser ---------------------------------------------------------------------------------------
def _sub(sub: Any, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=description, epilog=EXIT_CODES_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", metavar="FAMILY", help="force the architecture family instead of detecting it "
                   "from config.json (needed for a bare .safetensors file, with --config)")
    p.add_argument("--config", metavar="CONFIG_JSON", help="config.json giving the sizes of a bare .safetensors file")


def _match_args(p: argparse.ArgumentParser) -> None:
    solvers = _solver_names()
    p.add_argument("--solver", default="auto", choices=solvers, metavar="NAME",
                   help=f"assignment solver: {', '.join(solvers)} (default auto: the fastest exact one for the "
                        "size and device; sinkhorn is approximate)")
    p.add_argument("--max-sweeps", type=positive_int, default=20, metavar="N",
                   help="coordinate-descent sweeps at most (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the group visiting order and, in transfer, of the "
                   "calibration's probes (default 0)")
    p.add_argument("--device", type=device_choice, default="auto", metavar="DEVICE",
                   help=f"{', '.join(DEVICES)} (default auto: cuda when available)")
    _symmetries_arg(p, "symmetries matched: full (default: permutations plus the exact within-head orthogonal maps "
                       "— V/O per KV head, RoPE frequency-pair rotations, Q/K maps without RoPE) or perm "
                       "(permutations only)")
    _memory_arg(p)


def _memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=positive_float, metavar="GIB",
                   help="memory budget in GiB (default: what the machine has free now, minus 10%% or at least "
                        "0.5 GiB): cache the weights when the predicted peak fits, else stream them; refused "
                        "(exit 7, before any work) when even streaming does not fit")


def _symmetries_arg(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument("--symmetries", choices=SYMMETRIES, default="full", help=help_)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``rebasin: error: <command>: <message>`` (exit 2); ``-h`` has the usage."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("rebasin").strip()
        self.exit(2, f"rebasin: error: {where + ': ' if where else ''}{message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from rebasin.specs import list_families

    parser = _Parser(
        prog="rebasin",
        description="Move a fine-tune onto a new base model: weight matching of transformer checkpoints "
                    f"(permutation symmetries) and task-vector transfer. Families: {', '.join(list_families())}.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(sub, "inspect", "family, permutation groups, sizes and memory needs of a checkpoint",
             "Show a checkpoint's family, its permutation groups with sizes, tensor and parameter counts, "
             "and the memory a match and a transfer will need.")
    p.add_argument("model", help="model directory or .safetensors file")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = _sub(sub, "apply", "write MODEL with permutations applied (a functionally identical model)",
             "Apply a permutations file to MODEL and write the result, atomically, as a Hugging Face model "
             "directory (sharded safetensors, config and tokenizer copied).")
    p.add_argument("model", help="model directory or .safetensors file")
    p.add_argument("--perms", required=True, help="permutations .safetensors file (from `rebasin match`)")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--inverse", action="store_true", help="apply the inverse permutations")
    _symmetries_arg(p, "full (default): apply everything the file holds; perm: its permutations only, leaving "
                       "out its rotations")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--max-shard-size", type=positive_float, default=2.0, metavar="GIB",
                   help="shard size limit in GiB, > 0 (default 2)")
    _memory_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_apply)

    p = _sub(sub, "match", "find permutations aligning SOURCE to TARGET (weight matching)",
             "Weight matching: find the symmetry π (permutations of hidden units, heads and within-head "
             "dimensions) with apply(SOURCE, π) as close as possible to TARGET, by coordinate descent with "
             "exact assignment per group.")
    p.add_argument("source", help="model to permute (e.g. the old base)")
    p.add_argument("target", help="model to align to (e.g. the new base)")
    p.add_argument("-o", "--output", required=True, help="permutations .safetensors file to write")
    _match_args(p)
    p.add_argument("--report", help="write a JSON report (objective per sweep, per-group statistics)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _model_args(p)
    p.set_defaults(func=cmd_match)

    p = _sub(sub, "transfer", "move a fine-tune from the old base to the new base",
             "Write NEW_BASE + alpha * π(FINETUNED - OLD_BASE) (rebasin mode) or NEW_BASE + alpha * "
             "(FINETUNED - OLD_BASE) (diff mode) as a model directory that transformers loads, with the "
             "permutations and a report.")
    p.add_argument("--old-base", required=True, help="A: the base the fine-tune was trained from")
    p.add_argument("--finetuned", required=True, help="A_ft: full fine-tune directory or PEFT (LoRA) adapter directory")
    p.add_argument("--new-base", required=True, help="B: the new base release")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--mode", choices=MODES, default="rebasin", help="default: rebasin")
    p.add_argument("--alpha", type=alpha_value, default="auto",
                   help="task-vector scale: auto (default: calibrated without data, minimising KL(A_ft ‖ output) on "
                        "probe inputs), auto-layer (one α per layer), or a finite number (its verdict is still "
                        "measured when the inputs are model directories)")
    p.add_argument("--probe-data", metavar="PATH", help="unlabeled probe inputs for calibration: a text file (one "
                   "example a line) or a .safetensors of input tensors (default: sampled from the fine-tune for "
                   "causal LMs, synthetic otherwise)")
    p.add_argument("--probe-count", type=positive_int, metavar="N",
                   help="probe examples (default 32; 64 for models of 100M parameters and more, 128 for image "
                        "classifiers)")
    p.add_argument("--probe-length", type=positive_int, metavar="T",
                   help="tokens per synthetic probe (default 128; 16 for models of 100M parameters and more)")
    p.add_argument("--alpha-target", type=alpha_target, default="finetune", metavar="finetune|transferred",
                   help="what calibration makes the output imitate: finetune (default: A_ft itself) or "
                        "transferred (B's outputs moved by the fine-tune's change over A: keeps B where the "
                        "fine-tune did not act, sees gains between independent bases; one more forward: A's)")
    p.add_argument("--require-gain", type=fraction, metavar="X", help="fail (exit 7, nothing written) when "
                   "calibration's relative divergence (KL; NMSE for headless models) reduction over the new base "
                   "is below X (e.g. 0.1)")
    p.add_argument("--no-verdict", action="store_true",
                   help="with a numeric --alpha: skip measuring its verdict (no model is loaded as a module; "
                        "the plain arithmetic, as fast as the files can be read and written)")
    p.add_argument("--perms", help="rebasin mode: reuse a permutations file (from `rebasin match` of the same "
                   "old and new base) instead of matching")
    _match_args(p)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="output dtype (default: the new base's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, memory and disk needs; write nothing")
    p.add_argument("--verify", action="store_true", help="check on random inputs that π(A) computes what A does")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_transfer, parser=p)

    p = _sub(sub, "demo", "end-to-end demo on small decoders trained here (nothing downloaded)",
             "Train (and cache) small Llama-style decoders (RoPE, GQA) on Python's own docstrings, fine-tune "
             "one on Python code, and move the fine-tune onto three kinds of new base — the same lineage, "
             "the same re-released in another unit order, an independent seed — in diff and rebasin modes, "
             "at α = 1 and calibrated; print the table and verdicts, write results.md/json/png.")
    p.add_argument("-o", "--output", default="rebasin-demo", help="output folder for the table and plot")
    p.add_argument("--cache", default=None, help="model cache folder (default $REBASIN_CACHE/toy, else "
                   "~/.cache/rebasin/toy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data orders and probes (default 0)")
    p.set_defaults(func=cmd_demo)
    return parser


# ---- commands -------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from rebasin.model import open_model
    from rebasin.summary import format_summary, summarize

    s = summarize(open_model(args.model, family=args.arch, config=args.config))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from rebasin.apply import apply_checkpoint
    from rebasin.io.perms_file import load_perms
    from rebasin.model import open_model

    model = open_model(args.model, family=args.arch, config=args.config)
    perms, _meta = load_perms(args.perms)
    out = apply_checkpoint(model, perms, args.output, inverse=args.inverse, overwrite=args.overwrite,
                           max_shard_bytes=int(args.max_shard_size * 2**30), perms_file=args.perms, progress=True,
                           symmetries=args.symmetries, memory=args.memory)
    print(f"wrote {out}")
    return 0


def format_match(result: Any, spec: Any = None) -> str:
    """The per-sweep objective, per-group table and time split of a :class:`MatchResult`.

    ``objective_history`` holds the start (identity plus the global groups' initial guess) and
    then one value per sweep. ``spec`` (the source's) marks groups fixed to the identity.
    """
    gain = result.objective - result.objective_identity
    start, *sweeps = result.objective_history
    fixed = set(spec.fixed_groups) if spec is not None else set()
    lines = [
        f"objective  identity {result.objective_identity:.6g}  ->  found {result.objective:.6g}  "
        f"(+{gain:.4g}; {result.sweeps} sweep(s), {'converged' if result.converged else 'max sweeps reached'})",
        f"per sweep  start {start:.6g}" + "".join(f"  {i}: {j:.6g}" for i, j in enumerate(sweeps, 1)),
        f"{'group':<28} {'kind':<9} {'size':>6} {'moved':>7} {'cos before':>11} {'cos after':>10}"
        + (f" {'rotation':>9}" if (rotated := any(getattr(g, "rotation", 0.0) for g in result.groups)) else ""),
    ]
    for g in result.groups:
        lines.append(f"{g.name:<28} {g.kind:<9} {g.size:>6} {g.moved:>7.1%} {g.cos_before:>11.4f} {g.cos_after:>10.4f}"
                     + (f" {getattr(g, 'rotation', 0.0):>9.3f}" if rotated else "")
                     + ("  fixed (headless)" if g.name in fixed else ""))
    if fixed and spec.headless:
        lines.append(f"headless: {spec.headless}; {', '.join(sorted(fixed))} kept at the identity")
    lines.append("time (s)   " + "  ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    return "\n".join(lines)


def cmd_match(args: argparse.Namespace) -> int:
    from rebasin.io.perms_file import save_perms
    from rebasin.io.writer import atomic_output_files, ensure_output_free
    from rebasin.matching.api import match
    from rebasin.model import open_model

    out = Path(args.output)
    ensure_output_free(out, args.overwrite)  # before the work: an existing or unwritable output
    if args.report:
        ensure_output_free(Path(args.report), True)
    source = open_model(args.source, family=args.arch, config=args.config)
    target = open_model(args.target, family=args.arch, config=args.config)
    result = match(source, target, solver=args.solver, max_sweeps=args.max_sweeps, seed=args.seed,
                   device=args.device, progress=True, symmetries=args.symmetries, memory=args.memory)
    extra = {"objective_identity": repr(result.objective_identity), "objective": repr(result.objective),
             "solver": args.solver, "seed": str(args.seed), "symmetries": args.symmetries}
    files = [(out, lambda p: save_perms(p, result.perms, family=source.family, source=str(source.path),
                                        target=str(target.path), extra=extra), args.overwrite)]
    if args.report:
        report = {"source": str(source.path), "target": str(target.path), "family": source.family,
                  "perms": str(out), "headless": source.spec.headless, "fixed_groups": source.spec.fixed_groups,
                  **result.to_dict()}
        files.append((Path(args.report), lambda p: p.write_text(json.dumps(report, indent=2) + "\n"), True))
    atomic_output_files(files)  # both or neither
    print(format_match(result, source.spec))
    print(f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


def format_transfer(report: dict[str, Any], output: Path) -> str:
    """What a finished transfer prints: what was written, the alignment and verification lines."""
    from rebasin.report import settled_on, target_name, tensor_counts

    r = report
    lines = []
    if r.get("verify"):
        lines.append(f"verify: max |π(A)(x) − A(x)| = {r['verify']['max_abs_diff']:.3g}")
    if r.get("match"):
        m = r["match"]
        lines.append(f"alignment objective: identity {m['objective_identity']:.6g} -> matched {m['objective']:.6g}")
    elif r.get("alignment"):
        m = r["alignment"]
        lines.append(f"alignment objective: identity {m['objective_identity']:.6g} -> given π {m['objective']:.6g}")
        if m["objective"] < m["objective_identity"]:
            lines.append("warning: the given permutations make A less like B than no permutation at all; "
                         "were they matched for another pair? (`rebasin match OLD_BASE NEW_BASE` finds this pair's)")
    if r.get("lineage"):
        lines.append(r["lineage"])
    c = r.get("calibration")
    if not c and r.get("verdict_skipped"):
        lines.append(f"verdict: not measured ({r['verdict_skipped']})")
    if c:
        lines.append(f"calibration: {c['divergence'].upper()}({target_name(c)} ‖ B) {c['kl_base']:.4g} -> "
                     f"{c['kl_chosen']:.4g} "
                     f"at α = {c['alpha']:.3g} ({c['seconds']:.1f} s, {c['probes']['count']} {c['probes']['kind']} "
                     "probes" + (f"; {settled_on(c)} of them settled it)" if settled_on(c) else ")"))
        lines.append(c["line"])
    alpha = "per layer" if c and c.get("alphas") else f"{r['alpha']:.3g}"
    lines.append(f"wrote {output} ({r['mode']} mode, α={alpha}; tensors: {tensor_counts(r)})")
    if r.get("files_from_b"):
        lines.append(f"copied from B: {', '.join(r['files_from_b'])}")
    return "\n".join(lines)


def format_plan(plan: dict[str, Any]) -> str:
    lines = ["dry run: nothing written"]
    lines += [f"  {key:<13} {plan[key]}" for key in ("family", "mode", "groups", "permutations", "alpha",
                                                      "peak_memory", "disk", "output") if key in plan]
    lines.append("  files         " + "\n                ".join(plan["files"]))
    return "\n".join(lines)


def cmd_transfer(args: argparse.Namespace) -> int:
    from rebasin.transfer import transfer

    result = transfer(args.old_base, args.finetuned, args.new_base, args.output, mode=args.mode, alpha=args.alpha,
                      perms=args.perms, solver=args.solver, max_sweeps=args.max_sweeps, seed=args.seed,
                      device=args.device, dtype=args.dtype, probe_data=args.probe_data, probe_count=args.probe_count,
                      probe_length=args.probe_length, probe_seed=args.seed, alpha_target=args.alpha_target,
                      require_gain=args.require_gain,
                      check_alpha=not args.no_verdict, overwrite=args.overwrite, verify=args.verify,
                      dry_run=args.dry_run, progress=True, symmetries=args.symmetries, memory=args.memory)
    print(format_plan(result.report["plan"]) if args.dry_run else format_transfer(result.report, result.output))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print("rebasin demo: builds small decoders (first run only, ~1.5 min on 2 idle cores), then matches, calibrates, "
          "transfers and evaluates", flush=True)
    import torch

    from rebasin.demo import format_demo, run_demo_pipeline
    from rebasin.toy.train import pick_threads

    torch.set_num_threads(pick_threads())
    quick = os.environ.get("REBASIN_DEMO_QUICK", "") not in ("", "0")
    res = run_demo_pipeline(args.output, args.cache, args.seed, preset="tiny" if quick else "full",
                            log=lambda m: print(m, flush=True))
    print()
    print(format_demo(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_verdict", False) and isinstance(args.alpha, str):
        args.parser.error("--no-verdict needs a numeric --alpha (auto and auto-layer are the calibration)")
    if getattr(args, "no_verdict", False) and args.require_gain is not None:
        args.parser.error("--require-gain needs the verdict that --no-verdict skips")
    if getattr(args, "no_verdict", False) and getattr(args, "alpha_target", "finetune") != "finetune":
        args.parser.error("--alpha-target is the calibration's, which --no-verdict skips")
    if getattr(args, "perms", None) and getattr(args, "mode", None) == "diff":
        args.parser.error("--perms applies to rebasin mode only (diff mode adds the task vector unpermuted)")
    if not getattr(args, "func", None):
        parser.error("a command is needed: inspect, apply, match, transfer or demo")
    try:
        return int(args.func(args) or 0)
    except RebasinError as exc:
        _close_progress_bars()
        print(f"rebasin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _close_progress_bars()
        print("\nrebasin: interrupted; nothing was written", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End any progress bar a failed command left open, so the error gets a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
