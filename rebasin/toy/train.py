"""The one training loop of every toy model: AdamW, seeded data order, gradient clipping."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from rebasin.toy.families import ToyTask


def pick_threads(most: int = 4) -> int:
    """Threads for tiny models here: up to ``most`` of the cores that the 1-minute load average leaves idle (≥ 1).

    Models this small scale poorly with threads, and on busy cores extra threads only wait on
    each other (on a shared 2-core machine, 2 threads ran 3–7× slower than 1).
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(most, cores - int(busy + 0.5)))


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine to 10% or constant."""
    warm = max(1, int(warmup * total))
    ramp = min(1.0, (step + 1) / warm)
    if schedule == "constant":
        return ramp
    return ramp * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))))


def train(model: Any, task: ToyTask, which: str, *, steps: int, lr: float, seed: int, schedule: str = "cosine",
          weight_decay: float | None = None, replay: float = 0.0,
          progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on ``which`` ("general"/"sub"); return the losses.

    ``replay``: the fraction of each batch drawn from the general task (see :meth:`ToyTask.batch`).

    The batches come from a generator seeded with ``seed`` (the data order), so a run is
    reproducible given the model's initial weights. ``progress(step, loss)`` is called every step.
    """
    r = task.recipe
    g = torch.Generator().manual_seed(seed)
    wd = r.weight_decay if weight_decay is None else weight_decay
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, r.warmup, schedule))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        loss = task.loss(model, task.batch(which, g, replay))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses
