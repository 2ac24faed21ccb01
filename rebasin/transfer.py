"""Transfer a fine-tune to a new base: ``B + α·π(A_ft − A)`` (rebasin) or ``B + α·(A_ft − A)`` (diff).

Everything streams tensor by tensor (A, A_ft and B are read lazily); arithmetic is float32
and the result takes B's dtype (or ``dtype``). The output directory is written atomically:
model shards + index (or a PEFT adapter when the fine-tune is one), B's config, tokenizer
and generation files, ``permutations.safetensors`` (rebasin mode), ``report.json``,
``report.md`` and ``alignment.png``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rebasin.errors import IncompatibleInputsError, RebasinError
from rebasin.io.checkpoint import open_checkpoint
from rebasin.io.writer import CheckpointWriter, atomic_output_dir, copy_aux_files, ensure_output_free
from rebasin.lora import ADAPTER_CONFIG, is_adapter_dir, lora_site, permute_lora, read_adapter_config
from rebasin.model import Model, open_model
from rebasin.permutation import identity, load_perms, permute_tensor, save_perms, validate
from rebasin.report import write_report
from rebasin.summary import human_bytes, memory_estimate
from rebasin.vocab import VocabMap, vocab_map

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PERMS_FILE = "permutations.safetensors"


@dataclass
class TransferResult:
    output: Path
    report: dict[str, Any]
    perms: dict[str, torch.Tensor] | None = None
    files: list[str] = field(default_factory=list)


def _check_same_arch(a: Model, b: Model, what: str) -> None:
    if a.family != b.family:
        raise IncompatibleInputsError(f"{what}: {a.path} is {a.family} but {b.path} is {b.family}")
    for g, grp in a.spec.groups.items():
        if b.spec.groups.get(g) != grp:
            raise IncompatibleInputsError(f"{what}: permutation group '{g}' differs ({grp} vs {b.spec.groups.get(g)})",
                                          file=b.path)


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


def plan(a: Model, b: Model, mode: str, adapter: bool, solver: str, perms_file: str | None) -> dict[str, Any]:
    mem = memory_estimate(a)
    files = ([ADAPTER_CONFIG, "adapter_model.safetensors"] if adapter else ["model.safetensors (sharded + index "
             "when over the shard limit)"]) + ["config/tokenizer/generation files from B", "report.json",
                                              "report.md", "alignment.png"]
    if mode == "rebasin":
        files.insert(1, PERMS_FILE)
    return {
        "family": a.family, "mode": mode, "groups": len(a.spec.groups),
        "permutations": perms_file or (f"match A -> B with solver '{solver}'" if mode == "rebasin" else "none"),
        "files": files,
        "peak_memory": human_bytes(mem["transfer_rebasin" if mode == "rebasin" and not perms_file else "transfer_diff"]),
        "disk": human_bytes(b.checkpoint.nbytes() if not adapter else 0),
    }


def transfer(old_base: str | Path, finetuned: str | Path, new_base: str | Path, output: str | Path, *,
             mode: str = "rebasin", alpha: float = 1.0, perms: str | Path | None = None, solver: str = "auto",
             max_sweeps: int = 20, seed: int = 0, device: str = "auto", dtype: str = "auto",
             overwrite: bool = False, verify: bool = False, dry_run: bool = False,
             progress: bool = True) -> TransferResult:
    """Write the fine-tune moved onto ``new_base`` to ``output`` (see module docstring).

    Raises RebasinError subclasses (each names the file/tensor, with a distinct exit code)
    for mismatched architectures, an empty task vector, NaN/Inf, truncated or non-safetensors
    inputs, an existing output, or a failed write — and then leaves nothing at ``output``.
    """
    if mode not in ("rebasin", "diff"):
        raise RebasinError(f"unknown mode '{mode}' (rebasin or diff)")
    output = Path(output)
    a, b = open_model(old_base), open_model(new_base)
    adapter = is_adapter_dir(finetuned)
    ft_ckpt = open_checkpoint(finetuned) if adapter else None
    ft = None if adapter else open_model(finetuned)
    if ft is not None:
        _check_same_arch(a, ft, "old base and fine-tune are not the same architecture")
        for name in a.spec.shapes:
            if name not in ft.spec.shapes:
                raise IncompatibleInputsError("missing from the fine-tune", file=ft.path, tensor=name)
            if ft.spec.shapes[name] != a.spec.shapes[name]:
                raise IncompatibleInputsError(f"shape {list(ft.spec.shapes[name])} in the fine-tune vs "
                                              f"{list(a.spec.shapes[name])} in the old base", file=ft.path, tensor=name)
    _check_same_arch(a, b, "old base and new base are not the same architecture")
    lost = [n for n in a.spec.shapes if n not in b.spec.shapes]
    if lost:
        raise IncompatibleInputsError("the new base lacks this tensor of the old base", file=b.path, tensor=lost[0])
    if dry_run:
        return TransferResult(output, {"plan": plan(a, b, mode, adapter, solver, str(perms) if perms else None)})
    ensure_output_free(output, overwrite)

    vocab: VocabMap | None = None
    vocab_axes = {n: ax for n in a.spec.shapes if (ax := _vocab_axes(a, b, n)) is not None}
    if vocab_axes:
        size_a = a.config.get("vocab_size") or a.spec.shapes[next(iter(vocab_axes))][0]
        size_b = b.config.get("vocab_size") or b.spec.shapes[next(iter(vocab_axes))][0]
        vocab = vocab_map(a.checkpoint.directory, b.checkpoint.directory, size_a, size_b)

    pi: dict[str, torch.Tensor] | None = None
    match_report: dict[str, Any] | None = None
    if mode == "rebasin":
        if perms is not None:
            pi, _ = load_perms(perms)
            validate(a.spec, pi, where=perms)
        else:
            from rebasin.matching.api import match

            result = match(a, b, solver=solver, max_sweeps=max_sweeps, seed=seed, device=device, progress=progress,
                           vocab=vocab)
            pi, match_report = result.perms, result.to_dict()
    verify_report = None
    if verify:
        from rebasin.verify import verify_symmetry

        if a.checkpoint.directory is None:
            raise RebasinError("--verify needs the old base as a model directory", file=a.path)
        diff = verify_symmetry(a.checkpoint.directory, a.spec, pi or identity(a.spec), seed=seed)
        verify_report = {"max_abs_diff": diff}
        print(f"verify: max |π(A)(x) − A(x)| = {diff:.3g}")

    out_dtype = DTYPES.get(dtype)
    report: dict[str, Any] = {"mode": mode, "alpha": alpha, "family": a.family, "old_base": str(a.path),
                              "finetuned": str(finetuned), "new_base": str(b.path), "adapter": adapter,
                              "vocab": vocab.summary() if vocab else None, "verify": verify_report,
                              "match": match_report, "perms": str(perms) if perms else (PERMS_FILE if pi else None)}
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if adapter:
            stats = _write_adapter(tmp, ft_ckpt, a, b, pi, alpha, finetuned, progress)
        else:
            stats = _write_full(tmp, a, ft, b, pi, alpha, out_dtype, vocab, vocab_axes, progress)
        report.update(stats)
        if pi is not None:
            save_perms(tmp / PERMS_FILE, pi, family=a.family, source=str(a.path), target=str(b.path))
        files = write_report(tmp, report)
    return TransferResult(output, report, pi, files)


def _write_full(tmp: Path, a: Model, ft: Model, b: Model, pi: dict[str, torch.Tensor] | None, alpha: float,
                out_dtype: torch.dtype | None, vocab: VocabMap | None, vocab_axes: dict[str, int],
                progress: bool) -> dict[str, Any]:
    writer = CheckpointWriter(tmp)
    with_delta = copied = 0
    sq_norm = 0.0
    for name in tqdm(b.checkpoint.keys(), desc="transfer", unit="tensor", disable=not progress):
        tb = b.checkpoint.get(name, check_finite=True)
        dtype = out_dtype if (out_dtype is not None and tb.is_floating_point()) else tb.dtype
        if name not in a.spec.shapes or not tb.is_floating_point():
            writer.add(name, tb.to(dtype))
            copied += 1
            continue
        ta = a.checkpoint.get(name, dtype=torch.float32, check_finite=True)
        tf = ft.checkpoint.get(name, dtype=torch.float32, check_finite=True)
        delta = tf - ta
        sq_norm += float(delta.double().pow(2).sum())
        if pi is not None:
            delta = permute_tensor(a.spec, name, delta, pi)
        out = tb.to(torch.float32)
        axis = vocab_axes.get(name)
        if axis is None:
            out = out + alpha * delta
        else:
            rows_b, rows_a = vocab.b_rows, vocab.a_rows
            moved = out.index_select(axis, rows_b) + alpha * delta.index_select(axis, rows_a)
            out = out.index_copy(axis, rows_b, moved)
        writer.add(name, out.to(dtype))
        with_delta += 1
    writer.close()
    if sq_norm == 0.0:
        raise IncompatibleInputsError("the fine-tune is identical to the old base: the task vector is empty",
                                      file=ft.path)
    copy_aux_files(b.checkpoint.directory, tmp)
    return {"tensors": {"with_delta": with_delta, "copied_from_b": copied}, "task_vector_norm": sq_norm ** 0.5}


def _write_adapter(tmp: Path, ckpt, a: Model, b: Model, pi: dict[str, torch.Tensor] | None, alpha: float,
                   finetuned: str | Path, progress: bool) -> dict[str, Any]:
    cfg = read_adapter_config(Path(finetuned))
    fan = bool(cfg.get("fan_in_fan_out", False))
    writer = CheckpointWriter(tmp, basename="adapter_model")
    sq_norm = 0.0
    n = 0
    for name in tqdm(ckpt.keys(), desc="adapter", unit="tensor", disable=not progress):
        t = ckpt.get(name, check_finite=True)
        site, which = lora_site(name, a.spec, fan, where=ckpt.path)
        if site.weight not in b.spec.shapes:
            raise IncompatibleInputsError(f"the new base has no '{site.weight}' for this adapter tensor",
                                          file=b.path, tensor=name)
        sq_norm += float(t.double().pow(2).sum()) if which == "B" else 0.0
        if pi is not None:
            t = permute_lora(name, t, a.spec, pi, fan, where=ckpt.path)
        if which == "B" and alpha != 1.0:
            t = (t.float() * alpha).to(t.dtype)
        writer.add(name, t)
        n += 1
    writer.close()
    if sq_norm == 0.0:
        raise IncompatibleInputsError("the adapter's lora_B weights are all zero: the task vector is empty",
                                      file=ckpt.path)
    cfg["base_model_name_or_path"] = str(Path(b.path).resolve())
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    copy_aux_files(b.checkpoint.directory, tmp, names=("tokenizer.json", "tokenizer_config.json",
                                                       "special_tokens_map.json", "vocab.txt", "vocab.json",
                                                       "merges.txt", "tokenizer.model"))
    return {"tensors": {"with_delta": n, "copied_from_b": 0}, "task_vector_norm": sq_norm ** 0.5}


def run_transfer(args: argparse.Namespace) -> int:
    result = transfer(args.old_base, args.finetuned, args.new_base, args.output, mode=args.mode, alpha=args.alpha,
                      perms=args.perms, solver=args.solver, max_sweeps=args.max_sweeps, seed=args.seed,
                      device=args.device, dtype=args.dtype, overwrite=args.overwrite, verify=args.verify,
                      dry_run=args.dry_run)
    if args.dry_run:
        p = result.report["plan"]
        print("dry run: nothing written")
        for key in ("family", "mode", "groups", "permutations", "peak_memory", "disk"):
            print(f"  {key:<13} {p[key]}")
        print("  files         " + "\n                ".join(p["files"]))
        return 0
    r = result.report
    print(f"wrote {result.output} ({r['mode']} mode, α={r['alpha']}; {r['tensors']['with_delta']} tensors moved, "
          f"{r['tensors']['copied_from_b']} copied from B)")
    if r.get("match"):
        m = r["match"]
        print(f"alignment objective: identity {m['objective_identity']:.6g} -> matched {m['objective']:.6g}")
    return 0
