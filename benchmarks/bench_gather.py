"""Last-axis gathers: ``rebasin.symmetry.gather`` (the C loop of ``_gathercore`` on CPU) vs torch.

``python -m benchmarks gather [--quick]``

A permutation of a hidden axis gathers the columns of every matrix that reads it — the
embedding and the LM head included (vocabulary × hidden). Per shape, bfloat16, a random
permutation of the last axis, a fresh output each call as the engine makes it (page faults
included; huge pages as the environment sets them, named in the record): ours vs
``index_select(-1)`` vs advanced indexing ``x[:, index]`` (the previous path), medians of 5.
Results are checked bit for bit against ``index_select``.
"""
from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import timeit
from rebasin.symmetry.base import _gathercore, gather

SHAPES = {  # name: (rows, last axis)
    "qwen2-0.5b embedding (151936 x 896)": (151936, 896),
    "llama-125m embedding (32000 x 768)": (32000, 768),
    "llama-125m up_proj (2048 x 768)": (2048, 768),
    "llama-125m down_proj (768 x 2048)": (768, 2048),
}


def run(quick: bool, device: str) -> list[dict[str, Any]]:
    if device != "cpu":
        raise SystemExit("the gather benchmark measures the CPU path (on a GPU gather is index_select)")
    g = torch.Generator().manual_seed(0)
    records = []
    for name, (rows, cols) in SHAPES.items():
        if quick:
            rows = min(rows, 4096)
        x = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
        index = torch.randperm(cols, generator=g)
        ours_s, ours = timeit(lambda x=x, index=index: gather(x, 1, index), repeat=5)
        select_s, ref = timeit(lambda x=x, index=index: x.index_select(1, index), repeat=5)
        advanced_s, _ = timeit(lambda x=x, index=index: x[:, index].contiguous(), repeat=5)
        assert torch.equal(ours, ref)
        records.append({"case": name, "rows": rows, "cols": cols, "dtype": "bfloat16",
                        "c_extension": _gathercore() is not None, "ours_ms": round(ours_s * 1e3, 2),
                        "index_select_ms": round(select_s * 1e3, 2), "advanced_indexing_ms": round(advanced_s * 1e3, 2),
                        "speedup_vs_index_select": round(select_s / ours_s, 2),
                        "speedup_vs_advanced_indexing": round(advanced_s / ours_s, 2),
                        "threads": torch.get_num_threads()})
        print(records[-1], flush=True)
    return records
