"""Transfer a fine-tune to a new base: ``B + α·π(A_ft − A)`` (rebasin) or ``B + α·(A_ft − A)`` (diff).

Everything streams tensor by tensor (A, A_ft and B are read lazily); arithmetic is float32
and the result takes B's dtype (or ``dtype``). The output directory is written atomically:
model shards + index (or a PEFT adapter when the fine-tune is one), B's config, tokenizer
and generation files, ``permutations.safetensors`` (rebasin mode), ``report.json``,
``report.md`` and ``alignment.png``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rebasin.compat import check_same_architecture
from rebasin.distributed import is_main_process
from rebasin.errors import IncompatibleInputsError, InputFileError, RebasinError, RefusedError
from rebasin.estimate import estimate_match, estimate_write, human
from rebasin.hf import prefetch_model_code
from rebasin.io.checkpoint import DTYPES as CK_DTYPES
from rebasin.io.checkpoint import open_checkpoint
from rebasin.io.perms_file import load_perms, save_perms
from rebasin.io.stream_writer import Planned, StreamingCheckpointWriter
from rebasin.io.writer import CheckpointWriter, atomic_output_dir, copy_aux_files, copy_model_files, ensure_output_free
from rebasin.lora import ADAPTER_CONFIG, is_adapter_dir, lora_site, permute_lora, read_adapter_config
from rebasin.model import Model, open_model
from rebasin.permutation import has_rotations, identity, permute_tensor, restrict, validate
from rebasin.report import REPORT_FILES, write_report
from rebasin.streaming import check_finite_chunk, permuted_rows, return_freed_memory, row_chunks
from rebasin.symmetry import gather
from rebasin.vocab import VocabMap, vocab_map

ALPHA_MODES = ("auto", "auto-layer")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PERMS_FILE = "permutations.safetensors"


@dataclass
class TransferResult:
    output: Path
    report: dict[str, Any]
    perms: dict[str, torch.Tensor] | None = None
    files: list[str] = field(default_factory=list)


def _vocab_axes(spec_a: Model, b: Model, name: str) -> int | None:
    """The invariant axis on which A's and B's shapes differ (vocabulary), or None if equal."""
    sa, sb = spec_a.spec.shapes[name], b.spec.shapes[name]
    if sa == sb:
        return None
    diff = [i for i, (x, y) in enumerate(zip(sa, sb, strict=True)) if x != y] if len(sa) == len(sb) else [-1]
    if len(diff) != 1 or diff[0] < 0 or spec_a.spec.axes[name][diff[0]] is not None:
        raise IncompatibleInputsError(f"shape {list(sa)} in the old base vs {list(sb)} in the new base",
                                      file=b.path, tensor=name)
    return diff[0]


def check_alpha_value(alpha: float | str) -> float | str:
    """"auto", "auto-layer" or a finite number (ValueError otherwise)."""
    if isinstance(alpha, str):
        if alpha in ALPHA_MODES:
            return alpha
        try:
            alpha = float(alpha)
        except ValueError:
            raise ValueError(f"alpha must be {', '.join(ALPHA_MODES)} or a finite number, got {alpha!r}") from None
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def unit_means(match_report: dict[str, Any]) -> tuple[float, float]:
    """(fraction of units moved, mean cosine of matched units) of a match report, weighted by group size
    over the groups that can move (size > 1)."""
    groups = [g for g in match_report.get("groups", []) if g["size"] > 1]
    total = max(1, sum(g["size"] for g in groups))
    return (sum(g["moved"] * g["size"] for g in groups) / total,
            sum(g["cos_after"] * g["size"] for g in groups) / total)


def same_lineage_line(match_report: dict[str, Any] | None, threshold: float = 0.01,
                      reordered_cos: float = 0.8) -> str | None:
    """What the match says about how B relates to A, or None when it says nothing clear.

    "B continues A" when matching moved (almost) no unit: then diff and rebasin modes agree.
    "B is A's lineage with its units re-ordered" when most units moved yet the matched units
    are nearly parallel (size-weighted mean cosine ≥ ``reordered_cos``; independently trained
    models stay far below it): rebasin mode is needed, diff mode adds τ in the wrong coordinates.
    """
    if not match_report or not match_report.get("groups"):
        return None
    moved, cos = unit_means(match_report)
    if moved <= threshold:
        return f"B continues A: matching returned the identity ({moved:.1%} of units moved); diff and rebasin agree"
    if moved >= 0.5 and cos >= reordered_cos:
        return (f"B is A's lineage with its units re-ordered ({moved:.0%} of units moved, matched units' cosine "
                f"{cos:.2f}): use rebasin mode; diff mode would add the task vector in the wrong coordinates")
    return None


def _have_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def memory_plan(a: Model, b: Model, mode: str, adapter: bool, perms_file: str | None, device: str = "auto",
                memory: float | None = None, calibration: Callable[[], int] | None = None) -> dict[str, Any]:
    """Predicted peak RSS and time of this transfer (:mod:`rebasin.estimate`), the memory mode the
    match will use (streaming or cached) and whether it fits the budget; ``calibration`` gives the
    α calibration's peak when the transfer calibrates."""
    from rebasin.estimate import budget_bytes
    from rebasin.matching.api import resolve_device

    budget, how = budget_bytes(memory)
    write = estimate_write(a, b, mode == "rebasin", [n for n in a.spec.shapes
                                                     if n in b.spec.shapes and a.spec.shapes[n] != b.spec.shapes[n]])
    peak, seconds, mem_mode, detail = write.peak, write.seconds, "streaming", "writes shard by shard"
    if adapter:
        peak, seconds = write.parts["base"], 1.0
    if mode == "rebasin" and not perms_file:
        world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        spec = replace(a.spec, axes={n: ax for n, ax in a.spec.axes.items()
                                     if n in b.spec.shapes and a.spec.shapes[n] == b.spec.shapes[n]})
        est = estimate_match(spec, a, b, resolve_device(device), world)
        mem_mode = "cached" if est.cached <= budget else "streaming"
        peak = max(peak, est.peak(mem_mode))
        seconds += est.seconds(2)
        detail = (f"the match {'caches both models' if mem_mode == 'cached' else 'streams'} (cached: "
                  f"{human(est.cached)}, streaming: {human(est.streaming)}); ~{est.seconds_first_sweep:.0f} s per sweep"
                  + (f" on {world} ranks" if world > 1 else ""))
    calib = calibration() if calibration is not None else 0
    if calib:
        detail += f"; α calibration {human(calib)}"
        peak = max(peak, calib)
    fits = peak <= budget
    line = f"{human(peak)} predicted ({detail}); budget {human(budget)} ({how})"
    return {"peak_bytes": peak, "budget_bytes": budget, "budget_from": how, "memory_mode": mem_mode, "fits": fits,
            "seconds": seconds, "line": line, "calibration_bytes": calib}


