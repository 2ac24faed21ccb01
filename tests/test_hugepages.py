"""Huge pages for torch's large buffers in the processes rebasin starts (rebasin.hugepages)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
from rebasin.hugepages import use_huge_pages
print(use_huge_pages())
import torch
x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB, touched
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")) >> 10)
"""
_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _python(code: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()


@pytest.mark.skipif(not _MODE.is_file() or "[madvise]" not in _MODE.read_text()
                    or not Path("/proc/self/smaps_rollup").is_file(),
                    reason="the kernel's transparent huge pages are not in madvise mode (then torch's request changes "
                           "nothing: always maps every large region that way, never none)")
def test_huge_pages_before_torch_and_off_when_the_user_says_so():
    """use_huge_pages() before torch's import makes its large buffers huge pages; THP_MEM_ALLOC_ENABLE=0
    from the user is kept, and then they are not (the control)."""
    on, huge = _python(_PROBE)
    assert on == "True" and int(huge) >= 32  # MiB of the 64 in huge pages
    off, none = _python(_PROBE, THP_MEM_ALLOC_ENABLE="0")
    assert off == "False" and int(none) < 8


def test_command_line_and_benchmark_runner_reach_the_switch_before_torch():
    """Importing the command line or the benchmark package imports no torch, so main() can still turn huge
    pages on; the runner turns them on as it is imported. Control: rebasin.transfer imports torch."""
    check = "import sys, {m}; print('torch' in sys.modules)"
    assert _python(check.format(m="rebasin.cli")) == ["False"]
    assert _python(check.format(m="benchmarks"), PYTHONPATH=str(Path(__file__).resolve().parents[1])) == ["False"]
    assert _python(check.format(m="rebasin.transfer")) == ["True"]
    runner = "import os, benchmarks.__main__; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    assert _python(runner, PYTHONPATH=str(Path(__file__).resolve().parents[1])) == ["1"]
