"""Run by tests/test_scale.py under ``torchrun`` (gloo, CPU): every rank matches A onto B and
transfers A_ft, exactly as a single process would be called; each rank records what it got."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(a: str, b: str, aft: str, out: str) -> None:
    from rebasin.matching import match
    from rebasin.transfer import transfer

    result = match(a, b, progress=False, cache=False)
    import torch.distributed as td

    rank = td.get_rank()
    out_dir = Path(out)
    save_file({k: v.contiguous() for k, v in result.perms.items()}, str(out_dir / f"perms-rank{rank}.safetensors"))
    (out_dir / f"result-rank{rank}.json").write_text(json.dumps(result.to_dict()))
    res = transfer(a, aft, b, out_dir / "transfer", mode="rebasin", alpha=1.0, check_alpha=False)
    (out_dir / f"transfer-rank{rank}.json").write_text(json.dumps({"rank_only": bool(res.report.get("rank_only"))}))
    td.barrier()
    td.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:5])
