"""Pair sets: an old base A, its fine-tune A_ft, and three kinds of new base B, each with its B_ft.

=================  ===========================================================================
kind               new base B
=================  ===========================================================================
``continued``      (a) same lineage: A trained further on the general task (fresh data order)
``permuted``       (b) (a) re-released in another unit order: a random symmetry π of (a)'s B —
                   computes exactly what (a) computes; only re-basin can find π
``independent``    (c) another seed trained from scratch on the general task
=================  ===========================================================================

A_ft is A fine-tuned on the sub-task with general-task replay and a decaying learning rate
(``Recipe.ft_replay``, ``ft_schedule``); B_ft is B
fine-tuned the same way (same steps, learning rate, replay and data order): the upper bound of a
transfer. For (b), B_ft is π applied to (a)'s B_ft.
Seeds: A is initialised with ``seed``; the independent B with ``seed + 1000``; data orders use
``seed + 2000`` (continued training), ``seed + 3000`` (fine-tunes); π is drawn with ``seed + 4000``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rebasin.toy.cache import cache_root, cached_dir, is_complete, key, save_model
from rebasin.toy.families import Recipe, load_model, new_model, toy_task
from rebasin.toy.train import train

KINDS = ("continued", "permuted", "independent")
KIND_LABELS = {
    "continued": "(a) same lineage",
    "permuted": "(b) same lineage, units re-ordered",
    "independent": "(c) independent seed",
}
Log = Callable[[str], None]


@dataclass
class PairSet:
    """Directories of one pair set (HF model dirs in the cache) and what building them cost."""

    recipe: Recipe
    seed: int
    A: Path
    A_ft: Path
    B: dict[str, Path]
    B_ft: dict[str, Path]
    planted: dict[str, torch.Tensor] | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def trained(self) -> list[str]:
        """Models built by this call (the others came from the cache)."""
        return list(self.timings)


def planted_perms(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """The random symmetry that turns kind (a)'s B into kind (b)'s (drawn with ``seed + 4000``)."""
    from rebasin.model import open_model
    from rebasin.permutation import random_perms

    return random_perms(open_model(model_dir).spec, torch.Generator().manual_seed(seed + 4000))


class _Builder:
    """Builds models of one recipe into the cache, each once, logging what it trains."""

    def __init__(self, r: Recipe, root: Path, log: Log | None, progress: bool) -> None:
        self.r, self.root, self.log, self.progress = r, root, log, progress
        self.task = toy_task(r)
        self.timings: dict[str, float] = {}

    def dir(self, name: str, chain: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        payload = {"recipe": self.r.shared_params(), "data": self.task.digest, **chain}
        return self.root / self.r.family / f"{name}-{key(payload)}", payload

    def trained(self, name: str, chain: dict[str, Any], make: Callable[[Callable[[int, float], None]], Any],
                steps: int) -> tuple[Path, dict[str, Any]]:
        dest, payload = self.dir(name, chain)
        if is_complete(dest):
            return dest, payload
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"train {self.r.family} {name}", unit="step", leave=False)
        last = [t0]

        def report(step: int, loss: float) -> None:
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")
            elif self.log is not None and (time.perf_counter() - last[0] > 10 or step + 1 == steps):
                last[0] = time.perf_counter()
                self.log(f"  {self.r.family} {name}: step {step + 1}/{steps}, loss {loss:.3f}")

        if self.log is not None and bar is None:
            self.log(f"training {self.r.family} {name} ({steps} steps)")
        model = make(report)
        if bar is not None:
            bar.close()
        cached_dir(dest, save_model(model), {"name": name, **payload})
        self.timings[name] = time.perf_counter() - t0
        return dest, payload

    def base(self, name: str, seed: int) -> tuple[Path, dict[str, Any]]:
        r = self.r
        chain = {"stage": "base", "init_seed": seed, "data_seed": seed, "steps": r.base_steps, "lr": r.base_lr}

        def make(report: Callable[[int, float], None]) -> Any:
            model = new_model(r, seed)
            train(model, self.task, "general", steps=r.base_steps, lr=r.base_lr, seed=seed, progress=report)
            return model
        return self.trained(name, chain, make, r.base_steps)

    def further(self, name: str, parent: tuple[Path, dict[str, Any]], stage: str, task: str, steps: int, lr: float,
                data_seed: int, schedule: str, replay: float = 0.0) -> tuple[Path, dict[str, Any]]:
        chain = {"stage": stage, "parent": parent[1], "data_seed": data_seed, "steps": steps, "lr": lr,
                 "schedule": schedule, **({"replay": replay} if replay else {})}

        def make(report: Callable[[int, float], None]) -> Any:
            model = load_model(self.r, parent[0])
            train(model, self.task, task, steps=steps, lr=lr, seed=data_seed, schedule=schedule, replay=replay,
                  progress=report)
            return model
        return self.trained(name, chain, make, steps)

    def finetune(self, name: str, parent: tuple[Path, dict[str, Any]], seed: int) -> tuple[Path, dict[str, Any]]:
        r = self.r
        return self.further(name, parent, "finetune", "sub", r.ft_steps, r.ft_lr, seed + 3000, r.ft_schedule,
                            r.ft_replay)

    def permuted(self, name: str, parent: tuple[Path, dict[str, Any]], perms: dict[str, torch.Tensor],
                 perm_seed: int) -> tuple[Path, dict[str, Any]]:
        dest, payload = self.dir(name, {"stage": "permute", "parent": parent[1], "perm_seed": perm_seed})
        t0 = time.perf_counter()

        def write(tmp: Path) -> None:
            from rebasin.apply import apply_checkpoint
            from rebasin.model import open_model

            apply_checkpoint(open_model(parent[0]), perms, tmp, overwrite=True)
        if cached_dir(dest, write, {"name": name, **payload}):
            self.timings[name] = time.perf_counter() - t0
        return dest, payload


def build_pair_set(r: Recipe, seed: int = 0, *, cache: str | Path | None = None, kinds: tuple[str, ...] = KINDS,
                   progress: bool = False, log: Log | None = None) -> PairSet:
    """Train (or load from the cache) A, A_ft and, for each of ``kinds``, B and B_ft.

    Returns a :class:`PairSet` whose ``timings`` holds the seconds spent on each model built by
    this call (empty when everything came from the cache). ``progress`` shows tqdm bars;
    otherwise ``log`` (if given) gets a line per model and every ~10 s.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    if log is not None:
        log(f"{r.family}: reading the data")
    b = _Builder(r, cache_root(cache), log, progress)
    a = b.base("A", seed)
    a_ft = b.finetune("A_ft", a, seed)
    bases: dict[str, Path] = {}
    uppers: dict[str, Path] = {}
    planted = None
    if "continued" in kinds or "permuted" in kinds:
        cont = b.further("B_continued", a, "continue", "general", r.continue_steps, r.continue_lr, seed + 2000,
                         "cosine")
        cont_ft = b.finetune("B_continued_ft", cont, seed)
        if "continued" in kinds:
            bases["continued"], uppers["continued"] = cont[0], cont_ft[0]
        if "permuted" in kinds:
            planted = planted_perms(cont[0], seed)
            bases["permuted"] = b.permuted("B_permuted", cont, planted, seed + 4000)[0]
            uppers["permuted"] = b.permuted("B_permuted_ft", cont_ft, planted, seed + 4000)[0]
    if "independent" in kinds:
        ind = b.base("B_independent", seed + 1000)
        bases["independent"], uppers["independent"] = ind[0], b.finetune("B_independent_ft", ind, seed)[0]
    return PairSet(r, seed, a[0], a_ft[0], {k: bases[k] for k in KINDS if k in bases},
                   {k: uppers[k] for k in KINDS if k in uppers}, planted, b.timings)