def plan(a: Model, b: Model, mode: str, adapter: bool, solver: str, perms_file: str | None,
         alpha: float | str, *, device: str = "auto", memory: float | None = None,
         calibration: Callable[[], int] | None = None, output: Path | None = None,
         overwrite: bool = False, alpha_target: str = "finetune") -> dict[str, Any]:
    mem = memory_plan(a, b, mode, adapter, perms_file, device, memory, calibration)
    files = ([ADAPTER_CONFIG, "adapter_model.safetensors"] if adapter else ["model.safetensors (sharded + index "
             "when over the shard limit)"]) + [("tokenizer files from B" if adapter else
                                                "every non-weight file of B's directory (config, tokenizer, ...)"),
                                               "report.json", "report.md"]
    if mode == "rebasin":
        files.insert(1, PERMS_FILE)
        files.append("alignment.png")
    if isinstance(alpha, str):
        files.append("alpha.png")
    return {
        "family": a.family, "mode": mode, "groups": len(a.spec.groups),
        "permutations": perms_file or (f"match A -> B with solver '{solver}'" if mode == "rebasin" else "none"),
        "alpha": (f"{alpha}: calibrated on probe inputs (needs transformers; loads A_ft, "
                  f"{'then A, ' if alpha_target == 'transferred' else ''}then B, as modules)"
                  if isinstance(alpha, str) else f"{alpha:g}"),
        "files": files,
        "peak_memory": mem["line"] + ("" if mem["fits"] else " — exceeds the budget: the run would be refused "
                                                            "(exit 7)"),
        "memory_mode": mem["memory_mode"],
        "time": f"~{mem['seconds']:.0f} s predicted (2 sweeps of matching when it matches; calibration not included)",
        "output": (f"{output}: exists — the run stops (exit 6) unless --overwrite"
                   if output is not None and output.exists() and not overwrite else str(output)),
        "memory": mem,
        "disk": human(b.checkpoint.nbytes() if not adapter else 0),
    }


