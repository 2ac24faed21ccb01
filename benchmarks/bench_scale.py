"""Memory and time at scale: ``match``, ``transfer`` (both modes) and ``apply`` on synthetic
Llama/Qwen2-shaped checkpoints, each job a fresh subprocess that reports its own peak RSS (``VmHWM``).

Checkpoints (bf16, sharded at 512 MiB, random init; built once and cached under
``$REBASIN_SCALE_CACHE`` or ``~/.cache/rebasin/scale``): ``A``; ``B = π0(A) + 1 % noise``
(a planted pair: π0 a random valid permutation of every group); ``A_ft = A + τ`` (τ 5 % of A's
scale). Shapes:

- ``qwen2-0.5b``: Qwen2-0.5B exactly (494 M parameters, tied embeddings, 0.92 GiB);
- ``llama-2b``: Llama-3.2-like, 22 layers of d_model 2048, d_ff 8192, 32 heads / 8 KV heads,
  128256-token vocabulary, untied (1.86 B parameters, 3.5 GiB);
- ``qwen2-tiny`` (``--quick``): 4 layers of 128, to smoke-test the harness.

Jobs (``--alpha 1``: calibration is a separate cost): ``match`` streaming (budget set to the
issue's target, 25 % of a checkpoint + 2 GiB, which rules out caching) and cached (budget
unlimited), ``transfer --mode rebasin`` (streaming budget), ``transfer --mode diff``, ``apply``,
and ``match`` on 2 gloo processes (0.5 B). Each record has the measured peak RSS (the job's own
``VmHWM``, per rank for the 2-process run) and wall time, the prediction
:mod:`rebasin.estimate` makes before the job, the issue's target,
and for matches the time split (bookkeeping = load + objective + report). The load average
before and after each job is recorded: timings from a shared machine are noisy; rerun with
``python -m benchmarks scale`` (``--quick`` for the tiny shape) on an idle one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARD_BYTES = 512 * 2**20


def configs(quick: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    if quick:
        return {"qwen2-tiny": ("Qwen2ForCausalLM", {
            "model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 5000, "tie_word_embeddings": True,
            "max_position_embeddings": 2048})}
    return {
        "qwen2-0.5b": ("Qwen2ForCausalLM", {
            "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}),
        "llama-2b": ("LlamaForCausalLM", {
            "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": False,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    }


# ---- synthetic checkpoints ------------------------------------------------------------------------
def _shapes(arch: str, cfg: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], Any]:
    import transformers as T

    config = T.AutoConfig.for_model(**cfg)
    config.architectures = [arch]
    with torch.device("meta"):
        model = getattr(T, arch)(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes, config


def build_checkpoints(name: str, arch: str, cfg: dict[str, Any], cache: Path, seed: int = 0) -> dict[str, Path]:
    """A, B = π0(A) + noise, A_ft = A + τ as sharded bf16 model directories (cached by config hash)."""
    from rebasin.io.stream_writer import Planned, StreamingCheckpointWriter
    from rebasin.permutation import permute_tensor, random_perms
    from rebasin.specs import resolve_spec

    key = hashlib.sha256(json.dumps([arch, cfg, seed, SHARD_BYTES], sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"{name}-{key}"
    dirs = {d: root / d for d in ("A", "B", "Aft")}
    if (root / "done").is_file():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    shapes, config = _shapes(arch, cfg)
    spec = resolve_spec(config.to_dict(), shapes)
    g = torch.Generator().manual_seed(seed)
    p0 = random_perms(spec, g)
    layout = [Planned(n, torch.bfloat16, s) for n, s in shapes.items()]
    writers = {}
    for d, path in dirs.items():
        path.mkdir(parents=True)
        (path / "config.json").write_text(config.to_json_string())
        writers[d] = StreamingCheckpointWriter(path, layout, max_shard_bytes=SHARD_BYTES)
    for n, shape in shapes.items():
        if n.endswith("norm.weight"):
            a = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            a = 0.02 * torch.randn(shape, generator=g)
        a = a.to(torch.bfloat16).float()
        b = permute_tensor(spec, n, a, p0) if n in spec.axes else a
        b = b + 0.01 * 0.02 * torch.randn(shape, generator=g)
        ft = a + 0.05 * 0.02 * torch.randn(shape, generator=g)
        for d, t in (("A", a), ("B", b), ("Aft", ft)):
            writers[d].write(n, t.to(torch.bfloat16))
        del a, b, ft
    for w in writers.values():
        w.close()
    (root / "done").write_text(json.dumps({"arch": arch, "config": cfg, "seed": seed}))
    return dirs


# ---- one job in a subprocess ------------------------------------------------------------------------
def _job(args: dict[str, Any]) -> dict[str, Any]:
    """Run inside the subprocess: the library call a CLI command makes, plus what the record needs."""
    kind = args["job"]
    out: dict[str, Any] = {}
    if kind == "match":
        from rebasin.cli import format_match
        from rebasin.matching import match

        t0 = time.perf_counter()
        r = match(args["A"], args["B"], memory=args.get("memory"), progress=args.get("progress", False))
        out.update(wall_inner_s=time.perf_counter() - t0, timings=r.timings, sweeps=r.sweeps, mode=r.memory_mode,
                   io=r.io, distributed=r.distributed, objective=r.objective, objective_identity=r.objective_identity)
        print(format_match(r), file=sys.stderr)
    elif kind == "transfer":
        from rebasin.transfer import transfer

        res = transfer(args["A"], args["Aft"], args["B"], args["out"], mode=args["mode"], alpha=1.0,
                       check_alpha=False, memory=args.get("memory"), progress=args.get("progress", False))
        m = res.report.get("match") or {}
        out.update(timings=res.report.get("timings_s"), match_timings=m.get("timings_s"), mode=m.get("memory_mode"),
                   sweeps=m.get("sweeps"))
    elif kind == "apply":
        from rebasin.apply import apply_checkpoint
        from rebasin.io.perms_file import load_perms
        from rebasin.model import open_model

        perms, _ = load_perms(args["perms"])
        apply_checkpoint(open_model(args["A"]), perms, args["out"], memory=args.get("memory"))
    out["peak_rss_self"] = peak_rss()
    return out


def peak_rss() -> int:
    """This process's peak resident set (bytes): VmHWM, the high-water mark of its own address
    space. Not ``ru_maxrss``: Linux carries the parent's resident size at fork/exec into the child's
    ``ru_maxrss``, so a small job started by a big parent would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _dist_job(rank: int, world: int, init: str, args: dict[str, Any], result_dir: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    td.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    res = _job(args)
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(res, default=str))
    td.barrier()
    td.destroy_process_group()


