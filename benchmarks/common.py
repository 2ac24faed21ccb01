"""Shared benchmark plumbing: device description, timing, JSON + markdown output.

Every benchmark module ``benchmarks/bench_<name>.py`` exposes

    def run(quick: bool, device: str) -> list[dict]

returning one record per measured case. A record holds at least ``case``, ``seconds``
and, where it applies, ``objective``, ``reference_objective`` and ``ratio_vs_<baseline>``
(baseline seconds / our seconds, measured in the same run).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def device_info(device: str = "cpu") -> dict[str, Any]:
    """Name the machine a figure came from."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "huge_pages": huge_pages(),
    }
    info.update(machine_state())
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def huge_pages() -> str:
    """Whether torch asks for transparent huge pages on its large CPU buffers (``THP_MEM_ALLOC_ENABLE=1``, read
    when torch starts; off unless set) and the kernel's mode, e.g. "off (madvise)"."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    return f"{'on' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else 'off'} ({mode})"


def machine_state() -> dict[str, Any]:
    """The CPU model and the load averages (1, 5, 15 min) now: a timing on a shared machine is only
    comparable with the load it ran under."""
    state: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            state["cpu_model"] = models[0]
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        state["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    return state


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], *, device: str = "cpu", repeat: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup``; returns (seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def torch_linear_assignment_baseline(cost: torch.Tensor, device: str, maximize: bool = True) -> dict[str, Any]:
    """Time ``torch_linear_assignment.batch_linear_assignment`` (GPU baseline) on a (b, n, n) cost.

    Returns ``{"torch_linear_assignment_s", "torch_linear_assignment_objective"}`` (objective summed
    over the batch), or ``{"torch_linear_assignment": why not}`` when it cannot run here.
    """
    if not device.startswith("cuda"):
        return {"torch_linear_assignment": "GPU only"}
    if importlib.util.find_spec("torch_linear_assignment") is None:
        return {"torch_linear_assignment": "not installed"}
    try:
        from torch_linear_assignment import batch_linear_assignment

        c = -cost if maximize else cost
        seconds, perm = timeit(lambda: batch_linear_assignment(c), device=device, repeat=5)
        obj = cost.gather(2, perm.long().unsqueeze(2)).double().sum()
        return {"torch_linear_assignment_s": seconds, "torch_linear_assignment_objective": float(obj)}
    except Exception as exc:
        return {"torch_linear_assignment": f"failed: {type(exc).__name__}: {exc}"}


def write_results(name: str, records: list[dict], info: dict[str, Any], json_path: Path) -> Path:
    """Write ``{"benchmark", "machine", "records"}`` as JSON and a markdown table beside it."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": info, "records": records}
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown_table(name, records, info))
    return md_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(name: str, records: list[dict], info: dict[str, Any]) -> str:
    machine = ", ".join(f"{k}={v}" for k, v in info.items())
    if not records:
        return f"# {name}\n\nMachine: {machine}\n\n(no records)\n"
    cols: list[str] = []
    for rec in records:
        cols.extend(k for k in rec if k not in cols)
    lines = [f"# {name}", "", f"Machine: {machine}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        lines.append("| " + " | ".join(_fmt(rec.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"