def transfer(old_base: str | Path, finetuned: str | Path, new_base: str | Path, output: str | Path, *,
             mode: str = "rebasin", alpha: float | str = "auto", perms: str | Path | None = None,
             solver: str = "auto", max_sweeps: int = 20, seed: int = 0, device: str = "auto", dtype: str = "auto",
             probe_data: str | Path | None = None, probe_count: int | None = None, probe_length: int | None = None,
             probe_seed: int = 0, alpha_target: str = "finetune", require_gain: float | None = None,
             check_alpha: bool = False,
             overwrite: bool = False, verify: bool = False, dry_run: bool = False,
             progress: bool = False, memory: float | None = None, symmetries: str = "full") -> TransferResult:
    """Write the fine-tune moved onto ``new_base`` to ``output`` (see module docstring).

    ``alpha``: "auto" (calibrated, see :mod:`rebasin.calibrate`), "auto-layer" (one α per layer),
    or a number; with a number and ``check_alpha`` the verdict is still measured (D(0), D(α)).
    ``require_gain``: refuse (exit 7, nothing written) when the calibrated relative divergence
    reduction is below it. ``probe_*``: the calibration's probe inputs; ``alpha_target``: what it
    makes the output imitate ("finetune" or "transferred", see :mod:`rebasin.calibrate`). ``memory``: budget in GiB
    (default: what the machine has free); the predicted peak (``--dry-run`` shows it, and whether
    the match streams or caches) above it is refused before any work (RefusedError, exit 7).
    ``symmetries``: ``full`` (permutations and the within-head orthogonal maps) or ``perm``
    (permutations only; a ``perms`` file's rotations are then left out).

    Raises RebasinError subclasses (each names the file/tensor, with a distinct exit code)
    for mismatched architectures, an empty task vector, NaN/Inf, truncated or non-safetensors
    inputs, an existing output, or a failed write — and then leaves nothing at ``output``.
    """
    if mode not in ("rebasin", "diff"):
        raise RebasinError(f"unknown mode '{mode}' (rebasin or diff)")
    from rebasin.calibrate import TARGETS

    if alpha_target not in TARGETS:
        raise RebasinError(f"unknown calibration target '{alpha_target}' (choose from {', '.join(TARGETS)})")
    alpha = check_alpha_value(alpha)
    output = Path(output)
    a, b = open_model(old_base), open_model(new_base)
    # The output B + α·π(τ) lives in B's basis, so π may move a headless A's residual stream too
    # (only `apply`, which keeps A's outputs, must leave it alone: docs/design.md, Headless models).
    a = Model(a.checkpoint, a.spec.free_output())
    adapter = is_adapter_dir(finetuned)
    ft_ckpt = open_checkpoint(finetuned) if adapter else None
    ft = None if adapter else open_model(finetuned)
    if ft is not None:
        check_same_architecture(a.spec, ft.spec, a.path, ft.path, "the old base and the fine-tune")
        for name in a.spec.shapes:
            if name not in ft.spec.shapes:
                raise IncompatibleInputsError("missing from the fine-tune", file=ft.path, tensor=name)
            if ft.spec.shapes[name] != a.spec.shapes[name]:
                raise IncompatibleInputsError(f"shape {list(ft.spec.shapes[name])} in the fine-tune vs "
                                              f"{list(a.spec.shapes[name])} in the old base", file=ft.path, tensor=name)
    check_same_architecture(a.spec, b.spec, a.path, b.path, "the old base and the new base")
    lost = [n for n in a.spec.shapes if n not in b.spec.shapes]
    if lost:
        raise IncompatibleInputsError("the new base lacks this tensor of the old base", file=b.path, tensor=lost[0])
    needed = isinstance(alpha, str) or require_gain is not None
    bare = next((m for m in (a, b) if m.checkpoint.directory is None), None)
    if needed and bare is not None:
        raise RebasinError("calibrating α needs model directories (config.json beside the weights); "
                           "pass a number to --alpha", file=bare.path)
    if probe_data is not None and not Path(probe_data).is_file():
        raise InputFileError("probe data file not found", file=Path(probe_data))
    calibrates = needed or (check_alpha and bare is None and _have_transformers())
    calib_peak = None
    if calibrates:
        from rebasin.calibrate import predicted_peak

        def calib_peak() -> int:
            return predicted_peak(Path(finetuned), b.checkpoint.directory, probe_count, probe_length,
                                  a.checkpoint.directory if alpha_target == "transferred" else None)
    perms_arg = str(perms) if perms else None
    if calibrates and not dry_run:
        prefetch_model_code(b.config)
    if dry_run:
        return TransferResult(output, {"plan": plan(a, b, mode, adapter, solver, perms_arg, alpha, device=device,
                                                    memory=memory, calibration=calib_peak, output=output,
                                                    overwrite=overwrite, alpha_target=alpha_target)})
    mem = memory_plan(a, b, mode, adapter, perms_arg, device, memory, calib_peak)
    return_freed_memory()
    if not mem["fits"]:
        raise RefusedError(f"this transfer needs {mem['line']}; nothing was done. Free memory, pass a larger "
                           "--memory, run the match on several processes (torchrun, see docs/scale.md)"
                           + (", or skip the calibration (--alpha NUMBER --no-verdict)" if mem["calibration_bytes"]
                              > mem["budget_bytes"] else ""))
    ensure_output_free(output, overwrite)

    vocab: VocabMap | None = None
    vocab_axes = {n: ax for n in a.spec.shapes if (ax := _vocab_axes(a, b, n)) is not None}
    if vocab_axes:
        size_a = a.config.get("vocab_size") or a.spec.shapes[next(iter(vocab_axes))][0]
        size_b = b.config.get("vocab_size") or b.spec.shapes[next(iter(vocab_axes))][0]
        vocab = vocab_map(a.checkpoint.directory, b.checkpoint.directory, size_a, size_b)

    pi: dict[str, torch.Tensor] | None = None
    match_report: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = None
    if mode == "rebasin":
        if perms is not None:
            from rebasin.alignment import alignment_stats

            pi, perms_meta = load_perms(perms)
            pi = restrict(pi, symmetries)  # perm: the file's rotations left out
            validate(a.spec, pi, where=perms, state=a.checkpoint.get)
            alignment = {**alignment_stats(a, b, pi), "perms": str(perms),
                         "format_version": perms_meta.get("format_version"), "rotations": has_rotations(pi)}
        else:
            from rebasin.matching.api import match

            result = match(a, b, solver=solver, max_sweeps=max_sweeps, seed=seed, device=device, progress=progress,
                           vocab=vocab, memory=memory, symmetries=symmetries)
            pi, match_report = result.perms, result.to_dict()
            if not is_main_process():  # under torchrun every rank matched; rank 0 alone goes on and writes
                return TransferResult(output, {"match": match_report, "rank_only": True}, pi, [])
    lineage = same_lineage_line(match_report)
    calibration = None
    if calibrates:
        from rebasin.calibrate import calibrate

        calibration = calibrate(a.checkpoint.directory, Path(finetuned), b.checkpoint.directory, a.family, perms=pi,
                                alpha=alpha, vocab=vocab, probe_data=probe_data, probe_count=probe_count,
                                probe_length=probe_length, seed=probe_seed, target=alpha_target,
                                progress=progress)
        if mode == "diff" and calibration.verdict == "does not carry over":
            calibration.line += ("; if B is A's lineage re-released in another unit order, or trained "
                                 "independently, try --mode rebasin")
        if require_gain is not None and calibration.reduction < require_gain:
            raise RefusedError(f"the fine-tune does not carry over enough: {calibration.divergence.upper()} "
                               f"reduction {calibration.reduction:.1%} "
                               f"< --require-gain {require_gain:.1%} ({calibration.line}); nothing written",
                               file=Path(finetuned))
    verify_report = None
    if verify:
        from rebasin.verify import verify_symmetry

        if a.checkpoint.directory is None:
            raise RebasinError("--verify needs the old base as a model directory", file=a.path)
        diff = verify_symmetry(a.checkpoint.directory, a.spec, pi or identity(a.spec), seed=seed)
        verify_report = {"max_abs_diff": diff}

    skipped = None  # why a numeric α's verdict was not measured
    if calibration is None:
        skipped = ("--no-verdict" if not check_alpha else "the inputs are bare .safetensors files" if bare is not None
                   else "transformers is not installed")
    out_dtype = DTYPES.get(dtype)
    alpha_of = calibration.alpha_of if calibration is not None else (lambda _name: float(alpha))
    report: dict[str, Any] = {"mode": mode, "alpha": alpha_of(""), "alpha_requested": alpha,
                              "calibration": calibration.to_dict() if calibration else None,
                              "verdict_skipped": skipped,
                              "lineage": lineage,
                              "family": a.family, "old_base": str(a.path),
                              "finetuned": str(finetuned), "new_base": str(b.path), "adapter": adapter,
                              "vocab": vocab.summary() if vocab else None, "verify": verify_report,
                              "match": match_report, "alignment": alignment,
                              "perms": str(perms) if perms else (PERMS_FILE if pi else None)}
    write_started = time.perf_counter()
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if adapter:
            stats = _write_adapter(tmp, ft_ckpt, a, b, pi, alpha_of, finetuned, progress)
        else:
            stats = _write_full(tmp, a, ft, b, pi, alpha_of, out_dtype, vocab, vocab_axes, progress)
        report.update(stats)
        report["timings_s"] = {**({"match": sum(match_report["timings_s"].values())} if match_report else {}),
                               "write": time.perf_counter() - write_started}
        if pi is not None:
            save_perms(tmp / PERMS_FILE, pi, family=a.family, source=str(a.path), target=str(b.path))
        files = write_report(tmp, report)
    return TransferResult(output, report, pi, files)


