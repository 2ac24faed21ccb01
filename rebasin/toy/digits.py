"""scikit-learn's 8×8 digits (bundled with scikit-learn, nothing downloaded) for the ViT family.

Base task: classify the digits. Fine-tune task: the same digits shifted :data:`SHIFT` pixel(s)
right (a domain shift the bases do poorly on). Pixel convention of the saved models:
``pixel_values = image / 8 − 1`` (intensities 0..16 mapped to [−1, 1]), shape ``(N, 1, 8, 8)``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SHIFT = 1
PIXEL_SCALE = 8.0


@dataclass(frozen=True)
class Digits:
    """A fixed stratified split: images ``(N, 1, 8, 8)`` float32 and labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def images(self, task: str, split: str) -> torch.Tensor:
        """Images of ``task`` ("general": as is, "sub": shifted) and ``split`` ("train"/"test")."""
        x = self.x_train if split == "train" else self.x_test
        return shift(x) if task == "sub" else x

    def labels(self, split: str) -> torch.Tensor:
        return self.y_train if split == "train" else self.y_test


def shift(x: torch.Tensor) -> torch.Tensor:
    """The fine-tune's domain shift: roll images ``(..., 8, 8)`` SHIFT pixels right (the borders are blank)."""
    return torch.roll(x, SHIFT, dims=-1)


@functools.lru_cache(maxsize=2)
def load(test_size: float = 0.3, split_seed: int = 0) -> Digits:
    """The digits with a fixed stratified train/test split."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / PIXEL_SCALE - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_size, random_state=split_seed, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Digits(x[tr], y[tr], x[te], y[te])
