"""What α calibration costs next to the match, on a ~125M-parameter Llama-shaped pair.

Checkpoints: :func:`benchmarks.bench_scale.build_checkpoints` (bf16, random init, cached):
``A``; ``B = π0(A) + 1 % noise`` (a planted re-basin pair); ``A_ft = A + τ`` (τ 5 % of A's
scale), so the best transfer is ``B + 1·π0(τ)``. A second new base, ``B'``, is an independent
random initialisation (the ``A`` of seed 1): the match's hard case (weak signal, more sweeps).
Shape ``llama-125m``: 12 layers of d_model 768, d_ff 2048, 12 heads / 4 KV heads, 32000-token
vocabulary, untied (124.7 M parameters); ``--quick``: ``llama-tiny`` (2 layers of 64).

In one process, after importing transformers and its Llama and Qwen2 modeling code (timed on its
own; a fresh ``rebasin transfer`` pays it once, in a thread beside the match): :data:`REPEATS`
rounds of ``match(A, B)`` followed by ``calibrate(..., alpha="auto")`` with π from that match and
today's defaults (probe size by model size; bfloat16 forwards where this CPU's bfloat16 GEMMs are
fast). Each round pairs a match with a calibration back to back, so both see the same machine
(run to run, this shared 2-core machine varied by ±20% and more, match and calibration alike):
the record gives the medians of the seconds and of the per-round ratio, and every round's ratio.
Each round also runs, after the default calibration, one that measures every probe
(``CLEAR_Z = ∞``: no curve settled on half the probes, no null model stopped early — the
previous release's calibration, for a comparison on the same machine in the same minutes).
Then, once each, the previous default probe shape (32 × 32: the same tokens in twice the
sampling steps) and the other target (``--alpha-target transferred``: A is run over the probes
too); then the same rounds onto ``B'``. Each record also has the target, the α found,
evaluations, the forward dtype, probes, the verdict, seconds per phase (first round), and the
process's peak RSS while calibrating in the first round (sampled every 20 ms; RSS before it
beside) next to the transfer's prediction (:func:`rebasin.calibrate.predicted_peak`, which
assumes today's forward dtype). The planted pair is the match's easiest case (the row bound
settles every solve); onto ``B'`` the match takes more sweeps.

Each default record also accounts for its forwards (:func:`_floor`): the token-forwards it
ran (the sampler's ``count × length``, every curve point's and the null model's probe tokens), their
GEMM FLOPs, and ``gemm_floor_s``, the seconds those GEMMs alone take at the rate this machine gives
the model's own weight shapes at the calibration's row counts (timed in the same run,
``gemm_gflops_eval`` / ``_sample``): what any calibration on these probes costs here at least.
``floor_over_match`` sets that against the round's match, and ``match_cores`` is the match's CPU
seconds over its wall seconds (cores it kept busy: what work run beside it could use).

Then the same match and calibration (defaults) on the scale benchmark's planted Qwen2-0.5B-shaped
pair (494M parameters, 151936-token vocabulary; ``--quick``: its tiny Qwen2): how the fraction
moves with size.

``REBASIN_CALIBRATION_LARGER=llama-2b`` runs only the scale benchmark's 1.9B-parameter
Llama-3.2-like planted pair instead, one round (``--json benchmarks/results/calibration-cpu-2b.json``;
~15 min on 2 cores).

Reproduce: ``python -m benchmarks calibration`` (~7 min idle on 2 cores, plus a few minutes to
build the checkpoints once; ``--quick``: tiny models, one round).
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.bench_scale import build_checkpoints
from benchmarks.common import timeit

if TYPE_CHECKING:
    from rebasin.calibrate import Calibration

SHAPES = {
    "llama-125m": {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 4, "intermediate_size": 2048, "vocab_size": 32000,
                   "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "llama-tiny": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
                   "tie_word_embeddings": False, "max_position_embeddings": 256},
}


REPEATS = 3  # rounds of match + calibration per default case (the machine varies ±20% run to run)


def _cpu_seconds() -> float:
    """This process's CPU seconds so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gemm_shapes(tensors: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(out, in) of every weight a forward multiplies by, from a Llama/Qwen2-named checkpoint's tensor
    infos: the 2-D weights but the input embedding (``embed_tokens``, a lookup), and that embedding as
    the head where the head is tied to it (no ``lm_head.weight``)."""
    shapes = [tuple(i.shape) for n, i in tensors.items()
              if len(i.shape) == 2 and n.endswith(".weight") and "embed_tokens" not in n]
    if not any(n.endswith("lm_head.weight") for n in tensors):
        shapes += [tuple(i.shape) for n, i in tensors.items() if n.endswith("embed_tokens.weight")]
    return shapes


_GEMM_S: dict[tuple[tuple[tuple[int, int], ...], int, torch.dtype], float] = {}


def _gemm_seconds(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype) -> float:
    """Seconds for ``rows`` tokens through every GEMM of ``shapes`` on this machine (each distinct shape
    timed, the median of five, then counted as often as it occurs)."""
    key = (tuple(shapes), rows, dtype)
    if key not in _GEMM_S:
        total = 0.0
        for (out, inp), times in Counter(shapes).items():
            x, w = torch.randn(rows, inp).to(dtype), torch.randn(out, inp).to(dtype)
            seconds, _ = timeit(lambda x=x, w=w: x @ w.T, repeat=5)
            total += times * seconds
        _GEMM_S[key] = total
    return _GEMM_S[key]


def _floor(c: Calibration, model_dir: Path) -> dict[str, Any]:
    """The forwards "auto" calibration ``c`` ran with the fine-tune target — the sampler's ``count × length``
    tokens, every point of the curve on ``c.measured`` probes, the null model on ``c.null_probes`` — and
    the seconds their GEMMs alone take here (empty for other requests and targets, whose forwards this
    does not count). A null model measured on half the probes and then dropped, because every probe
    overturned the verdict, leaves ``null_probes`` None: its forwards are then not counted."""
    from rebasin.calibrate import chunk_size
    from rebasin.io.checkpoint import open_checkpoint

    if c.requested != "auto" or c.target != "finetune" or c.probes.get("kind") != "sampled":
        return {}
    count, length = c.probes["count"], c.probes["length"]
    sample, evaluate = count * length, (len(c.curve) * c.measured + (c.null_probes or 0)) * length
    checkpoint = open_checkpoint(model_dir)
    shapes = _gemm_shapes(checkpoint.tensors)
    macs = sum(o * i for o, i in shapes)
    rows = chunk_size(count, length, int(checkpoint.config.get("vocab_size") or 1)) * length
    dtype = getattr(torch, c.dtype)
    t_sample, t_eval = _gemm_seconds(shapes, count, dtype), _gemm_seconds(shapes, rows, dtype)
    floor = sample / count * t_sample + evaluate / rows * t_eval
    return {"token_forwards": sample + evaluate, "sampled_tokens": sample, "evaluated_tokens": evaluate,
            "forward_tflop": round(2 * macs * (sample + evaluate) / 1e12, 3),
            "gemm_gflops_sample": round(2 * macs * count / t_sample / 1e9),
            "gemm_gflops_eval": round(2 * macs * rows / t_eval / 1e9), "gemm_floor_s": round(floor, 2)}


def _calibrate(dirs: dict[str, Path], perms: dict[str, torch.Tensor], family: str, **options: Any) -> dict[str, Any]:
    """One calibration, timed, with this process's peak RSS while it ran (sampled every 20 ms) and the
    transfer's prediction of it."""
    import rebasin.calibrate as cal
    from rebasin.calibrate import calibrate, predicted_peak

    clear_z = options.pop("clear_z", cal.CLEAR_Z)
    saved, cal.CLEAR_Z = cal.CLEAR_Z, clear_z
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        c = calibrate(dirs["A"], dirs["Aft"], dirs["B"], family, perms=perms, alpha="auto", **options)
    finally:
        cal.CLEAR_Z = saved
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    predicted = predicted_peak(dirs["Aft"], dirs["B"], options.get("probe_count"), options.get("probe_length"),
                               dirs["A"] if options.get("target") == "transferred" else None)
    return {"calibrate_s": seconds, "target": c.target, "alpha": round(c.alpha, 4), "evaluations": len(c.curve),
            "dtype": c.dtype, "probes": f"{c.probes['count']} x {c.probes.get('length', '?')}",
            "reduction": round(c.reduction, 4), "verdict": c.verdict, "measured": c.measured,
            "null_probes": c.null_probes,
            **{f"{k}_s": round(v, 2) for k, v in (c.phases or {}).items()},
            "rss_before_gib": round(before / 2**30, 2), "peak_rss_gib": round(peak[0] / 2**30, 2),
            "predicted_peak_gib": round(predicted / 2**30, 2), **_floor(c, dirs["B"])}


