"""Data-free calibration of the task-vector scale α, and the transferability verdict.

The candidate written by a transfer is ``C(α) = B + α·π(τ)`` with ``τ = A_ft − A`` (π = identity
in diff mode). Without data, the best stand-in for "does C(α) do the fine-tune's job" is "does
C(α) behave like A_ft": calibration minimises the divergence

    D(α) = E_x [ KL( A_ft(x) ‖ C(α)(x) ) ]

over probe inputs x (see :mod:`rebasin.probes`) — KL between output distributions for models
with logits, normalised mean squared error of the output features for headless models.
D(0) is B's own divergence, so the chosen α never leaves the output further from the
fine-tune than B is, and ``1 − D(α*)/D(0)`` measures what carried over.

Target ``transferred`` (``--alpha-target``): the candidate imitates T, the fine-tune's change
carried over in output space, ``log p_T(x) = log p_B(x) + log p_Aft(x) − log p_A(x)``
(renormalised; features: ``f_B + f_Aft − f_A``), instead of A_ft itself. Where the fine-tune
did not act, T is B, so keeping B's own behaviour there is not penalised, and D(0) measures the
fine-tune's change in B's frame rather than everything that tells A_ft from B (a whole other
training run, between independent bases). It costs one more forward, A's (B's forward that forms
T gives D(0) too).

* ``auto``: D at α = 0, ½, 1, then a bracket of the minimum inside [0, :data:`ALPHA_MAX`] (D(2)
  when D still falls at 1, D(¼) when it rises from 0), then parabolic refinement to
  :data:`REFINE_TOL` (golden-section steps where a parabola is unusable) — 4 to 8 forwards for
  the smooth, single-dipped curves task vectors give. A minimum at α = :data:`ALPHA_MAX` is
  reported, never extended: D still falling there means the candidate imitates the fine-tune
  by amplifying the task vector, not that the fine-tune carries over (see :func:`carries_over`).
  The α written is the smallest whose D is within one standard error of the minimum's, paired
  over the probes (:func:`within_noise`; no extra forward to find it, one to measure it): where
  the probes cannot tell them apart, the α nearer to B, which costs B's own task less; when even
  α = 0 is within that noise, the verdict is "does not carry over". The search runs on half the
  probes first; the other half is measured at the same α's (and the search brackets and refines
  again) only when the first half leaves the answer open (:func:`settled`): when it lowered α, or
  the verdict's threshold or its null model is within the noise. A smaller standard error is
  unlikely to lower α where a larger one did not, so a clear curve costs half its forwards.
* ``auto-layer``: one α per block (a transformer layer, or the embeddings/head outside the
  layers), fitted by Adam on the same D, regularised toward the global α; kept only if on
  held-out probes it lowers D below the best global α's by more than the paired standard
  error. Only the α's are fitted, never the weights.

Everything runs on ``transformers`` modules: module names can differ from checkpoint names,
so tensors are matched to blocks by :func:`block_of`, which reads the same block from both.

Cost: the probe forwards dominate (sampling the probes, which gives the fine-tune's targets on
sampled probes; other probes take one more forward for them; one forward of the candidate per α
evaluated, 4–8, on half the probes when that settles it, one more when the α written is not one of
them, and the null model's, which stops after a chunk of probes once its answer is clear). Models of
:data:`BF16_MIN_PARAMS` parameters and more run those forwards in bfloat16 where this machine's
bfloat16 GEMMs are at least :data:`BF16_SPEEDUP` times its float32 ones (CPUs with AMX or
AVX512-BF16); B's values are kept exactly as loaded, δ in the forward dtype, and every sum
``B + α·δ`` is formed in float32 and rounded once into the module (the search evaluates only α's
the forward dtype holds, ≤ 0.4% from the α asked for, whose sums take one fused add: see
:meth:`Candidate.set`). The fine-tune and the candidate run in the same dtype, so D(α) keeps its
minimum where B + α·δ meets A_ft; rounding adds a small floor (in bfloat16 the sampler's
step-by-step logits and a full forward differ by up to ~0.06), far below the divergences
compared. Memory: one model at a time (A_ft and τ, then B), see :func:`predicted_peak`.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rebasin.errors import RebasinError
from rebasin.estimate import estimate_calibration, gemm_rate
from rebasin.hf import load_hf_model, module_spec, primary_output
from rebasin.io.checkpoint import DTYPES, Checkpoint, open_checkpoint
from rebasin.permutation import has_rotations, permute_tensor, random_perms
from rebasin.probes import Probes, cast_inputs, make_probes
from rebasin.streaming import reuse_freed_memory
from rebasin.symmetry import gather
from rebasin.vocab import VocabMap

ALPHA_MAX = 2.0
PROBES_SMALL = (32, 128)  # synthetic probes (count, tokens each) by default
PROBES_LARGE = (64, 16)  # ... for models of LARGE_PARAMS parameters and more: forwards cost ∝ parameters ×
# tokens, a sampling step costs about the same for 32 or 64 rows (it reads every weight once), and α's
# standard error (within_noise) falls with the number of probes, the independent units
LARGE_PARAMS = 100_000_000
CLASSIFIER_PROBES = 128  # image classifiers' default count: one output distribution per probe (an LM gives
# one per token), and the standard error that settles α (within_noise) needs that many
REFINE_STEPS = 5
REFINE_TOL = 0.05  # α resolution of the refinement: D is flat to a fraction of a percent within it
CARRY_THRESHOLD = 0.10  # relative divergence reduction above which the fine-tune "carries over"
NULL_SHARE = 0.5  # ... of which at least this share must vanish under a random symmetry
CLEAR_Z = 3.0  # a measurement over the probes stops once its answer is this many paired standard errors clear
LAYER_STEPS = 150
LAYER_LR = 0.03
LAYER_REG = 0.1  # weight of Σ_b (α_b − α)² relative to D(α)
SET_SLICE = 1 << 18  # elements per float32 slice when the candidate's parameters are set (1 MiB)
LOGIT_BUDGET = 1 << 28  # bytes of teacher probabilities kept in float32 (else bfloat16)
KL_BLOCK = 1 << 19  # output values per block of the KL (2 MiB in float32: a core's cache)
TINY_PROB = 1e-30  # probabilities are floored here before their logs (a token both models rule out)
TARGETS = ("finetune", "transferred")  # what the candidate is made to imitate (see the module docstring)
BF16_MIN_PARAMS = 50_000_000  # smaller models: float32 forwards (cheap, and identical on every CPU)
BF16_SPEEDUP = 2.0  # bfloat16 forwards only where bfloat16 GEMMs run at least this much faster
_LAYER = re.compile(r"\.(\d+)(?=\.)")


def probe_shape(n_params: int, count: int | None = None, length: int | None = None,
                config: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(probe count, tokens each): the given ones, else the defaults for a model of ``n_params`` with
    checkpoint ``config`` (image classifiers: :data:`CLASSIFIER_PROBES` images)."""
    default_count, default_length = PROBES_LARGE if n_params >= LARGE_PARAMS else PROBES_SMALL
    if any(a.endswith("ForImageClassification") for a in (config or {}).get("architectures") or []):
        default_count = CLASSIFIER_PROBES
    return count or default_count, length or default_length


