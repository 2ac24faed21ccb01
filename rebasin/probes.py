"""Probe inputs for data-free calibration: what the fine-tune is asked to answer.

* causal LMs: sequences sampled from the fine-tune itself (temperature 1, seeded) — the
  inputs on which the fine-tune's behaviour is most its own;
* masked LMs: random tokens moved toward the fine-tune's own distribution by a few Gibbs sweeps
  (mask 15%, redraw from the model), then 15% masked; the divergence is read at the masked
  positions. Other text encoders: uniformly random tokens;
* vision models: noise images at the model's input shape, half white noise and half smooth
  (bilinearly upsampled low-resolution) noise; for image classifiers three quarters of them are
  inverted toward a confident class of the fine-tune (a few input-gradient steps with a
  smoothness prior), so that the probes sit in the fine-tune's decision regions;
* CLIP: random tokens and noise images together;
* ``--probe-data PATH``: the user's unlabeled inputs — a text file (one example per line,
  tokenized with the fine-tune's tokenizer) or a ``.safetensors`` file of input tensors
  (``input_ids``, ``pixel_values``, ... with a leading batch axis).

Every probe set is a deterministic function of the model, the sizes and the seed; sets whose
order is not already random (image probes, ``--probe-data``) are shuffled by the seed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rebasin.errors import InputFileError, RebasinError

MASK_FRACTION = 0.15
GIBBS_SWEEPS = 8  # masked-LM probes: resampling sweeps from the model before the final masking
INVERT_STEPS = 40  # image classifiers: input-optimisation steps toward a confident class
INVERT_CHUNK = 32  # ... for this many images at a time
INVERT_LR = 0.1
INVERT_TV = 0.5
INVERT_L2 = 0.05


@dataclass
class Probes:
    """A batch of model inputs plus where to read the output.

    Attributes:
        inputs: model keyword arguments, each with a leading batch axis ``(n, ...)``.
        kind: "sampled", "masked", "random-tokens", "noise-images", "clip", or "user".
        positions: optional bool mask ``(n, seq)`` of the output positions to compare
            (masked positions of a masked LM); None compares every position.
        logits: the sampling model's own logits ``(n, seq, vocab)`` (its dtype) when it drew the
            probes (sampled probes): its outputs on them, already computed.
    """

    inputs: dict[str, torch.Tensor]
    kind: str
    positions: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batch(self, idx: slice | torch.Tensor) -> Probes:
        pos = None if self.positions is None else self.positions[idx]
        return Probes({k: v[idx] for k, v in self.inputs.items()}, self.kind, pos, self.meta)

    def summary(self) -> dict[str, Any]:
        shapes = {k: list(v.shape) for k, v in self.inputs.items()}
        return {"kind": self.kind, "count": len(self), "shapes": shapes, **self.meta}


def cast_inputs(inputs: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``inputs`` with their floating tensors (pixels, features) in ``dtype`` (a model's parameter dtype)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def is_causal_lm(model: torch.nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(model, "generate")


def _vocab_size(config: Any) -> int:
    text = getattr(config, "text_config", None)
    return int(getattr(text, "vocab_size", None) or config.vocab_size)


def _max_len(config: Any, wanted: int) -> int:
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or wanted
    return max(2, min(wanted, int(limit)))


class _InverseCdfSampler:
    """A ``generate`` logits processor that draws the next token itself (temperature 1, by inverting
    the cumulative distribution with one seeded uniform per row) and leaves greedy search only that
    token: ``torch.multinomial`` spends most of a small model's step drawing an exponential variate
    per vocabulary entry."""

    def __init__(self, generator: torch.Generator, keep_steps: int = 0, dtype: torch.dtype = torch.float32,
                 never: list[int] | None = None) -> None:
        self.generator = generator
        self.keep_steps, self.dtype = keep_steps, dtype  # the first keep_steps steps' logits go to ``keep``
        self.keep: torch.Tensor | None = None  # (batch, keep_steps, logits' width) in ``dtype``: step t at [:, t]
        self.step = 0
        self.never = never or []  # token ids never drawn (end of sequence: probes have a fixed length)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.step < self.keep_steps:
            if self.keep is None:  # one buffer for every step (a fresh tensor per step page-faulted)
                self.keep = torch.empty((scores.shape[0], self.keep_steps, scores.shape[-1]), dtype=self.dtype)
            self.keep[:, self.step].copy_(scores)
        self.step += 1
        if self.never:  # scores are generate's own float32 copy of the logits: changed in place (no
            scores[:, self.never] = -math.inf  # fresh vocabulary-sized buffers, page-faulted every step)
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(-1)  # (batch, vocab)
        u = torch.rand((cdf.shape[0], 1), generator=self.generator).to(cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1)
        return scores.fill_(-math.inf).scatter_(-1, token, 0.0)


def sampled_probes(model: torch.nn.Module, count: int, length: int, seed: int) -> Probes:
    """``count`` sequences of ``length`` tokens sampled from a causal LM at temperature 1, with the
    model's logits at each of their positions (the step that draws token ``t + 1`` computes position
    ``t``'s: one step past ``length`` gives the last position's, and its token is dropped)."""
    from transformers import GenerationConfig, LogitsProcessorList

    cfg = model.config
    length = _max_len(cfg, length)
    gen = torch.Generator().manual_seed(seed)
    bos = getattr(cfg, "bos_token_id", None)
    vocab = _vocab_size(cfg)
    if isinstance(bos, int) and 0 <= bos < vocab:
        start = torch.full((count, 1), bos, dtype=torch.long)
    else:
        start = torch.randint(0, vocab, (count, 1), generator=gen)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # the model's own generation defaults (repetition penalty, top-p, ...) would change the
    # distribution sampled from, and generate() merges them into any config passed to it
    # (end-of-sequence is never drawn, so every row runs to ``length``; the sampler masks it itself,
    # after keeping the raw logits, where min_new_tokens would mask them)
    saved = model.generation_config
    eos = getattr(saved, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else [int(e) for e in eos or []]
    # step t computes position t's logits
    sampler = _InverseCdfSampler(gen, keep_steps=length, dtype=dtype, never=[e for e in eos if 0 <= e < vocab])
    model.generation_config = GenerationConfig(eos_token_id=eos or None)
    try:
        with torch.no_grad():
            ids = model.generate(input_ids=start.to(device), attention_mask=torch.ones_like(start, device=device),
                                 do_sample=False, max_new_tokens=length,
                                 pad_token_id=bos if isinstance(bos, int) else 0,
                                 logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.generation_config = saved
    if sampler.step < length or ids.shape[1] < length:
        raise RebasinError(f"sampling probes from the fine-tune stopped after {sampler.step} of {length} tokens")
    return Probes({"input_ids": ids[:, :length].cpu()}, "sampled",
                  meta={"length": length, "temperature": 1.0, "seed": seed}, logits=sampler.keep)


def _mask_token(model_dir: Path | None, config: Any) -> int | None:
    mask = getattr(config, "mask_token_id", None)
    if isinstance(mask, int):
        return mask
    if model_dir is None:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        return None
    return tok.mask_token_id if isinstance(tok.mask_token_id, int) else None


def token_probes(model: torch.nn.Module, count: int, length: int, seed: int, model_dir: Path | None) -> Probes:
    """Uniformly random tokens; 15% masked when the model has a mask token (masked LMs)."""
    cfg = model.config
    length = _max_len(cfg, length)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _vocab_size(cfg), (count, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in _forward_args(model):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    mask_id = _mask_token(model_dir, cfg) if type(model).__name__.endswith("ForMaskedLM") else None
    if mask_id is None or not 0 <= mask_id < _vocab_size(cfg):
        return Probes(inputs, "random-tokens", meta={"length": length, "seed": seed})
    gibbs_resample(model, inputs, mask_id, GIBBS_SWEEPS, gen)
    masked = torch.rand(count, length, generator=gen) < MASK_FRACTION
    masked[:, 0] |= ~masked.any(dim=1)
    ids[masked] = mask_id
    return Probes(inputs, "masked", positions=masked, meta={"length": length, "mask_fraction": MASK_FRACTION,
                                                             "gibbs_sweeps": GIBBS_SWEEPS, "seed": seed})


@torch.no_grad()
def gibbs_resample(model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask_id: int, sweeps: int,
                   gen: torch.Generator) -> None:
    """Move random tokens toward the masked LM's own distribution, in place: each sweep masks a random
    15% of ``inputs["input_ids"]`` ``(n, seq)`` and redraws them from the model at temperature 1."""
    ids = inputs["input_ids"]
    for _ in range(sweeps):
        chosen = torch.rand(ids.shape, generator=gen) < MASK_FRACTION
        if not chosen.any():
            continue
        probe = ids.clone()
        probe[chosen] = mask_id
        logits = model(**{**inputs, "input_ids": probe}).logits[chosen].float()
        logits[:, mask_id] = -math.inf
        ids[chosen] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)


def noise_images(count: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``(count, channels, size, size)``: first half white noise, second half smooth noise, unit variance."""
    white = torch.randn(count - count // 2, channels, size, size, generator=gen)
    low = max(2, size // 4)
    coarse = torch.randn(count // 2, channels, low, low, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    smooth = smooth / smooth.std().clamp_min(1e-6)
    return torch.cat([white, smooth])


def invert_images(model: torch.nn.Module, pixels: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Images the classifier is confident about, one target class each (cycling over the classes):
    ``steps`` Adam steps on ``pixels`` ``(n, c, h, w)`` minimising cross-entropy to the target plus a
    total-variation and an L2 prior (data-free model inversion), :data:`INVERT_CHUNK` images at a time
    (a backward holds every activation of its batch). The weights are not touched."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        n_classes = int(model(pixel_values=pixels[:1].to(dtype)).logits.shape[-1])
    target = (torch.arange(len(pixels)) + int(torch.randint(0, n_classes, (1,), generator=gen))) % n_classes
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for a in range(0, len(pixels), INVERT_CHUNK):
        x = pixels[a:a + INVERT_CHUNK].clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=INVERT_LR)
        for _ in range(steps):
            logits = model(pixel_values=x.to(dtype)).logits.float()
            tv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
            loss = (torch.nn.functional.cross_entropy(logits, target[a:a + INVERT_CHUNK])
                    + INVERT_TV * tv + INVERT_L2 * x.pow(2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(x.detach())
    return torch.cat(out)


def image_probes(model: torch.nn.Module, count: int, seed: int, length: int) -> Probes:
    """Noise images; for image classifiers three quarters are inverted toward confident classes."""
    cfg = model.config
    vision = getattr(cfg, "vision_config", None) or cfg
    gen = torch.Generator().manual_seed(seed)
    pixels = noise_images(count, int(getattr(vision, "num_channels", 3)), int(vision.image_size), gen)
    if getattr(cfg, "text_config", None) is None:
        if not type(model).__name__.endswith("ForImageClassification"):
            return Probes({"pixel_values": pixels}, "noise-images", meta={"seed": seed})
        k = count - count // 4
        with torch.enable_grad():
            pixels[:k] = invert_images(model, pixels[:k], INVERT_STEPS, gen)
        return Probes({"pixel_values": pixels}, "inverted-images", meta={"seed": seed, "inverted": k,
                                                                        "steps": INVERT_STEPS})
    length = _max_len(cfg, min(length, 16))
    ids = torch.randint(0, _vocab_size(cfg), (count, length), generator=gen)
    return Probes({"pixel_values": pixels, "input_ids": ids}, "clip", meta={"length": length, "seed": seed})


def _forward_args(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def user_probes(path: str | Path, model: torch.nn.Module, model_dir: Path | None, length: int,
                count: int) -> Probes:
    """Inputs from ``--probe-data``: a ``.safetensors`` of input tensors, or a text file (one example a line)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError("probe data file not found", file=path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            inputs = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise InputFileError(f"not a readable safetensors file ({exc})", file=path) from None
        accepted = _forward_args(model)
        unknown = sorted(set(inputs) - accepted)
        if unknown or not inputs:
            raise InputFileError(f"probe tensors must be inputs of {type(model).__name__}: unknown "
                                 f"{', '.join(unknown) or '(none given)'}", file=path)
        sizes = {int(v.shape[0]) for v in inputs.values()}
        if len(sizes) != 1:
            raise InputFileError("probe tensors need one common leading batch size", file=path)
        return Probes(dict(inputs), "user", meta={"file": str(path)})
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read probe text ({exc})", file=path) from None
    if not lines:
        raise InputFileError("probe text file has no non-empty line", file=path)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise RebasinError(f"text probes need the fine-tune's tokenizer files ({type(exc).__name__})",
                           file=model_dir) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(lines[:count], padding=True, truncation=True, max_length=_max_len(model.config, length),
              return_tensors="pt")
    inputs = {k: v for k, v in enc.items() if k in _forward_args(model)}
    positions = enc["attention_mask"].bool()
    return Probes(inputs, "user", positions=positions, meta={"file": str(path), "lines": len(lines[:count])})


def make_probes(model: torch.nn.Module, *, count: int = 32, length: int = 128, seed: int = 0,
                model_dir: Path | None = None, probe_data: str | Path | None = None) -> Probes:
    """The probe set for ``model`` (the fine-tune): see the module docstring."""
    if probe_data is not None:
        return shuffled(user_probes(probe_data, model, model_dir, length, count), seed)
    if getattr(model.config, "vision_config", None) is not None or getattr(model, "main_input_name", "") == \
            "pixel_values":
        return shuffled(image_probes(model, count, seed, length), seed)
    if is_causal_lm(model):
        return sampled_probes(model, count, length, seed)
    return token_probes(model, count, length, seed, model_dir)


def shuffled(probes: Probes, seed: int) -> Probes:
    """``probes`` in a seeded random order, so that any part of them is a random sample (calibration
    measures half of them first; image probes come grouped by kind, a user's file in its order)."""
    order = torch.randperm(len(probes), generator=torch.Generator().manual_seed(seed))
    out = probes.batch(order)
    out.logits = probes.logits[order] if probes.logits is not None else None
    return out
