"""Predicted peak memory and time of each job, from a measured model of this code.

Every figure is a sum of parts the code really allocates (docs/scale.md), with the
constants measured by ``python -m benchmarks scale`` (``benchmarks/results/scale-cpu.md``):

- ``BASE_RSS``: the interpreter with torch, numpy, scipy and rebasin's matcher imported
  (``DIFF_BASE_RSS``, ``APPLY_BASE_RSS`` for the jobs that import or run less);
- a *chunk* (:data:`rebasin.streaming.CHUNK_ELEMS` float32 elements, 16 MiB): every
  per-tensor pass holds a few of them (:data:`COST_CHUNKS`, :data:`STATS_CHUNKS`, ...);
- the tensors a step holds whole, as stored: for matching, the largest pair (A, B) read for
  one cost term; for a rebasin transfer, A and A_ft of the largest tensor whose rows move;
- a cost matrix, n² float32, plus the solver's working copy (:data:`SOLVER_BYTES_PER_ENTRY`);
- one layer's attention blocks (float32 copies, gathered and concatenated: :data:`ATTN_BYTES_PER_PARAM`);
- in cached mode, both models' permuted tensors as stored (then no step reads a pair of its own).

Time: the cost GEMMs' floating-point operations (a plain group g costs 2·n_g·numel per tensor
touching it, per evaluation) over this machine's float32 GEMM rate, measured in ~0.1 s when an
estimate is made; the solves (weak-signal model, measured: an upper bound for planted and
same-lineage pairs) and attention steps; the reads; the first read's statistics pass.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rebasin.errors import RefusedError
from rebasin.model import Model
from rebasin.specs import Spec
from rebasin.streaming import CHUNK_ELEMS

GIB = 2**30
MIB = 2**20

# ---- measured constants: benchmarks/results/scale-cpu.md (2-core x86 CI machine, torch 2.13 CPU, glibc with
# rebasin.streaming.return_freed_memory); peaks from VmHWM, temporaries from RSS sampled around single steps ----
BASE_RSS = 450 * MIB            # match / rebasin transfer: torch, scipy, solvers and kernels imported, GEMM probe run
DIFF_BASE_RSS = 415 * MIB       # transfer --mode diff: the same imports, no matching
APPLY_BASE_RSS = 285 * MIB      # apply imports no matcher
CHUNK_BYTES = CHUNK_ELEMS * 4   # one float32 chunk
COST_CHUNKS = 10                # accumulate_cost: B and gathered A chunks (stored, float32) and BLAS packing (+170 MB)
STATS_CHUNKS = 6                # tensor_stats: B, A and π₀(A) chunks in float32 and their products
DIFF_CHUNKS = 5                 # transfer: row chunks of A, A_ft, B, δ, B + α·δ and its cast
APPLY_CHUNKS = 3                # apply: gathered rows (twice) and the output copy
SOLVER_BYTES_PER_ENTRY = 8      # auto on a weak-signal cost: ~2× the float32 cost (measured 1.4-1.8×)
ATTN_BYTES_PER_PARAM = 28       # one layer's attention blocks: B and A in float32, gathered, concatenated, grams
ALLOC_SLACK = 1.03              # what the allocator keeps beyond live buffers (small once freed chunks go back)
STARTUP_S = 3.0                 # interpreter and imports
READ_BYTES_PER_S = 1.0e9        # pread of a tensor pair from the page cache (per process)
STATS_BYTES_PER_S = 0.24e9      # match's first read (stats, NaN check, J): stored bytes of A and B per second
DIFF_BYTES_PER_S = 0.2e9        # transfer --mode diff: output bytes per second
APPLY_BYTES_PER_S = 0.25e9      # apply: output bytes per second
ATTN_S_PER_PARAM = 1.2e-7       # one attention step, per parameter of the layer's attention tensors
SOLVE_S_PER_ENTRY = 2.2e-8      # auto on a weak-signal n×n cost (independently trained models): ~2.2e-8·n² s


def human(n: float) -> str:
    """A byte count for people: ``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes() -> int:
    """Memory the machine can give now: MemAvailable from /proc/meminfo (else total physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GIB


def budget_bytes(memory: float | None) -> tuple[int, str]:
    """(budget, how it was set): ``memory`` GiB, or what is free minus a margin (10%, at least 0.5 GiB)."""
    if memory is not None:
        return int(memory * GIB), f"--memory {memory:g} GiB"
    free = available_bytes()
    margin = max(GIB // 2, free // 10)
    return max(0, free - margin), f"free memory {human(free)} minus a {human(margin)} margin"


_GEMM_RATE: dict[tuple[str, torch.dtype], float] = {}


def gemm_rate(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> float:
    """This process's GEMM rate (FLOP/s) on cost-shaped products, measured once per device and
    dtype (~0.1 s). ``dtype`` None: what the cost kernels read there (float32 on CPU, bfloat16
    inputs on CUDA)."""
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    key = (device.type, dtype)
    if key not in _GEMM_RATE:
        n, m = (1024, 2048) if device.type == "cpu" else (4096, 8192)
        g = torch.Generator().manual_seed(0)
        b = torch.randn(n, m, generator=g).to(device, dtype)
        a = torch.randn(n, m, generator=g).to(device, dtype)
        out = b @ a.T  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.05:
            out = b @ a.T
            reps += 1
        sync()
        _GEMM_RATE[key] = 2 * n * n * m * reps / (time.perf_counter() - t0)
        del out
    return _GEMM_RATE[key]


@dataclass
class JobEstimate:
    """A job's predicted peak RSS (bytes) and time (seconds), and what they are made of."""

    job: str
    peak: int
    seconds: float
    mode: str = ""
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "peak_bytes": self.peak, "seconds": self.seconds, "mode": self.mode,
                "parts": self.parts, "notes": self.notes}