def chunk_size(count: int, per_probe: int, outputs: int) -> int:
    """Probes per forward: at least 4 chunks (auto-layer fits on minibatches and holds half of them
    out), and about 2²⁶ output values (``per_probe`` positions × ``outputs``) per chunk at most."""
    return max(1, min(count // 4, (1 << 26) // max(1, per_probe * outputs)))


def forward_dtype(n_params: int) -> torch.dtype:
    """The dtype of the probe forwards for a model of ``n_params`` parameters (see the module docstring)."""
    if n_params < BF16_MIN_PARAMS:
        return torch.float32
    fast = gemm_rate("cpu", torch.bfloat16) >= BF16_SPEEDUP * gemm_rate("cpu", torch.float32)
    return torch.bfloat16 if fast else torch.float32


def representable(alpha: float, dtype: torch.dtype) -> float:
    """``alpha`` rounded to the nearest value of ``dtype``."""
    return float(torch.tensor(alpha, dtype=torch.float64).to(dtype))


def block_of(name: str) -> str:
    """The α block of a tensor: ``<first component>.<layer index>``, or ``<first component>`` outside layers.

    ``model.layers.3.mlp.up_proj.weight`` → ``model.3``; ``vit.encoder.layer.3.output.dense.weight``
    and its renamed module ``vit.layers.3.mlp.fc2.weight`` → ``vit.3``; ``lm_head.weight`` → ``lm_head``.
    """
    head = name.split(".", 1)[0]
    m = _LAYER.search(name)
    return f"{head}.{m.group(1)}" if m else head


@dataclass
class Calibration:
    """What calibration found (``to_dict`` is the report's ``calibration`` entry).

    Attributes:
        alpha: the global α written (for ``auto-layer``, the α its blocks were regularised to).
        alphas: per-block α when ``auto-layer`` was kept, else None.
        requested: "auto", "auto-layer", or the number the user gave (then only D(0), D(α) are measured).
        divergence: "kl" (output distributions) or "nmse" (headless models' features).
        kl_base: D(0), the new base's divergence from the fine-tune. It, ``kl_chosen``, ``kl_at_one``,
            ``reduction``, ``curve`` and ``noise`` are over the ``measured`` probes.
        kl_chosen: D at the written α (α's).
        kl_at_one: D(1) when measured, else None.
        reduction: ``1 − kl_chosen / kl_base``.
        kl_null, null_reduction: D and its reduction when the same task vector is moved by a random
            symmetry σ (``B + α·σ(π(τ))``): what the task vector's invariant parts and its size alone
            buy. A transfer "carries over" only when most of the gain is lost under σ. None when
            the verdict is "does not carry over" without it (the null is then not evaluated).
            Measured on the first ``null_probes`` probes, against D(0) on the same probes (the
            measurement stops once the verdict is clear, see :func:`_null_model`); ``kl_null`` is
            ``kl_base · (1 − null_reduction)``.
        curve: ``[[α, D(α)], ...]`` sorted by α.
        verdict: "carries over" or "does not carry over".
        line: the one-line verdict the CLI prints.
        dtype: the dtype of the probe forwards ("float32" or "bfloat16").
        phases: seconds per phase: load (the fine-tune and the task vector), probes, teacher (the
            fine-tune's targets), base (B), search (the α evaluations, and the per-layer fit), null.
        target: "finetune" (D compares with A_ft) or "transferred" (with A_ft's change applied to B).
        measured: the probes the curve was measured on (half of them when that settled "auto", see
            :func:`settled`); ``probes`` describes all that were made.
        alpha_min: where the search found D's minimum ("auto"); ``alpha`` is the smallest α whose D is
            within one standard error of it (:func:`within_noise`). None for a given α.
        noise: ``[[α, SE], ...]`` for every point of ``curve``: the paired standard error (over the
            probes) of ``D(α) − D(alpha_min)``, the margin :func:`within_noise` allows. None for a
            given α.
        lowered: the α written was lowered from ``alpha_min`` by :func:`within_noise` (the verdict may
            still have set it to 0).
    """

    alpha: float
    alphas: dict[str, float] | None
    requested: str
    divergence: str
    kl_base: float
    kl_chosen: float
    kl_at_one: float | None
    reduction: float
    kl_null: float | None
    null_reduction: float | None
    curve: list[list[float]]
    verdict: str
    line: str
    probes: dict[str, Any]
    layer_fit: dict[str, Any] | None
    seconds: float
    dtype: str = "float32"
    phases: dict[str, float] | None = None
    target: str = "finetune"
    alpha_min: float | None = None
    noise: list[list[float]] | None = None
    lowered: bool = False
    null_probes: int | None = None
    measured: int | None = None

    def alpha_of(self, tensor: str) -> float:
        """The α a checkpoint (or module) tensor receives."""
        if self.alphas is None:
            return self.alpha
        return self.alphas.get(block_of(tensor), self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Candidate:
    """``B + α·δ`` as a live module: ``base`` and ``delta`` are keyed by the module's parameter names.
    The parameters with a delta hold nothing meaningful until the first :meth:`set`.

    ``delta`` holds π(τ) already placed in B's shapes (vocabulary rows mapped); parameters
    without a delta stay B's. ``base`` holds B's values as loaded (exact: float32, or the
    checkpoint's own dtype); each parameter is set to the float32 sum ``base + α·δ`` rounded to
    the module's ``dtype``.
    """

    def __init__(self, module: torch.nn.Module, delta: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> None:
        self.module = module
        self.params = dict(module.named_parameters())
        self.base = {k: self.params[k].detach() for k in delta}  # B's values as loaded, only ever read
        for k in delta:  # set() writes into fresh memory: module.to(dtype) allocates it, or this does
            p = self.params[k]  # (writing into tensors transformers memory-mapped copies a page per fault);
            if p.dtype == dtype:  # every set() writes all of it, the first before any forward
                p.data = torch.empty_like(p)
        module.to(dtype)
        self.dtype = dtype
        self.delta = delta
        self.blocks = sorted({block_of(k) for k in delta})
        # float32 copies of a slice of base and δ: small enough to stay in cache, allocated once
        self.scratch = (torch.empty(SET_SLICE), torch.empty(SET_SLICE))

    def representable(self, alpha: float) -> float:
        """``alpha`` rounded to the nearest value the module's dtype holds (≤ 0.4% away in bfloat16),
        which :meth:`set` sums in one fused step (see there): the search evaluates only such α's.
        A float32 module sums every α that way: α is returned as it is."""
        return alpha if self.dtype == torch.float32 else representable(alpha, self.dtype)

    @torch.no_grad()
    def set(self, alpha: float | Mapping[str, float],
            transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Parameters ← ``base + α·δ`` (``transform(name, δ)`` in place of δ when given, tensor by tensor),
        summed in float32 and rounded once into the module's dtype.

        One fused ``torch.add`` when the operands' common dtype is float32 (exact), or when α is a
        value of their narrower common dtype (:meth:`representable`: α is used unrounded; a rare
        element — 1 of 630k in the test, none of 16M in another check — gets α·δ rounded to its
        last place first). Any other α (a
        bfloat16 sum would round α itself, moving every element) is summed in float32 slice by
        slice, both operands converted first.
        """
        for k, d in self.delta.items():
            a = float(alpha if isinstance(alpha, (int, float)) else alpha.get(block_of(k), 0.0))
            if transform is not None:
                d = transform(k, d)
            p, base = self.params[k], self.base[k]
            compute = torch.promote_types(base.dtype, d.dtype)
            if compute == torch.float32 or a == representable(a, compute):
                torch.add(base, d, alpha=a, out=p)
                continue
            flat_p, flat_b, flat_d = p.detach().view(-1), base.reshape(-1), d.reshape(-1)
            for i in range(0, flat_p.numel(), SET_SLICE):
                j = min(i + SET_SLICE, flat_p.numel())
                total = self.scratch[0][:j - i].copy_(flat_b[i:j])
                part = flat_d[i:j] if d.dtype == torch.float32 else self.scratch[1][:j - i].copy_(flat_d[i:j])
                flat_p[i:j].copy_(total.add_(part, alpha=a))

    def functional(self, alphas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters as differentiable functions of per-block α's ``(n_blocks,)``."""
        index = {b: i for i, b in enumerate(self.blocks)}
        return {k: (self.base[k].float() + alphas[index[block_of(k)]] * d.float()).to(self.params[k].dtype)
                for k, d in self.delta.items()}


def bridge_vocab(probes: Probes, vocab: VocabMap, seed: int) -> tuple[Probes, Probes]:
    """(teacher probes in A's token ids, candidate probes in B's): tokens B lacks are replaced by shared ones."""
    if "input_ids" not in probes.inputs:
        return probes, probes
    a_to_b = torch.full((vocab.size_a,), -1, dtype=torch.long)
    a_to_b[vocab.a_rows] = vocab.b_rows
    ids = probes.inputs["input_ids"].clone()
    lost = a_to_b[ids] < 0
    gen = torch.Generator().manual_seed(seed)
    ids[lost] = vocab.a_rows[torch.randint(0, vocab.shared, (int(lost.sum()),), generator=gen)]
    teacher = Probes({**probes.inputs, "input_ids": ids}, probes.kind, probes.positions, probes.meta)
    student = Probes({**probes.inputs, "input_ids": a_to_b[ids]}, probes.kind, probes.positions, probes.meta)
    return teacher, student


def storage_dtype(numel: int) -> torch.dtype:
    """The teacher targets' storage dtype for ``numel`` values: float32 within :data:`LOGIT_BUDGET`, else bfloat16."""
    return torch.bfloat16 if numel * 4 > LOGIT_BUDGET else torch.float32


def distribution(logits: torch.Tensor, store: torch.dtype, shift: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p = softmax(x) stored in ``store``, Σ p·log p in float32, Σ p as stored) per position of
    ``x = logits`` ``(..., V)``, or of ``x = log_softmax(logits) + shift`` (same shape), computed in
    float32 a few positions at a time: their copies stay in cache."""
    size = logits.shape[-1]
    flat = logits.reshape(-1, size)
    moved = shift.reshape(-1, size) if shift is not None else None
    p = torch.empty(flat.shape, dtype=store)
    neg_entropy, mass = torch.empty(flat.shape[0]), torch.empty(flat.shape[0])
    step = max(1, KL_BLOCK // size)
    for a in range(0, flat.shape[0], step):
        x = flat[a:a + step].float()
        if moved is not None:
            x = torch.log_softmax(x, dim=-1).add_(moved[a:a + step])
        logp = torch.log_softmax(x, dim=-1)
        pb = logp.exp()
        neg_entropy[a:a + step] = (pb * logp).sum(-1)
        kept = p[a:a + step]
        kept.copy_(pb)
        mass[a:a + step] = (kept if store == torch.float32 else kept.float()).sum(-1)
    return p.view(logits.shape), neg_entropy.view(logits.shape[:-1]), mass.view(logits.shape[:-1])


class Teacher:
    """The fine-tune's output distributions on the probes, computed once, chunk by chunk (or taken
    from the logits the fine-tune sampled the probes with).

    With a vocabulary change the candidate reads ``student`` (B's token ids) and, where the
    output axis is the vocabulary, both distributions are restricted to the shared tokens.
    """

    def __init__(self, model: torch.nn.Module, probes: Probes, chunk: int, vocab: VocabMap | None = None,
                 seed: int = 0, out_index: torch.Tensor | None = None) -> None:
        self.vocab = vocab
        self.out_index = out_index  # a headless model's feature axis, A's basis → B's (:func:`output_index`)
        self.probes, self.student = bridge_vocab(probes, vocab, seed) if vocab is not None else (probes, probes)
        self.chunk = chunk
        self.dtype = next(model.parameters()).dtype
        self.targets: list[torch.Tensor] = []  # KL: probabilities p; NMSE: features
        self.neg_entropy: list[torch.Tensor] = []  # KL: Σ p·log p per position
        self.mass: list[torch.Tensor] = []  # KL: Σ p per position as stored
        self.kind = "kl"
        known = probes.logits if vocab is None else None  # the sampler's logits: A_ft's outputs already
        if known is not None:  # every target's size is known: stored at once in their storage dtype
            store = storage_dtype(known.numel())
            for sl in self.slices():
                self._append(*distribution(known[sl], store))
            return
        for _, y, has_logits in self._outputs(model, "a"):
            self.kind = "kl" if has_logits else "nmse"
            if has_logits:
                self._append(*distribution(y, torch.float32))
            else:
                self.targets.append(y)
        self._settle()

    def _append(self, p: torch.Tensor, neg_entropy: torch.Tensor, mass: torch.Tensor) -> None:
        self.targets.append(p)
        self.neg_entropy.append(neg_entropy)
        self.mass.append(mass)

    def _store(self) -> torch.dtype:
        return storage_dtype(sum(t.numel() for t in self.targets))

    def _settle(self) -> None:
        """Store the targets in :meth:`_store`'s dtype, then Σ p per position as stored (1 up to that
        rounding: keeps D(α) an exact cross-entropy), or the features' scale."""
        store = self._store()
        if self.kind == "kl" and any(t.dtype != store for t in self.targets):
            self.targets = [t.to(store) for t in self.targets]
            self.mass = [t.float().sum(-1) for t in self.targets]
        if self.kind == "nmse":
            allv = torch.cat([t.flatten(0, -2) for t in self.targets]).float()
            self.scale = float(allv.var(dim=0).mean().clamp_min(1e-12))

    @torch.no_grad()
    def _outputs(self, model: torch.nn.Module, side: str) -> Iterator[tuple[int, torch.Tensor, bool]]:
        """(chunk index, float32 output ``(chunk, ..., out)`` on the shared vocabulary, whether it is logits)
        of ``model`` on the probes: ``side`` "a" reads A's token ids (A, A_ft), "b" B's."""
        probes = self.probes if side == "a" else self.student
        dtype = next(model.parameters()).dtype
        for i, sl in enumerate(self.slices()):
            out = model(**cast_inputs(probes.batch(sl).inputs, dtype))
            has_logits = getattr(out, "logits", None) is not None or getattr(out, "logits_per_image", None) \
                is not None
            y = self._shared(primary_output(out).float(), side)
            if side == "a" and not has_logits and self.out_index is not None and y.shape[-1] == len(self.out_index):
                y = gather(y, -1, self.out_index)
            yield i, y, has_logits

    def subtract(self, model: torch.nn.Module) -> None:
        """Targets ← the fine-tune's change over ``model`` (its old base A), position by position:
        ``r = log p_ft − log p_A`` (logits) or ``f_ft − f_A`` (features). :meth:`onto` applies it to B."""
        floor = math.log(TINY_PROB)
        for i, y, _ in self._outputs(model, "a"):
            t = self.targets[i]
            if self.kind == "kl":
                r = t.float().clamp_min(TINY_PROB).log_() - torch.log_softmax(y, dim=-1).clamp_min(floor)
            else:
                r = t.float() - y
            self.targets[i] = r  # float32: a log-ratio up to ~140 in bfloat16 would be off by up to 0.5

    def onto(self, model: torch.nn.Module) -> list[tuple[torch.Tensor, int]]:
        """Targets ← ``model``'s (B's) outputs moved by the stored change (:meth:`subtract`): the fine-tune
        carried over in output space, ``log p_T = log p_B + r`` renormalised (logits) or ``f_B + r``.
        ``model`` is the candidate at α = 0: returns D(0) per chunk, in chunk order, as
        :func:`_chunk_sums` gives it (per-probe sums float64, positions), measured on these same forwards."""
        store, slices = self._store(), self.slices()
        parts: list[tuple[torch.Tensor, int]] = []  # every chunk is KL, or every chunk is features
        features: dict[int, torch.Tensor] = {}
        for i, y, _ in self._outputs(model, "b"):
            r = self.targets[i].float()
            if self.kind == "kl":
                self.targets[i], self.neg_entropy[i], self.mass[i] = distribution(y, store, shift=r)
                s, n = self._divergence(i, y, slices[i])
                parts.append((s.double(), n))
            else:
                self.targets[i] = y + r
                features[i] = y  # measured below: the features' scale needs every target first
        if features:
            self._settle()
        for i, y in features.items():
            s, n = self._divergence(i, y, slices[i])
            parts.append((s.double(), n))
        return parts

    def rows(self, chunks: list[int]) -> torch.Tensor:
        """The probe indices of ``chunks``, in the order :func:`_per_probe` concatenates their sums."""
        slices = self.slices()
        return torch.cat([torch.arange(slices[i].start, slices[i].stop) for i in chunks])

    def slices(self) -> list[slice]:
        n = len(self.probes)
        return [slice(i, min(i + self.chunk, n)) for i in range(0, n, self.chunk)]

    def _shared(self, y: torch.Tensor, side: str) -> torch.Tensor:
        if self.vocab is None:
            return y
        size, rows = (self.vocab.size_a, self.vocab.a_rows) if side == "a" else (self.vocab.size_b, self.vocab.b_rows)
        return gather(y, -1, rows) if y.shape[-1] == size else y

    def inputs(self, sl: slice) -> dict[str, torch.Tensor]:
        """The candidate's inputs for slice ``sl`` (floating inputs in the fine-tune's dtype, the candidate's too)."""
        return cast_inputs(self.student.batch(sl).inputs, self.dtype)

    def divergence(self, i: int, out: Any, sl: slice) -> tuple[torch.Tensor, int]:
        """(per-probe sums of the per-position divergences ``(probes in the chunk,)``, number of positions)
        of chunk ``i`` (``out``: a forward's output)."""
        return self._divergence(i, self._shared(primary_output(out), "b"), sl)

    def _divergence(self, i: int, y: torch.Tensor, sl: slice) -> tuple[torch.Tensor, int]:
        """:meth:`divergence` of the output ``y`` (any float dtype) on the shared vocabulary."""
        if self.kind == "kl":
            # KL(p ‖ softmax y) = Σ p·log p − Σ p·y + (Σ p)·logsumexp y, in float32, a few positions at a
            # time: their float32 copies stay in cache (4.7× faster than whole chunks at a 152k vocabulary)
            size = y.shape[-1]
            ys, ts = y.reshape(-1, size), self.targets[i].reshape(-1, size)
            ent, mass = self.neg_entropy[i].reshape(-1), self.mass[i].reshape(-1)
            step = max(1, KL_BLOCK // size)
            blocks = []
            for a in range(0, ys.shape[0], step):
                yb = ys[a:a + step].float()
                blocks.append(ent[a:a + step] - (ts[a:a + step].float() * yb).sum(-1)
                              + mass[a:a + step] * torch.logsumexp(yb, dim=-1))
            per = torch.cat(blocks).view(y.shape[:-1])
        else:
            per = (y.float() - self.targets[i].float()).pow(2).mean(-1) / self.scale
        pos = self.probes.positions
        if pos is not None and per.dim() == 2 and per.shape == pos[sl].shape:
            sel = pos[sl].to(per.device)
            return torch.where(sel, per, 0.0).sum(1), int(sel.sum())
        return per.reshape(per.shape[0], -1).sum(1), per.numel()


def mean_divergence(sums: torch.Tensor, positions: int) -> float:
    """D from per-probe sums ``(probes,)`` over ``positions`` output positions."""
    return max(float(sums.sum()) / max(positions, 1), 0.0)  # a KL estimate can round a hair below 0


def _per_probe(cand: Candidate, teacher: Teacher, alpha: float | Mapping[str, float],
               slices: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(per-probe sums of the divergence ``(probes,)`` float64, number of positions) at ``alpha`` over
    the chunks ``slices`` (all by default): D = sums.sum() / positions."""
    cand.set(alpha)
    sums, count = [], 0
    for s, n in _chunk_sums(cand, teacher, slices if slices is not None else range(len(teacher.targets))):
        sums.append(s)
        count += n
    return torch.cat(sums), count


def _chunk_sums(cand: Candidate, teacher: Teacher, chunks: Iterable[int]) -> Iterator[tuple[torch.Tensor, int]]:
    """Per chunk of ``chunks``, in order: (per-probe sums ``(probes in the chunk,)`` float64, positions) of
    the candidate as it is set."""
    all_slices = teacher.slices()
    with torch.no_grad():
        for i in chunks:
            sl = all_slices[i]
            s, n = teacher.divergence(i, cand.module(**teacher.inputs(sl)), sl)
            yield s.double(), n


def _search(f: Any, curve: dict[float, float]) -> None:
    """Evaluate ``f`` (D) at α = 0, ½, 1 and bracket its minimum in [0, ALPHA_MAX], then refine it."""
    for a in (0.0, 0.5, 1.0):
        f(a)
    best = min(curve, key=curve.get)
    if best == 1.0:
        f(ALPHA_MAX)
        if curve[ALPHA_MAX] < curve[1.0]:
            f(0.5 * (1.0 + ALPHA_MAX))  # shows whether D turns before the top end
    elif best == 0.0:
        f(0.25)
    _refine(f, curve, REFINE_STEPS, REFINE_TOL)


def within_noise(curve: Mapping[float, float], sums: Mapping[float, torch.Tensor], grid: int = 64) -> float:
    """The smallest α whose D is within one standard error of the minimum's: the α written by "auto".

    ``sums[α]`` are the per-probe sums behind ``curve[α] = sums[α].sum() / positions``. Probes are
    the independent units, so ``D(α) − D(α*)`` has the paired standard error
    ``√n · std_i(s_i(α) − s_i(α*)) / positions`` over the n probes. Between evaluated points each probe's
    s_i is the parabola through three consecutive evaluated points (no forward is spent); scanning
    down from the minimum α*, α is lowered while the rise of D stays within one standard error
    (the one-standard-error rule of model selection, with B as the simplest model). Where the probes
    cannot tell α* from a smaller α, the smaller one is written: it stays nearer to B, whose own
    task a larger task vector costs more. A minimum at 0 or at the top end is returned as it is, and
    so is the minimum when the α found is less than :data:`REFINE_TOL` below it.
    """
    xs = sorted(curve)
    best = min(curve, key=curve.get)
    i = xs.index(best)
    if i == 0 or i == len(xs) - 1 or any(sums.get(x) is None for x in xs[:i + 2]):
        return best
    ref = sums[best].double()
    n = ref.numel()
    if n < 2:
        return best  # no spread to measure
    lowest = best
    found = best
    for j in range(i - 1, -1, -1):  # segment [xs[j], xs[j+1]], scanned downward
        x = xs[j:j + 3]
        y = torch.stack([sums[a].double() for a in x])  # (3, n)
        grid_a = torch.linspace(xs[j + 1], xs[j], grid, dtype=torch.float64)
        basis = torch.stack([(grid_a - x[(k + 1) % 3]) * (grid_a - x[(k + 2) % 3])
                             / ((x[k] - x[(k + 1) % 3]) * (x[k] - x[(k + 2) % 3])) for k in range(3)], 1)
        rise = basis @ y - ref  # (grid, n)
        within = rise.sum(1) <= paired_spread(rise)
        if not bool(within.all()):
            first_out = int((~within).nonzero()[0, 0])
            found = float(grid_a[first_out - 1]) if first_out > 0 else lowest
            break
        lowest = found = xs[j]
    return found if best - found >= REFINE_TOL else best  # a smaller move is below the search's resolution


def paired_spread(diff: torch.Tensor) -> torch.Tensor:
    """``√n·std`` over the last axis of per-probe differences ``(..., n)``: the standard error of their
    sum (divided by the positions, of a difference of two D's)."""
    return math.sqrt(diff.shape[-1]) * diff.std(-1)


def lower_beyond_noise(sums: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether per-probe sums ``sums`` ``(n,)`` total lower than ``reference``'s (the same probes) by more
    than one paired standard error, ``√n·std_i(reference_i − sums_i)``: the margin :func:`within_noise`
    asks of any α further from B, asked of per-layer α's over the global one."""
    gain = (reference - sums).double()
    return float(gain.sum()) > (float(paired_spread(gain)) if gain.numel() > 1 else 0.0)


def clear_of_zero(g: torch.Tensor) -> bool:
    """Whether per-probe values ``g`` ``(n,)`` sum clear of 0: ``|Σ g|`` above :data:`CLEAR_Z` paired
    standard errors (:func:`paired_spread`; never with fewer than two probes)."""
    return g.numel() > 1 and abs(float(g.sum())) > CLEAR_Z * float(paired_spread(g))


def settled(sums: Mapping[float, torch.Tensor], chosen: float, alpha_min: float) -> bool:
    """Whether the curve measured on part of the probes already gives "auto"'s α, so that the rest need
    not be measured (the null model is asked the same of that part, see :func:`_null_model`).
    ``sums[α]``: per-probe sums over the probes measured (``sums[0.0]`` is B's).

    More probes shrink the standard error that :func:`within_noise` lowers α by: when even this one
    lowered nothing (``chosen`` is the minimum, and not the top end of the search), a smaller one
    is unlikely to (the rise it is compared with is re-estimated too). The verdict's threshold must
    be clear as well: whether the reduction at ``chosen`` reaches :data:`CARRY_THRESHOLD`, i.e.
    whether ``g_i = (1 − CARRY_THRESHOLD)·s_0,i − s_chosen,i`` sums to ≥ 0, must be answered
    (:func:`clear_of_zero`).
    """
    if chosen != alpha_min or alpha_min >= ALPHA_MAX or 0.0 not in sums:
        return False
    return clear_of_zero((1.0 - CARRY_THRESHOLD) * sums[0.0] - sums[chosen])


def _vertex(x0: float, x1: float, x2: float, f0: float, f1: float, f2: float) -> float:
    """The vertex of the parabola through three points (NaN when they are collinear)."""
    den = (x1 - x0) * (f1 - f2) - (x1 - x2) * (f1 - f0)
    return x1 - 0.5 * ((x1 - x0) ** 2 * (f1 - f2) - (x1 - x2) ** 2 * (f1 - f0)) / den if den != 0 else math.nan


def _refine(f: Any, curve: dict[float, float], steps: int, tol: float = 0.01) -> None:
    """Refine the minimum of ``f`` bracketed by the evaluated points: parabolic steps through the
    best point and its neighbours, a golden-section step whenever the parabola is unusable."""
    g = (3 - math.sqrt(5)) / 2
    for _ in range(steps):
        xs = sorted(curve)
        i = xs.index(min(curve, key=curve.get))
        if i == len(xs) - 1 or len(xs) < 3:
            return  # a minimum at the top end is reported, never extended
        if i == 0:  # at the lower bound: a dip between it and the next point, if the parabola shows one
            x = _vertex(*xs[:3], *(curve[a] for a in xs[:3]))
            if not xs[0] + tol / 2 < x < xs[1] - tol / 2:  # also NaN
                return
            f(x)
            continue
        x0, x1, x2 = xs[i - 1], xs[i], xs[i + 1]
        x = _vertex(x0, x1, x2, curve[x0], curve[x1], curve[x2])
        if abs(x - x1) < tol / 2:
            return  # the parabola's vertex is the best point: converged
        if not x0 + tol / 2 < x < x2 - tol / 2:  # also NaN
            x = x1 + g * (x2 - x1) if x2 - x1 > x1 - x0 else x1 - g * (x1 - x0)
        f(x)


def _fit_layers(cand: Candidate, teacher: Teacher, alpha: float, kl_alpha: float, fit: list[int],
                steps: int, progress: bool) -> torch.Tensor:
    """Per-block α by Adam on D over the ``fit`` chunks, pulled toward the global ``alpha``."""
    alphas = torch.full((len(cand.blocks),), float(alpha), requires_grad=True)
    opt = torch.optim.Adam([alphas], lr=LAYER_LR)
    reg = LAYER_REG * max(kl_alpha, 1e-8)
    all_slices = teacher.slices()
    cand.set(0.0)  # buffers stay B's; the functional parameters replace the rest
    for step in tqdm(range(steps), desc="calibrate α per layer", unit="step", disable=not progress, leave=False):
        i = fit[step % len(fit)]
        sl = all_slices[i]
        params = cand.functional(alphas)
        out = torch.func.functional_call(cand.module, params, args=(), kwargs=teacher.inputs(sl),
                                         strict=False)
        s, n = teacher.divergence(i, out, sl)
        loss = s.sum() / max(n, 1) + reg * (alphas - alpha).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return alphas.detach()


def carries_over(reduction: float, null_reduction: float, alpha: float) -> bool:
    """The gain is real (≥ CARRY_THRESHOLD), found inside the search range (a minimum at its top end
    means D keeps falling as the task vector is amplified: imitation by distortion, not transfer),
    and mostly specific to the aligned task vector: at least NULL_SHARE of it is lost when the same
    task vector is moved by a random symmetry instead."""
    return (reduction >= CARRY_THRESHOLD and alpha < ALPHA_MAX
            and reduction - null_reduction >= NULL_SHARE * reduction)


def _percent(x: float) -> str:
    """``12%``, or ``0.4%`` under 1% (where ``0%`` would hide the sign of a change)."""
    return f"{x:.0%}" if abs(x) >= 0.01 or x == 0 else f"{x:.1%}"


def _verdict(alpha: float, reduction: float, null_reduction: float | None, requested: str, name: str = "KL",
             target: str = "the fine-tune", minimum: tuple[float, float] | None = None) -> tuple[str, str]:
    """(verdict, its line); ``name`` of the divergence ("KL" or "NMSE"), ``target`` what was imitated,
    ``minimum`` (α, reduction) of the curve's minimum when ``alpha`` was lowered from it (within_noise)."""
    def change(x: float) -> str:
        return f"{name} unchanged" if x == 0 else f"{name} −{_percent(x)}" if x > 0 else f"{name} +{_percent(-x)}"
    pct = change(reduction)
    null = (f"; a randomly re-ordered task vector: {name} −{_percent(null_reduction)}"
            if (null_reduction or 0) > 0 else "")
    ok = carries_over(reduction, null_reduction or 0.0, alpha if requested in ("auto", "auto-layer") else 0.0)
    if requested not in ("auto", "auto-layer"):
        if reduction < 0:
            return ("does not carry over", f"warning: α = {alpha:g} leaves the output further from {target} "
                    f"than B itself ({pct} vs B); try --alpha auto")
        verdict = "carries over" if ok else "does not carry over"
        return verdict, f"{verdict}: α = {alpha:g} (given), {pct} vs B{null if not ok else ''}"
    if ok:
        return "carries over", f"carries over: α = {alpha:.2f}, {pct}" + (
            f" (lowered within the probes' noise from the minimum at α = {minimum[0]:.2f}, "
            f"{change(minimum[1])})" if minimum is not None else "")
    if minimum is not None:
        near = f"B's {name}" if alpha == 0 else f"α = {alpha:.2f} ({pct}{null})"
        return "does not carry over", (f"does not carry over: the minimum at α = {minimum[0]:.2f} "
                                       f"({change(minimum[1])}) is within the probes' noise of {near}; "
                                       "the output is B (α = 0)")
    return "does not carry over", (f"does not carry over: best α ≈ {alpha:.2f} ({pct}{null}); "
                                   "the output is B (α = 0)")


def output_index(model: torch.nn.Module, family: str, perms: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """π's permutation of a headless model's output group — the axis of its output features — or None
    (no π, or a head maps the residual stream back). A transfer lets π move that basis (the output
    lives in B's), so A_ft's and A's features are gathered into B's basis before they are compared."""
    if perms is None:
        return None
    fixed = module_spec(model, family).fixed_groups
    if len(fixed) != 1 or fixed[0] not in perms or perms[fixed[0]].dim() != 1:
        return None
    return perms[fixed[0]]


def _null_model(cand: Candidate, teacher: Teacher, b: torch.nn.Module, family: str,
                alpha: float | Mapping[str, float], seed: int, chunks: list[int], *, kl_base: float,
                reduction: float, base: torch.Tensor | None = None, chosen: torch.Tensor | None = None,
                least: int = 1, done: list[torch.Tensor] | None = None,
                ) -> tuple[float, list[torch.Tensor], bool]:
    """(the null model's reduction of D, its per-probe sums per chunk measured, whether its answer is
    clear): the task vector at ``alpha`` moved by a random symmetry σ instead of π, the null model of
    the verdict. σ(δ) is formed tensor by tensor as the candidate is set, never as a second copy of δ.

    Given the per-probe sums of D(0) and of D at the written α over ``chunks`` (the curve's, in its
    order), ``base`` and ``chosen``, the null is measured chunk by chunk (resuming after the chunks
    in ``done``), at least ``least`` chunks (a few probes can carry most of a gain: a small first
    sample can be confidently wrong), and stops once the verdict's question — does σ keep at most
    ``1 − NULL_SHARE`` of the gain, i.e. does ``g_i = s_σ,i − NULL_SHARE·s_0,i − (1 − NULL_SHARE)·s_ᾱ,i``
    sum to ≥ 0 — is answered (:func:`clear_of_zero`); not clear after every chunk, the answer is
    returned as not clear. The
    reduction is then ``reduction`` (over every chunk of the curve) times the share of the gain σ
    keeps on the probes measured, so that the verdict's comparison is the test's. Without ``base``
    and ``chosen``, every chunk is measured and the reduction is ``1 − D_σ / kl_base``.
    """
    spec = module_spec(b, family)
    sigma = random_perms(spec, torch.Generator().manual_seed(seed + 1))

    def moved(name: str, d: torch.Tensor) -> torch.Tensor:
        return permute_tensor(spec, name, d, sigma) if name in spec.axes else d  # a gather: exact in any dtype
    paired = base is not None and chosen is not None
    sums = list(done or [])
    count = 0
    clear = False
    if len(sums) < len(chunks):
        cand.set(alpha, transform=moved)
    for k in range(len(chunks)):
        if k >= len(sums):
            s, n = next(_chunk_sums(cand, teacher, [chunks[k]]))
            sums.append(s)
            count += n
        if paired and k + 1 >= least:
            m = sum(len(x) for x in sums)  # the chunks measured lead ``chunks``: their rows lead base's
            clear = clear_of_zero(torch.cat(sums) - NULL_SHARE * base[:m] - (1.0 - NULL_SHARE) * chosen[:m])
            if clear:
                break
    null = torch.cat(sums)
    if not paired:
        return (1.0 - mean_divergence(null, count) / kl_base if kl_base > 0 else 0.0), sums, True
    m = null.numel()
    d0, gain = float(base[:m].sum()), float(base[:m].sum() - chosen[:m].sum())
    kept = d0 - float(null.sum())
    return (reduction * kept / gain if gain > 0 else kept / d0 if d0 > 0 else 0.0), sums, clear


def predicted_peak(finetuned: Path, new_base: Path, probe_count: int | None = None,
                   probe_length: int | None = None, old_base: Path | None = None) -> int:
    """Peak RSS of :func:`calibrate` on these models (:func:`rebasin.estimate.estimate_calibration`);
    ``old_base`` when the target is "transferred" (A then runs beside τ, as A_ft did)."""
    from rebasin.lora import is_adapter_dir

    b = open_checkpoint(new_base)
    n = b.numel()
    dtype = forward_dtype(n)
    count, length = probe_shape(n, probe_count, probe_length, b.config)
    config = b.config.get("text_config") or b.config
    vocab = int(config.get("vocab_size") or 1024)
    chunk = chunk_size(count, length, vocab)
    positions = count * length
    ft_bytes = 4 if is_adapter_dir(finetuned) else load_dtype(open_checkpoint(finetuned), dtype).itemsize
    target_bytes = 4 if positions * vocab * 4 <= LOGIT_BUDGET else 2
    if old_base is not None:  # A then runs beside τ, and the log-ratio is held in float32
        ft_bytes = max(ft_bytes, load_dtype(open_checkpoint(old_base), dtype).itemsize)
        target_bytes = 4
    return estimate_calibration(n, max(i.numel for i in b.tensors.values()), ft_bytes,
                                load_dtype(b, dtype).itemsize, dtype.itemsize, positions, chunk * length,
                                vocab, target_bytes)


def load_dtype(ckpt: Checkpoint, forward: torch.dtype) -> torch.dtype:
    """The dtype to load a model in: ``forward`` when every floating tensor of its checkpoint already
    has that dtype (the loaded values are then exact), else float32."""
    floats = {DTYPES[i.dtype] for i in ckpt.tensors.values() if DTYPES[i.dtype].is_floating_point}
    return forward if floats == {forward} else torch.float32


def task_vector(ft: torch.nn.Module, a_dir: Path, family: str, perms: Mapping[str, torch.Tensor] | None,
                store: torch.dtype) -> dict[str, torch.Tensor]:
    """π(A_ft − A) per module parameter of the fine-tune, computed in float32 and stored in ``store``.

    A is read tensor by tensor from its checkpoint when the module's parameter names are the
    checkpoint's; otherwise (transformers renames some, e.g. ViT's) A is loaded as a module.
    """
    ft_params = {k: p.detach() for k, p in ft.named_parameters() if p.is_floating_point()}
    ckpt = open_checkpoint(a_dir)
    if all(k in ckpt and ckpt.shape(k) == tuple(p.shape) for k, p in ft_params.items()):
        def a_value(k: str) -> torch.Tensor | None:
            return ckpt.get(k, check_finite=True)
    else:
        a_state = {k: p.detach() for k, p in load_hf_model(a_dir, what="--alpha auto").named_parameters()}

        def a_value(k: str) -> torch.Tensor | None:
            v = a_state.pop(k, None)
            return v if v is not None and v.shape == ft_params[k].shape and v.is_floating_point() else None
    spec = module_spec(ft, family, where=a_dir) if perms is not None else None
    gathers_only = perms is not None and not has_rotations(perms)
    tau: dict[str, torch.Tensor] = {}
    for k, p in ft_params.items():
        a = a_value(k)
        if a is None:
            continue
        moved = spec is not None and k in spec.axes
        if p.dtype == a.dtype == store and (gathers_only or not moved):
            d = torch.sub(p, a)  # torch sums narrow floats in float32 and rounds once: as .to(store) below
        else:
            d = torch.sub(p, a.float())  # float32: exact, without a float32 copy of p
        if not moved:
            tau[k] = d.to(store)
        elif gathers_only:  # a gather commutes with rounding: move the narrower tensor
            tau[k] = permute_tensor(spec, k, d.to(store), perms)
        else:
            tau[k] = permute_tensor(spec, k, d, perms).to(store)
    return tau


def place_delta(tau: Mapping[str, torch.Tensor], b_module: torch.nn.Module,
                vocab: VocabMap | None) -> dict[str, torch.Tensor]:
    """π(τ) placed in B's module shapes (vocabulary rows mapped; tensors B lacks dropped)."""
    b_params = dict(b_module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for k, d in tau.items():
        if k not in b_params:
            continue
        target = b_params[k]
        if d.shape == target.shape:
            out[k] = d
            continue
        axes = [i for i, (x, y) in enumerate(zip(d.shape, target.shape, strict=True)) if x != y] \
            if d.dim() == target.dim() else []
        if vocab is None or len(axes) != 1:
            continue
        full = torch.zeros(target.shape, dtype=d.dtype)
        full.index_copy_(axes[0], vocab.b_rows, gather(d, axes[0], vocab.a_rows))
        out[k] = full
    return out


def _load_finetune(finetuned: Path, a_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from rebasin.lora import is_adapter_dir

    if not is_adapter_dir(finetuned):
        return load_hf_model(finetuned, what="--alpha auto", dtype=load_dtype(open_checkpoint(finetuned), dtype))
    base = load_hf_model(a_dir, what="--alpha auto")  # first: peft imports transformers, which must be whole
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise RebasinError(f"calibrating a LoRA adapter needs peft ({exc}): pip install 'rebasin-engine[hf]'") \
            from exc
    return PeftModel.from_pretrained(base, finetuned).merge_and_unload().eval()


@reuse_freed_memory()  # glibc keeps the forwards' freed buffers for reuse while it runs
def calibrate(old_base: Path, finetuned: Path, new_base: Path, family: str, *,
              perms: Mapping[str, torch.Tensor] | None, alpha: float | str = "auto", vocab: VocabMap | None = None,
              probe_data: str | Path | None = None, probe_count: int | None = None,
              probe_length: int | None = None,
              seed: int = 0, layer_steps: int | None = None, dtype: torch.dtype | None = None,
              target: str = "finetune", progress: bool = False) -> Calibration:
    """Choose α (or check a given α) for ``B + α·π(A_ft − A)``; see the module docstring.

    Args:
        old_base, finetuned, new_base: model directories (the fine-tune may be a LoRA adapter).
        family: the spec family (for π on module names).
        perms: π (rebasin mode) or None (diff mode).
        alpha: "auto", "auto-layer", or a number (then D(0), D(α) and D(1) only).
        probe_data: the user's unlabeled inputs (see :mod:`rebasin.probes`), else synthetic probes.
        probe_count, probe_length: number and length of synthetic probe sequences (None:
            :data:`PROBES_SMALL`, or :data:`PROBES_LARGE` from :data:`LARGE_PARAMS` parameters;
            :data:`CLASSIFIER_PROBES` images for image classifiers).
        dtype: the probe forwards' dtype; None: :func:`forward_dtype` of B's size.
        target: what the candidate imitates: "finetune" (A_ft's outputs) or "transferred" (B's
            outputs moved by A_ft's change over A; A is then run on the probes too).
    """
    if target not in TARGETS:
        raise RebasinError(f"unknown calibration target '{target}' (choose from {', '.join(TARGETS)})")
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(phase: str) -> None:
        phases[phase] = max(0.0, round(time.perf_counter() - t0 - sum(phases.values()), 3))
    what = "--alpha auto"
    b_checkpoint = open_checkpoint(new_base)
    n_params = b_checkpoint.numel()
    dtype = dtype or forward_dtype(n_params)
    probe_count, probe_length = probe_shape(n_params, probe_count, probe_length, b_checkpoint.config)
    # one model at a time where possible: A_ft and τ, then the probes and A_ft's targets, then B
    ft = _load_finetune(Path(finetuned), Path(old_base), dtype)
    tau = task_vector(ft, Path(old_base), family, perms, store=dtype)  # float32 differences, stored in dtype
    ft.to(dtype)
    lap("load")
    probes = make_probes(ft, count=probe_count, length=probe_length, seed=seed, model_dir=Path(finetuned)
                         if (Path(finetuned) / "config.json").is_file() else Path(old_base), probe_data=probe_data)
    lap("probes")
    ids = probes.inputs.get("input_ids")  # outputs per probe: one per token, or one per image
    per_seq = max(1, int(ids[0].numel())) if ids is not None else 1
    chunk = chunk_size(len(probes), per_seq, getattr(ft.config, "vocab_size", None) or 1024)
    teacher = Teacher(ft, probes, chunk, vocab, seed, output_index(ft, family, perms))
    probes.logits = None
    del ft
    if target == "transferred":
        a_module = load_hf_model(Path(old_base), what=what, dtype=load_dtype(open_checkpoint(old_base), dtype))
        teacher.subtract(a_module.to(dtype))
        del a_module
    lap("teacher")
    b = load_hf_model(new_base, what=what, dtype=load_dtype(b_checkpoint, dtype))
    delta = place_delta(tau, b, vocab)
    del tau
    if not delta:
        raise RebasinError("calibration found no tensor of the task vector in the new base's module",
                           file=new_base)
    cand = Candidate(b, delta, dtype)
    n_chunks = len(teacher.targets)
    # "auto" measures the curve on the first half of the probes, and on the rest only when that half
    # leaves the answer open (see settled); other requests measure every probe
    active = list(range(max(1, n_chunks // 2) if alpha == "auto" and n_chunks >= 4 else n_chunks))
    parts: dict[float, dict[int, torch.Tensor]] = {}  # per-probe sums of D(α), per chunk measured
    chunk_positions: dict[int, int] = {}  # output positions per chunk (the same at every α)
    curve: dict[float, float] = {}  # D(α) over the active chunks
    sums: dict[float, torch.Tensor] = {}  # ... and the per-probe sums behind it (see within_noise)
    if target == "transferred":
        cand.set(0.0)  # B's forward forms the targets and gives D(0) on every probe
        parts[0.0] = {}
        for i, (s, n) in enumerate(teacher.onto(cand.module)):
            parts[0.0][i], chunk_positions[i] = s, n
    lap("base")

    bar = tqdm(desc="calibrate α", unit="α", disable=not progress, leave=False)

    def measure(a: float) -> None:
        """D(a) on the active chunks not yet measured at ``a``, then the curve point over the active chunks."""
        done = parts.setdefault(a, {})
        todo = [i for i in active if i not in done]
        if todo:
            cand.set(a)
            for i, (s, n) in zip(todo, _chunk_sums(cand, teacher, todo), strict=True):
                done[i], chunk_positions[i] = s, n
        sums[a] = torch.cat([done[i] for i in active])
        curve[a] = mean_divergence(sums[a], sum(chunk_positions[i] for i in active))

    def f(a: float, exact: bool = False) -> float:
        a = a if exact else cand.representable(a)
        if a not in curve:
            bar.set_postfix(alpha=f"{a:.3g}")
            measure(a)
            bar.update(1)
        return curve[a]

    def by_probe() -> bool:
        """Whether the sums are per probe (the output has a leading probe axis)."""
        return all(v.numel() == len(teacher.rows(active)) for v in sums.values())

    def choose() -> tuple[float, bool, float]:
        """(the curve's minimum, :func:`by_probe`, the α to write: :func:`within_noise` of the minimum),
        on the active chunks."""
        lowest, per = min(curve, key=curve.get), by_probe()
        return lowest, per, cand.representable(within_noise(curve, sums if per else {}))

    def measure_written(lowest: float, written: float) -> tuple[float, float]:
        """(the minimum, D at the α written): the written α becomes the minimum where the parabolas
        of :func:`within_noise` dipped below the points the search stopped at."""
        d = f(written)
        return (written if d <= curve[lowest] else lowest), d

    def widen() -> None:
        """Every probe, at the α's evaluated; the search brackets and refines again where that moved the minimum."""
        nonlocal active
        active = list(range(n_chunks))
        for a in list(curve):
            measure(a)
        _search(f, curve)

    if 0.0 in parts:
        measure(0.0)
    requested = alpha if isinstance(alpha, str) else f"{alpha:g}"
    layer_fit = None
    alphas = alpha_min = None
    if isinstance(alpha, str):
        _search(f, curve)  # for "auto", over half the probes first
        alpha_min, per_probe, chosen = choose()
        if len(active) < n_chunks and not (per_probe and settled(sums, chosen, alpha_min)):
            widen()
            alpha_min, per_probe, chosen = choose()
        alpha_min, kl_chosen = measure_written(alpha_min, chosen)
        chosen_sums = sums[chosen]
        if alpha == "auto-layer" and len(teacher.targets) >= 2 and len(cand.blocks) > 1:
            n = len(teacher.targets)
            fit, held = list(range(0, n, 2)), list(range(1, n, 2))
            layer_steps = layer_steps or LAYER_STEPS
            fitted = _fit_layers(cand, teacher, chosen, kl_chosen, fit, layer_steps, progress)
            per_block = dict(zip(cand.blocks, (cand.representable(float(x)) for x in fitted), strict=True))
            # the per-layer α's must beat the best global α on the held-out probes, by more than the
            # paired standard error (as within_noise asks of any α further from B than another)
            layer_sums, held_positions = _per_probe(cand, teacher, per_block, held)
            global_sums = sums[alpha_min][teacher.rows(held)] if per_probe \
                else _per_probe(cand, teacher, alpha_min, held)[0]
            held_global = mean_divergence(global_sums, held_positions)
            held_layer = mean_divergence(layer_sums, held_positions)
            kept = lower_beyond_noise(layer_sums, global_sums)
            layer_fit = {"blocks": per_block, "heldout_global": held_global, "heldout_layer": held_layer,
                         "kept": kept, "steps": layer_steps}
            if kept:
                alphas = per_block
                chosen_sums = _per_probe(cand, teacher, per_block)[0]
                kl_chosen = mean_divergence(chosen_sums, sum(chunk_positions.values()))
    else:
        for a in sorted({0.0, 1.0, float(alpha)}):
            f(a, exact=True)
        chosen = float(alpha)
        kl_chosen, chosen_sums = curve[chosen], sums[chosen]
        per_probe = by_probe()
    lap("search")
    kl_null = null_reduction = null_probes = None
    null_done: list[torch.Tensor] = []
    while True:
        positions, kl_base = sum(chunk_positions[i] for i in active), curve[0.0]
        reduction = 1.0 - kl_chosen / kl_base if kl_base > 0 else 0.0
        if not carries_over(reduction, 0.0, chosen if isinstance(alpha, str) else 0.0):  # else the null
            break  # cannot matter
        null_reduction, null_done, clear = _null_model(
            cand, teacher, b, family, alphas if alphas is not None else chosen, seed, active, kl_base=kl_base,
            reduction=reduction, base=sums[0.0] if per_probe else None, chosen=chosen_sums if per_probe else None,
            least=min(len(active), max(1, n_chunks // 2)), done=null_done)
        if clear or len(active) == n_chunks:
            kl_null, null_probes = kl_base * (1.0 - null_reduction), len(teacher.rows(active[:len(null_done)]))
            break
        widen()  # half the probes settled α, not the null's answer: every probe, and α chosen again
        alpha_min, per_probe, chosen = choose()
        alpha_min, kl_chosen = measure_written(alpha_min, chosen)
        chosen_sums, null_reduction = sums[chosen], None
    bar.close()
    lap("null")
    lowered = None
    if alpha_min is not None and alphas is None and chosen < alpha_min:
        lowered = (alpha_min, 1.0 - curve[alpha_min] / kl_base if kl_base > 0 else 0.0)
    verdict, line = _verdict(chosen, reduction, null_reduction, requested, teacher.kind.upper(),
                             "the fine-tune" if target == "finetune" else "the fine-tune's change applied to B",
                             lowered)
    if verdict == "does not carry over" and isinstance(alpha, str):
        chosen, alphas, kl_chosen, reduction = 0.0, None, kl_base, 0.0  # never worse than B
        if target == "finetune":  # the quality studies' missed gains were of this kind
            line += ("; --alpha-target transferred compares only the fine-tune's own change and may "
                     "still find one")
    if layer_fit is not None:
        line += (f"; per-layer α kept (held-out {teacher.kind.upper()} {layer_fit['heldout_layer']:.4g} < "
                 f"{layer_fit['heldout_global']:.4g})"
                 if layer_fit["kept"] else "; per-layer α not kept (no held-out gain over the best global α "
                 "beyond the probes' noise)")
    noise = None
    if alpha_min is not None and per_probe and sums[alpha_min].numel() > 1:
        noise = [[a, float(paired_spread(sums[a] - sums[alpha_min])) / max(positions, 1)] for a in sorted(curve)]
    measured = len(teacher.rows(active))
    return Calibration(alpha=float(chosen), alphas=alphas, requested=requested, divergence=teacher.kind,
                       kl_base=kl_base, kl_chosen=kl_chosen, kl_at_one=curve.get(1.0), reduction=reduction,
                       kl_null=kl_null, null_reduction=null_reduction, null_probes=null_probes,
                       curve=[[a, curve[a]] for a in sorted(curve)], verdict=verdict, line=line,
                       probes=probes.summary(), layer_fit=layer_fit, seconds=time.perf_counter() - t0,
                       phases=phases, dtype=str(dtype).removeprefix("torch."), target=target,
                       alpha_min=alpha_min, noise=noise, lowered=lowered is not None, measured=measured)