def _write_full(tmp: Path, a: Model, ft: Model, b: Model, pi: dict[str, torch.Tensor] | None,
                alpha_of: Callable[[str], float],
                out_dtype: torch.dtype | None, vocab: VocabMap | None, vocab_axes: dict[str, int],
                progress: bool) -> dict[str, Any]:
    """Stream B's tensors into the output, row chunk by row chunk (docs/scale.md).

    Per chunk: rows of B, A and A_ft are read (A and A_ft whole, once per tensor, when π moves
    its rows), ``δ = A_ft − A`` and ``B + α·π(δ)`` in float32, one rounding to the output dtype,
    and the chunk goes straight into its shard. The NaN/Inf check is one ``isfinite`` of that
    result (NaN/Inf in any input reaches it; only a failure looks at the inputs to name one).
    """
    bk, ak, fk = b.checkpoint, a.checkpoint, ft.checkpoint
    layout = []
    for name in bk.tensors:
        dt = CK_DTYPES[bk.tensors[name].dtype]
        layout.append(Planned(name, out_dtype if (out_dtype is not None and dt.is_floating_point) else dt,
                              bk.shape(name)))
    writer = StreamingCheckpointWriter(tmp, layout)
    changed = unchanged = copied = 0
    sq_norm = 0.0
    for item in tqdm(layout, desc="transfer", unit="tensor", disable=not progress):
        name, dtype = item.name, item.dtype
        overflow = f"B + α·(A_ft − A) does not fit {dtype} (overflow)"
        if name not in a.spec.shapes or not CK_DTYPES[bk.tensors[name].dtype].is_floating_point:
            for start, stop in row_chunks(item.shape):
                tb = bk.get_rows(name, start, stop)
                out = tb.to(dtype)
                check_finite_chunk(out, [(tb, bk.where(name), name)], f"{name}: does not fit {dtype}")
                writer.write(name, out)
            copied += 1
            continue
        alpha = alpha_of(name)
        axis = vocab_axes.get(name)
        same = True
        if axis is not None:  # vocabularies differ: only shared rows get the delta (whole tensor, float32)
            tb, ta, tf = bk.get(name), ak.get(name, dtype=torch.float32), fk.get(name, dtype=torch.float32)
            delta = tf - ta
            sq_norm += _sq_sum(delta)
            if pi is not None:
                delta = permute_tensor(a.spec, name, delta, pi)
            rows_b, rows_a = vocab.b_rows, vocab.a_rows
            out = tb.to(torch.float32)
            moved = gather(out, axis, rows_b) + alpha * gather(delta, axis, rows_a)
            out = out.index_copy(axis, rows_b, moved).to(dtype)
            check_finite_chunk(out, [(tb, bk.where(name), name), (tf, fk.where(name), name),
                                     (ta, ak.where(name), name)], f"{name}: {overflow}")
            same = torch.equal(out, tb.to(dtype))
            writer.write(name, out)
            del tb, ta, tf, delta, out, moved
        else:
            rows_move = pi is not None and bool(a.spec.axes.get(name)) and a.spec.axes[name][0] is not None
            whole_a = ak.get(name) if rows_move else None
            whole_f = fk.get(name) if rows_move else None
            for start, stop in row_chunks(item.shape):
                tb = bk.get_rows(name, start, stop)
                if rows_move:
                    ra = permuted_rows(a.spec, name, whole_a, pi, start, stop)
                    rf = permuted_rows(a.spec, name, whole_f, pi, start, stop)
                else:
                    ra, rf = ak.get_rows(name, start, stop), fk.get_rows(name, start, stop)
                    if pi is not None:  # other axes move: gather them within the chunk
                        ra = permuted_rows(a.spec, name, ra, pi, 0, stop - start)
                        rf = permuted_rows(a.spec, name, rf, pi, 0, stop - start)
                delta = torch.sub(rf.float(), ra.float())  # out of place: inputs are never modified
                sq_norm += _sq_sum(delta)
                # B + α·δ in float32: (α·δ) rounded, then added (as the formula reads; no fused multiply-add)
                wide = torch.add(tb.float(), delta if alpha == 1.0 else delta.mul_(alpha))
                out = wide.to(dtype)
                check_finite_chunk(out, [(tb, bk.where(name), name), (rf, fk.where(name), name),
                                         (ra, ak.where(name), name)], f"{name}: {overflow}", wide=wide)
                if same and not torch.equal(out, tb if tb.dtype == dtype else tb.to(dtype)):
                    same = False
                writer.write(name, out)
                del delta, wide, out
            del whole_a, whole_f
        if same:
            unchanged += 1
        else:
            changed += 1
    writer.close()
    if sq_norm == 0.0:
        raise IncompatibleInputsError("the fine-tune is identical to the old base: the task vector is empty",
                                      file=ft.path)
    files_from_b = copy_model_files(b.checkpoint.directory, tmp, produced=REPORT_FILES)
    out_dtypes = sorted({str(item.dtype).removeprefix("torch.") for item in layout if item.dtype.is_floating_point})
    if out_dtype is not None:
        _set_config_dtype(tmp / "config.json", out_dtype)
    return {"tensors": {"changed": changed, "unchanged": unchanged, "copied_from_b": copied},
            "files_from_b": files_from_b, "task_vector_norm": sq_norm ** 0.5,
            "arithmetic": {"dtype": "float32", "output_dtypes": out_dtypes}}


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """Record ``--dtype`` in the output's config.json (``dtype``, and ``torch_dtype`` where B's config had
    it), so that ``from_pretrained(dtype="auto")`` loads the weights in the dtype they were written in."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict) and "torch_dtype" in config[sub]:
            config[sub]["torch_dtype"] = name
    path.write_text(json.dumps(config, indent=2) + "\n")


def _sq_sum(x: torch.Tensor) -> float:
    """Σ x² (torch's cascaded float32 reduction: one pass, no temporary)."""
    if x.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(x)) ** 2