@dataclass
class MatchEstimate:
    """Peak RSS of a match streaming and cached, and the time of its first sweep (and of each later one)."""

    streaming: int
    cached: int
    cache_bytes: int
    seconds_first_sweep: float
    seconds_prepare: float
    flops_sweep: float
    parts: dict[str, int] = field(default_factory=dict)
    world: int = 1

    def seconds(self, sweeps: int = 2) -> float:
        """Predicted wall time for ``sweeps`` sweeps (a planted or same-lineage pair converges in 2;
        every sweep after the first re-evaluates only groups whose inputs changed, so this is an
        upper bound per sweep)."""
        return self.seconds_prepare + sweeps * self.seconds_first_sweep

    def peak(self, mode: str) -> int:
        return self.cached if mode == "cached" else self.streaming


def _stored_bytes(model: Model, name: str, dtype: torch.dtype | None) -> int:
    info = model.checkpoint.tensors[name]
    if dtype is not None:
        return info.numel * torch.empty((), dtype=dtype).element_size()
    return info.nbytes


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _chunk_bytes(largest_numel: int) -> int:
    """A float32 chunk: CHUNK_ELEMS elements, or the whole tensor when it is smaller."""
    return 4 * min(CHUNK_ELEMS, largest_numel)


def _largest_numel(model: Model) -> int:
    return max((info.numel for info in model.checkpoint.tensors.values()), default=0)


