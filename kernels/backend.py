"""Guards for the optional GPU toolchain (triton) — never import it unguarded."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors living on ``device``?

    On CUDA tensors when triton is installed; on CPU tensors only in interpreter mode.
    """
    if not triton_installed():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpret_mode()


def pick_backend(backend: str, device: torch.device | str) -> str:
    """The backend a kernel's dispatcher runs: "triton" or "torch" (its plain reference).

    ``auto`` takes Triton only for CUDA tensors where it is usable (the CPU interpreter is for
    tests, not speed). ValueError for anything but "auto", "triton", "torch".
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_usable(device) else "torch"
    return backend