def run_subprocess(args: dict[str, Any], world: int = 1) -> dict[str, Any]:
    """Run one job in a fresh interpreter; peak RSS from wait4 (the job's own maximum resident set)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = {**args, "result": str(Path(tmp) / "result.json"), "world": world}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_scale", json.dumps(args)], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        # each job measures its own peak (VmHWM at its end; each rank for the 2-process run)
        if proc.returncode != 0:
            raise RuntimeError(f"job {args['job']} failed ({proc.returncode}):\n{stderr[-4000:]}")
        result = json.loads(Path(args["result"]).read_text())
        result.update(wall_s=wall, load_before=load_before, load_after=os.getloadavg(), log_tail=stderr[-2500:])
        return result


def _child_main(args: dict[str, Any]) -> None:
    world = args.get("world", 1)
    if world > 1:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_dist_job, args=(world, str(Path(tmp) / "init"), args, tmp), nprocs=world)
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        res = {**ranks[0], "peak_rss_self": max(r["peak_rss_self"] for r in ranks),
               "peak_rss_ranks": [r["peak_rss_self"] for r in ranks]}
    else:
        res = _job(args)
    Path(args["result"]).write_text(json.dumps(res, default=str))


# ---- the benchmark ------------------------------------------------------------------------------------
def _predict(job: str, dirs: dict[str, Path], memory: float | None, world: int = 1, mode: str = "rebasin"
             ) -> dict[str, Any]:
    from rebasin.estimate import budget_bytes, estimate_apply
    from rebasin.matching.api import resolve_device
    from rebasin.model import open_model
    from rebasin.transfer import memory_plan

    a, b = open_model(dirs["A"]), open_model(dirs["B"])
    if job == "match":
        from rebasin.estimate import estimate_match

        est = estimate_match(a.spec, a, b, resolve_device("cpu"), world)
        budget, _ = budget_bytes(memory)
        m = "cached" if est.cached <= budget else "streaming"
        return {"mode": m, "peak": est.peak(m), "seconds": est.seconds(2), "seconds_per_sweep": est.seconds_first_sweep,
                "tflop_per_sweep": est.flops_sweep / 1e12, "parts": est.parts}
    if job == "apply":
        e = estimate_apply(a)
        return {"mode": "streaming", "peak": e.peak, "seconds": e.seconds}
    plan = memory_plan(a, b, mode, False, None, "cpu", memory)
    return {"mode": plan["memory_mode"], "peak": plan["peak_bytes"], "seconds": plan["seconds"]}


def run(quick: bool, device: str) -> list[dict]:
    from rebasin.io.perms_file import save_perms
    from rebasin.model import open_model
    from rebasin.permutation import random_perms

    cache = Path(os.environ.get("REBASIN_SCALE_CACHE", Path.home() / ".cache" / "rebasin" / "scale"))
    only = os.environ.get("REBASIN_SCALE_ONLY")  # e.g. "qwen2-0.5b" or "qwen2-0.5b:match-streaming,apply"
    records = []
    for name, (arch, cfg) in configs(quick).items():
        if only and name != only.split(":")[0]:
            continue
        jobs_wanted = set(only.split(":")[1].split(",")) if only and ":" in only else None
        t0 = time.perf_counter()
        dirs = build_checkpoints(name, arch, cfg, cache)
        gen_s = time.perf_counter() - t0
        a = open_model(dirs["A"])
        ck_bytes = a.checkpoint.nbytes()
        largest_fp32 = max(i.numel for i in a.checkpoint.tensors.values()) * 4
        params = a.checkpoint.numel()
        target_stream = 0.25 * ck_bytes + 2 * GIB
        target_diff = 1.5 * GIB + 3 * largest_fp32
        stream_budget = target_stream / GIB
        work = Path(tempfile.mkdtemp(prefix=f"rebasin-scale-{name}-", dir=cache))
        perms = work / "perms.safetensors"
        save_perms(perms, random_perms(a.spec, torch.Generator().manual_seed(1)), family=a.family)
        jobs = [
            ("match-streaming", {"job": "match"}, stream_budget, 1, target_stream),
            ("match-cached", {"job": "match"}, 1024.0, 1, None),
            ("transfer-rebasin", {"job": "transfer", "mode": "rebasin"}, stream_budget, 1, target_stream),
            ("transfer-diff", {"job": "transfer", "mode": "diff"}, None, 1, target_diff),
            ("apply", {"job": "apply", "perms": str(perms)}, None, 1, target_diff),
        ]
        if not name.startswith("llama"):
            jobs.append(("match-2proc-gloo", {"job": "match"}, stream_budget, 2, target_stream))
        for case, spec, memory, world, target in jobs:
            if jobs_wanted and case not in jobs_wanted:
                continue
            out = work / case
            args = {**spec, "A": str(dirs["A"]), "B": str(dirs["B"]), "Aft": str(dirs["Aft"]), "out": str(out),
                    "memory": memory}
            pred = _predict(spec["job"], dirs, memory, world, spec.get("mode", "rebasin"))
            res = run_subprocess(args, world)
            shutil.rmtree(out, ignore_errors=True)
            peak = res["peak_rss_self"]
            rec = {"case": f"{name} {case}", "model": name, "job": case, "params": params,
                   "checkpoint_gib": ck_bytes / GIB, "world": world, "mode": res.get("mode") or pred["mode"],
                   "wall_s": res["wall_s"], "peak_rss_gib": peak / GIB,
                   "predicted_peak_gib": pred["peak"] / GIB, "peak_error": pred["peak"] / peak - 1,
                   "predicted_s": pred["seconds"], "target_gib": (target / GIB) if target else None,
                   "within_target": (peak <= target) if target else None,
                   "load_before": res["load_before"][0], "load_after": res["load_after"][0]}
            if res.get("peak_rss_ranks"):
                rec["peak_rss_ranks_gib"] = [p / GIB for p in res["peak_rss_ranks"]]
            timings = res.get("timings") if spec["job"] == "match" else res.get("match_timings")
            if timings:
                total = sum(timings.values())
                book = sum(timings.get(k, 0.0) for k in ("load", "objective", "report"))
                rec.update({f"{k}_s": v for k, v in timings.items()})
                rec.update(sweeps=res.get("sweeps"), bookkeeping_fraction=book / total if total else None)
                if "seconds_per_sweep" in pred:
                    rec.update(predicted_s_per_sweep=pred["seconds_per_sweep"], tflop_per_sweep=pred["tflop_per_sweep"])
            if res.get("distributed"):
                rec["ranks"] = res["distributed"]["ranks"]
            rec["generate_s"] = gen_s
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "ranks"}), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return records


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
