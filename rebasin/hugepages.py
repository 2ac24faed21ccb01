"""Transparent huge pages for torch's large CPU buffers, in processes this package starts.

torch's CPU allocator asks the kernel for huge pages (``madvise(MADV_HUGEPAGE)``, 2 MiB aligned)
on buffers of 2 MiB and more when ``THP_MEM_ALLOC_ENABLE=1``. It reads that variable once, at its
first allocation, so it can only be set before torch is imported: the command line and the
benchmark runner call :func:`use_huge_pages` first thing. A library caller sets it in its own
environment.

Why: every fresh large buffer — a loaded tensor, a gathered copy, a forward's logits — is
page-faulted in 4 KiB at a time; with huge pages one fault maps 2 MiB. On a 2-core VM the
125 M-parameter calibration took 2.4–2.6 s instead of 3.5 s in back-to-back runs, and the 0.5 B
streaming jobs stayed within their memory plans (docs/design.md, Huge pages).
"""
from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it (``0`` turns it off) or torch is already
    imported (too late to matter). Returns whether torch will use huge pages."""
    if "torch" not in sys.modules:
        os.environ.setdefault(VARIABLE, "1")
    return os.environ.get(VARIABLE) == "1"