def _write_adapter(tmp: Path, ckpt, a: Model, b: Model, pi: dict[str, torch.Tensor] | None,
                   alpha_of: Callable[[str], float],
                   finetuned: str | Path, progress: bool) -> dict[str, Any]:
    cfg = read_adapter_config(Path(finetuned))
    fan = bool(cfg.get("fan_in_fan_out", False))
    writer = CheckpointWriter(tmp, basename="adapter_model")
    sq_norm = 0.0
    n = 0
    dtypes: set[str] = set()
    for name in tqdm(ckpt.keys(), desc="adapter", unit="tensor", disable=not progress):
        t = ckpt.get(name, check_finite=True)
        site, which = lora_site(name, a.spec, fan, where=ckpt.path)
        if site.weight not in b.spec.shapes:
            raise IncompatibleInputsError(f"the new base has no '{site.weight}' for this adapter tensor",
                                          file=b.path, tensor=name)
        sq_norm += float(t.double().pow(2).sum()) if which == "B" else 0.0
        if pi is not None:
            t = permute_lora(name, t, a.spec, pi, fan, where=ckpt.path)
        alpha = alpha_of(site.weight)
        if which == "B" and alpha != 1.0:
            t = (t.float() * alpha).to(t.dtype)
        writer.add(name, t)
        dtypes.add(str(t.dtype).removeprefix("torch."))
        n += 1
    writer.close()
    if sq_norm == 0.0:
        raise IncompatibleInputsError("the adapter's lora_B weights are all zero: the task vector is empty",
                                      file=ckpt.path)
    cfg["base_model_name_or_path"] = str(Path(b.path).resolve())
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    files_from_b = copy_aux_files(b.checkpoint.directory, tmp, names=(
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
        "tokenizer.model"))
    return {"tensors": {"changed": n, "unchanged": 0, "copied_from_b": 0}, "files_from_b": files_from_b,
            "task_vector_norm": sq_norm ** 0.5, "arithmetic": {"dtype": "float32", "output_dtypes": sorted(dtypes)}}