EVERY_PROBE = {"clear_z": math.inf}  # no curve settled on half the probes, no null model stopped early
EVERY_PROBE_LABEL = ("every probe measured (CLEAR_Z = ∞: the curve and the null model measured as the previous "
                     "release did)")


def _paired(a: Path, b: Path, device: str, family: str, dirs: dict[str, Path], repeats: int,
            ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``repeats`` rounds of ``match(a, b)`` then, with its π, a default calibration and one measuring every
    probe (:data:`EVERY_PROBE`), all back to back so they see the same machine. Per kind of calibration:
    medians of the seconds and of the per-round ratio to the round's match, the rounds' ratios, and
    the first round's calibration record (the default one is the first calibration after a match in
    its process, as in ``rebasin transfer``: its peak RSS is the one the plan predicts)."""
    from rebasin.matching.api import match

    rounds: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
    cores: list[float] = []
    result = None
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        result = match(a, b, device=device)
        seconds = time.perf_counter() - t0
        cores.append((_cpu_seconds() - cpu0) / seconds)
        rounds.append((seconds, _calibrate({**dirs, "B": b}, result.perms, family),
                       _calibrate({**dirs, "B": b}, result.perms, family, **EVERY_PROBE)))

    def summary(k: int) -> dict[str, Any]:
        ratios = [r[k]["calibrate_s"] / r[0] for r in rounds]
        match_s = statistics.median(r[0] for r in rounds)
        floor = rounds[0][k].get("gemm_floor_s")
        return {**rounds[0][k], "match_s": round(match_s, 2),
                "calibrate_s": round(statistics.median(r[k]["calibrate_s"] for r in rounds), 2),
                "calibrate_over_match": round(statistics.median(ratios), 3),
                "ratio_per_round": [round(x, 3) for x in ratios], "rounds": repeats,
                "match_cores": round(statistics.median(cores), 2),
                **({"floor_over_match": round(floor / match_s, 3)} if floor is not None else {})}
    return summary(1), summary(2), result


def _planted(name: str, arch: str, cfg: dict[str, Any], cache: Path, device: str, import_s: float,
             previous: bool, repeats: int) -> tuple[list[dict], dict[str, Path]]:
    """Match and calibrate the planted pair of ``name`` (:func:`_paired`), then the other cases once."""
    from rebasin.model import open_model

    dirs = build_checkpoints(name, arch, cfg, cache)
    family = "llama" if arch.startswith("Llama") else "qwen2"
    params = open_model(dirs["A"]).checkpoint.numel()
    rec, every, result = _paired(dirs["A"], dirs["B"], device, family, dirs, repeats)
    records = [{"case": f"{name} calibrate, {label}", "model": name, "transformers_import_s": round(import_s, 2),
                **r, "load1": round(os.getloadavg()[0], 2), "params": params}
               for label, r in (("defaults", rec), (EVERY_PROBE_LABEL, every))]
    print(records[-2:], flush=True)
    cases = []
    if previous:
        cases.append(("32 x 32 probes (the previous default shape)", {"probe_count": 32, "probe_length": 32}))
        cases.append(("--alpha-target transferred", {"target": "transferred"}))
    for label, options in cases:
        one = _calibrate(dirs, result.perms, family, **options)
        rec = {"case": f"{name} calibrate, {label}", "model": name, "match_s": records[0]["match_s"],
               "transformers_import_s": round(import_s, 2), **one, "load1": round(os.getloadavg()[0], 2),
               "params": params, "rounds": 1}
        rec["calibrate_over_match"] = round(rec["calibrate_s"] / rec["match_s"], 3)
        if "gemm_floor_s" in rec:
            rec["floor_over_match"] = round(rec["gemm_floor_s"] / rec["match_s"], 3)
        rec["calibrate_s"] = round(rec["calibrate_s"], 2)
        records.append(rec)
        print(rec, flush=True)
    return records, dirs


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.bench_scale import configs
    from rebasin.hf import require_transformers
    from rebasin.model import open_model

    cache = Path(os.environ.get("REBASIN_SCALE_CACHE", Path.home() / ".cache" / "rebasin" / "scale"))
    name = "llama-tiny" if quick else "llama-125m"
    repeats = 1 if quick else REPEATS
    t0 = time.perf_counter()
    transformers = require_transformers("the calibration benchmark")
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM"):  # their modeling code: imported once per process
        getattr(transformers, arch)
    import_s = time.perf_counter() - t0
    larger = [x for x in os.environ.get("REBASIN_CALIBRATION_LARGER", "").split(",") if x]
    unknown = set(larger) - set(configs(quick))
    if unknown:
        raise SystemExit(f"REBASIN_CALIBRATION_LARGER: unknown pair(s) {sorted(unknown)}; choose from "
                         f"{', '.join(configs(quick))}")
    if larger:  # only those pairs
        return [rec for big, (arch, cfg) in configs(quick).items() if big in larger
                for rec in _planted(big, arch, cfg, cache, device, import_s, False, 1)[0]]
    records, dirs = _planted(name, "LlamaForCausalLM", SHAPES[name], cache, device, import_s, True, repeats)
    independent = build_checkpoints(name, "LlamaForCausalLM", SHAPES[name], cache, seed=1)["A"]
    rec, every, other = _paired(dirs["A"], independent, device, "llama", dirs, repeats)
    for label, r in (("defaults", rec), (EVERY_PROBE_LABEL, every)):
        records.append({"case": f"{name} calibrate onto an independent B', {label}", "model": name,
                        "match_sweeps": other.sweeps, "transformers_import_s": round(import_s, 2), **r,
                        "load1": round(os.getloadavg()[0], 2), "params": open_model(dirs["A"]).checkpoint.numel()})
        print(records[-1], flush=True)
    for big, (arch, cfg) in configs(quick).items():  # the fraction at the next size up (scale benchmark's pair)
        if big.startswith("qwen2"):
            records += _planted(big, arch, cfg, cache, device, import_s, False, repeats)[0]
    return records