def estimate_match(spec: Spec, a: Model, b: Model, device: torch.device, world: int = 1, *,
                   dtype: torch.dtype | None = None) -> MatchEstimate:
    """Predict a match of ``a`` onto ``b`` (``spec``: the tensors matched, as :func:`rebasin.match` builds it).

    Per rank (:func:`rebasin.distributed.plan_ownership`; one rank without torch.distributed):
    the GEMM work and reads of the groups and tensors it owns, the solves of its per-layer
    groups (rank 0 also solves the global ones) and, cached, its own tensors; the figures
    returned are the largest rank's.
    """
    from rebasin.distributed import plan_ownership

    own = plan_ownership(spec, world)
    names = spec.permuted_tensors()
    pair = {n: _stored_bytes(a, n, dtype) + _stored_bytes(b, n, dtype) for n in names}
    cache_r, flops_r, solve_r = [0] * world, [0.0] * world, [0.0] * world
    for n in names:
        cache_r[own.tensor_owner.get(n, 0)] += pair[n]
    # a cost step holds its cost matrix, chunk temporaries and (streaming) the tensor pair it reads
    term_pair = term_temp = solver_peak = 0
    for g in spec.groups.values():
        if g.is_attention:
            params = sum(_numel(spec.shapes[n]) for n in spec.tensors_of(g.name))
            owner = own.group_owner.get(g.name)
            solve_r[owner if owner is not None else 0] += ATTN_S_PER_PARAM * params
            continue
        tensors = spec.tensors_of(g.name)
        if not tensors:
            continue
        cost = g.size * g.size * 4
        temps = COST_CHUNKS * _chunk_bytes(max(_numel(spec.shapes[n]) for n in tensors))
        term_pair = max(term_pair, cost + max(pair[n] for n in tensors) + temps)
        term_temp = max(term_temp, cost + temps)
        solver_peak = max(solver_peak, int(cost * (1 + SOLVER_BYTES_PER_ENTRY / 4)))
        if g.fixed:
            continue
        owner = own.group_owner.get(g.name)
        for n in tensors:
            axes = sum(1 for r in spec.axes[n] if r is not None and r.group == g.name)
            flops_r[owner if owner is not None else own.tensor_owner.get(n, 0)] += 2.0 * g.size * _numel(
                spec.shapes[n]) * axes
        solve_r[owner if owner is not None else 0] += SOLVE_S_PER_ENTRY * g.size * g.size
    largest_pair = max(pair.values(), default=0)
    attn_peak = max((ATTN_BYTES_PER_PARAM * sum(_numel(spec.shapes[n]) for n in spec.tensors_of(g.name))
                     for g in spec.groups.values() if g.is_attention), default=0)
    stats_temp = STATS_CHUNKS * _chunk_bytes(max((_numel(spec.shapes[n]) for n in names), default=0))
    work_streaming = max(term_pair, largest_pair + stats_temp, solver_peak, attn_peak)
    work_cached = max(term_temp, stats_temp, solver_peak, attn_peak)  # the pairs are in the cache
    cache = max(cache_r, default=0)
    parts = {"base": BASE_RSS, "term_step": int(term_pair), "stats_pass": int(largest_pair + stats_temp),
             "solve_step": int(solver_peak), "attention_layer": int(attn_peak), "cache": int(cache)}
    if device.type == "cuda":
        # weights and costs live on the GPU; the host holds a tensor pair in flight and the solver's copy
        streaming = int((BASE_RSS + max(largest_pair, solver_peak)) * ALLOC_SLACK)
        cached = streaming
    else:
        streaming = int((BASE_RSS + work_streaming) * ALLOC_SLACK)
        cached = int((BASE_RSS + cache + work_cached) * ALLOC_SLACK)
    rate = gemm_rate(device)
    # each tensor is read for two groups per sweep (its layer's and the residual's); the first read
    # (statistics, J, NaN/Inf) once
    per_rank = [flops_r[r] / rate + solve_r[r] + 2 * cache_r[r] / READ_BYTES_PER_S for r in range(world)]
    sweep_s = max(per_rank, default=0.0)
    prepare_s = STARTUP_S + max(cache_r, default=0) / STATS_BYTES_PER_S
    return MatchEstimate(streaming, cached, cache, sweep_s, prepare_s, max(flops_r, default=0.0), parts, world)


def choose_mode(est: MatchEstimate, memory: float | None, cache: bool | None) -> str:
    """``cached`` when forced or when its predicted peak fits the budget, else ``streaming``;
    RefusedError (exit 7) when even streaming does not fit."""
    budget, how = budget_bytes(memory)
    if cache is None and est.streaming > budget:
        raise RefusedError(f"matching needs about {human(est.streaming)} of memory (streaming, predicted) but the "
                           f"budget is {human(budget)} ({how}); nothing was done. Free memory, pass a larger "
                           "--memory, or run on several processes (torchrun, see docs/scale.md)")
    if cache is not None:
        return "cached" if cache else "streaming"
    return "cached" if est.cached <= budget else "streaming"


def _largest_moving(model: Model, spec: Spec | None = None) -> int:
    """Bytes of the largest tensor whose axis-0 rows are permuted (read whole by apply / rebasin transfer)."""
    spec = spec or model.spec
    best = 0
    for name, info in model.checkpoint.tensors.items():
        axes = spec.axes.get(name)
        if axes and axes[0] is not None:
            best = max(best, info.nbytes)
    return best


def estimate_apply(model: Model) -> JobEstimate:
    whole = _largest_moving(model)
    chunks = APPLY_CHUNKS * _chunk_bytes(_largest_numel(model))
    peak = int((APPLY_BASE_RSS + whole + chunks) * ALLOC_SLACK)
    seconds = STARTUP_S + model.checkpoint.nbytes() / APPLY_BYTES_PER_S
    return JobEstimate("apply", peak, seconds, "streaming",
                       {"base": APPLY_BASE_RSS, "largest_moving_tensor": whole, "chunks": chunks})


def estimate_write(a: Model, b: Model, rebasin: bool, vocab_tensors: list[str] | None = None) -> JobEstimate:
    """The write phase of a transfer: row chunks of A, A_ft and B (diff), plus A and A_ft whole
    for tensors whose rows move (rebasin), plus float32 copies of vocabulary-remapped tensors."""
    whole = 2 * _largest_moving(a) if rebasin else 0
    vocab = 0
    for name in vocab_tensors or []:
        vocab = max(vocab, 4 * 4 * max(a.checkpoint.tensors[name].numel, b.checkpoint.tensors[name].numel))
    chunks = DIFF_CHUNKS * _chunk_bytes(_largest_numel(b))
    peak = int((DIFF_BASE_RSS + max(whole + chunks, vocab)) * ALLOC_SLACK)
    seconds = STARTUP_S + b.checkpoint.nbytes() / DIFF_BYTES_PER_S
    return JobEstimate("transfer-write", peak, seconds, "streaming",
                       {"base": DIFF_BASE_RSS, "whole_tensors": whole, "chunks": chunks,
                        "vocab_tensor": vocab})


CALIB_BASE_RSS = 450 * MIB  # calibration: torch and transformers imported
LOGIT_TEMPS = 5  # one probe chunk's output: logits (forward dtype), in float32, targets in float32, p·y, logsumexp


def estimate_calibration(n_params: int, largest: int, ft_bytes: int, b_bytes: int, forward_bytes: int,
                         positions: int, chunk_positions: int, vocab: int, target_bytes: int) -> int:
    """Peak RSS of α calibration (:mod:`rebasin.calibrate`), which holds one model at a time where it can.

    First A_ft (``ft_bytes`` per parameter as loaded) and τ (``forward_bytes``), with four float32
    copies of the largest tensor while τ is formed (A_ft's, A's, their difference, its permutation),
    then beside them the sampler's logits (``positions × vocab × forward_bytes``), the fine-tune's
    targets made from them (``positions × vocab × target_bytes``) and one chunk's float32
    temporaries; then B's values as loaded (``b_bytes``), B's module (``forward_bytes``), δ, the
    targets and either the null model's σ(δ) of one tensor or one probe chunk's outputs.
    """
    targets = positions * vocab * target_bytes
    chunk_temps = LOGIT_TEMPS * 4 * chunk_positions * vocab
    first = n_params * (ft_bytes + forward_bytes) + max(4 * 4 * largest,
                                                        positions * vocab * forward_bytes + targets + chunk_temps)
    second = (n_params * (b_bytes + 2 * forward_bytes) + targets
              + max(2 * 4 * largest, chunk_temps))
    return int((CALIB_BASE_RSS + max(first, second)) * ALLOC_SLACK)


def check_budget(job: str, est: JobEstimate, memory: float | None) -> None:
    """RefusedError (exit 7), before any work, when ``est.peak`` exceeds the budget."""
    budget, how = budget_bytes(memory)
    if est.peak > budget:
        raise RefusedError(f"{job} needs about {human(est.peak)} of memory (predicted) but the budget is "
                           f"{human(budget)} ({how}); nothing was done")
