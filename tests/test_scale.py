"""Issue: large checkpoints — streaming and cached matching agree bit for bit, transfer and apply
stream in chunks with the same results, the memory budget refuses before any work, estimates
are stated, and 2 gloo processes under torchrun return what one process returns."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from tiny_models import CASES

import rebasin.streaming as streaming
from rebasin.cli import main
from rebasin.errors import NonFiniteError, RefusedError
from rebasin.io.perms_file import load_perms, save_perms
from rebasin.io.stream_writer import Planned, StreamingCheckpointWriter
from rebasin.matching import match
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, identity, random_perms

TRANSFER_A1 = ["transfer", "--alpha", "1"]  # a given α: these tests check the arithmetic

HERE = Path(__file__).resolve().parent


def _planted_dirs(root: Path, model: T.PreTrainedModel, seed: int = 3, noise: float = 0.01) -> dict:
    """A (the model), B = π0(A) + noise, A_ft = A + τ, on disk (safetensors + config)."""
    model.save_pretrained(root / "A")
    sa = load_file(root / "A" / "model.safetensors")
    spec = open_model(root / "A").spec
    p0 = random_perms(spec, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    sb = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
          else v for k, v in apply_to_state(spec, p0, sa).items()}
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sa.items()}
    for name, state in (("B", sb), ("Aft", ft)):
        shutil.copytree(root / "A", root / name)
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
    return {"sa": sa, "sb": sb, "ft": ft, "spec": spec, "p0": p0}


def _four_layer_llama() -> T.PreTrainedModel:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=48, vocab_size=61, max_position_embeddings=64)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    return root, _planted_dirs(root, _four_layer_llama())


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert", "gpt2", "clip"])
def test_streaming_and_cached_are_bit_identical(name, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMS", 96)  # many chunks per tensor on a tiny model
    d = _planted_dirs(tmp_path, CASES[name].build())
    a, b = tmp_path / "A", tmp_path / "B"
    rs, rc = match(a, b, cache=False), match(a, b, cache=True)
    assert (rs.memory_mode, rc.memory_mode) == ("streaming", "cached")
    assert rs.perms.keys() == rc.perms.keys() and all(torch.equal(rs.perms[k], rc.perms[k]) for k in rs.perms)
    assert rs.objective_history == rc.objective_history and rs.objective_identity == rc.objective_identity
    assert [vars(g) for g in rs.groups] == [vars(g) for g in rc.groups]
    assert all(torch.equal(rs.perms[k], d["p0"][k]) for k in d["p0"])  # π(A) ≈ B = π0(A): π = π0
    # streaming reads tensors again for each step, cached once
    assert rs.io["tensor_reads"] > rc.io["tensor_reads"] == len(d["spec"].permuted_tensors())


def test_objective_is_tracked_from_costs(llama4):
    """J after each sweep, tracked from the costs' gathers, equals a direct pass over the weights."""
    from rebasin.matching.engine import objective

    root, d = llama4
    result = match(root / "A", root / "B")
    spec = open_model(root / "A").spec
    sa = {k: v.float() for k, v in d["sa"].items()}
    sb = {k: v.float() for k, v in d["sb"].items()}
    direct = objective(spec, sa, sb, result.perms)
    ident = objective(spec, sa, sb, identity(spec))
    assert result.objective == pytest.approx(direct, rel=1e-5)
    assert result.objective_identity == pytest.approx(ident, rel=1e-5)
    assert all(g.cos_after == pytest.approx(1.0, abs=1e-3) for g in result.groups)


def test_diff_and_rebasin_transfer_stream_exactly(llama4, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMS", 100)
    root, d = llama4
    for mode in ("diff", "rebasin"):
        out = tmp_path / mode
        assert main(["transfer", "--alpha", "0.7", "--old-base", str(root / "A"), "--finetuned", str(root / "Aft"),
                     "--new-base", str(root / "B"), "-o", str(out), "--mode", mode]) == 0
        got = load_file(out / "model.safetensors")
        delta = {k: d["ft"][k].float() - d["sa"][k].float() for k in d["sa"]}
        if mode == "rebasin":  # π as written (π0's permutations; any within-head rotations it found too)
            pi, _ = load_perms(out / "permutations.safetensors")
            assert all(torch.equal(pi[k], d["p0"][k]) for k in d["p0"])
            delta = apply_to_state(d["spec"], pi, delta)
        for k, vb in d["sb"].items():
            assert torch.equal(got[k], (vb.float() + 0.7 * delta[k]).to(vb.dtype)), k
        rep = json.loads((out / "report.json").read_text())
        assert rep["timings_s"]["write"] > 0 and (mode == "diff" or rep["match"]["memory_mode"])


def test_nan_found_in_the_pass_that_reads_it(llama4, tmp_path, capsys):
    root, d = llama4
    bad = tmp_path / "Aft"
    shutil.copytree(root / "Aft", bad)
    ft = dict(d["ft"])
    name = "model.layers.2.mlp.down_proj.weight"
    ft[name] = ft[name].clone()
    ft[name][3, 5] = float("inf")
    save_file(ft, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code = main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(bad),
                 "--new-base", str(root / "B"), "-o", str(out), "--mode", "diff"])
    err = capsys.readouterr().err
    assert code == 5 and name in err and "Aft" in err and not out.exists()
    # match: the same one read finds it (A side here)
    with pytest.raises(NonFiniteError, match="down_proj"):
        match(bad, root / "B")


def test_apply_streams_chunks_into_shards(llama4, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMS", 50)
    root, d = llama4
    perms = tmp_path / "p.safetensors"
    save_perms(perms, d["p0"], family="llama")
    out = tmp_path / "out"
    assert main(["apply", str(root / "A"), "--perms", str(perms), "-o", str(out), "--max-shard-size",
                 str(20e3 / 2**30)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(out / shard))
    want = apply_to_state(d["spec"], d["p0"], d["sa"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    model = T.LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4


def test_stream_writer_layout_and_order(tmp_path):
    layout = [Planned("a", torch.bfloat16, (3, 4)), Planned("b", torch.int64, ()), Planned("c", torch.float32, (5,))]
    w = StreamingCheckpointWriter(tmp_path, layout, max_shard_bytes=30)
    a = torch.randn(3, 4).to(torch.bfloat16)
    w.write("a", a[:2])
    w.write("a", a[2:])
    w.write("b", torch.tensor(7))
    with pytest.raises(RuntimeError, match="out of the planned order"):
        w.write("a", a)
    w.write("c", torch.arange(5.0))
    files = w.close()
    assert len(files) == 2 and (tmp_path / "model.safetensors.index.json").is_file()
    got = {**load_file(files[0]), **load_file(files[1])}
    assert torch.equal(got["a"], a) and int(got["b"]) == 7 and torch.equal(got["c"], torch.arange(5.0))


def test_memory_budget_refuses_before_any_work(llama4, tmp_path, capsys):
    root, _ = llama4
    with pytest.raises(RefusedError, match="budget"):
        match(root / "A", root / "B", memory=0.01)
    from rebasin.transfer import transfer

    out = tmp_path / "out"
    with pytest.raises(RefusedError, match=r"refused|budget"):
        transfer(root / "A", root / "Aft", root / "B", out, alpha=1.0, memory=0.01)
    assert not out.exists()
    plan = transfer(root / "A", root / "Aft", root / "B", out, alpha=1.0, dry_run=True, memory=0.01).report["plan"]
    assert plan["memory"]["fits"] is False and "exit 7" in plan["peak_memory"]
    plan = transfer(root / "A", root / "Aft", root / "B", out, alpha=1.0, dry_run=True, memory=64).report["plan"]
    assert plan["memory_mode"] == "cached" and plan["memory"]["fits"] and "s predicted" in plan["time"]
    from rebasin.apply import apply_checkpoint

    with pytest.raises(RefusedError):
        apply_checkpoint(open_model(root / "A"), random_perms(open_model(root / "A").spec), out, memory=0.01)
    assert main(["inspect", str(root / "A")]) == 0
    text = capsys.readouterr().out
    assert "match (streaming)" in text and "transfer (diff)" in text


def test_two_gloo_processes_match_one_process(llama4, tmp_path):
    """torchrun, 2 CPU processes (gloo): the same permutations, objective and transfer output as
    one process; each rank owns 2 of the 4 layers."""
    root, _ = llama4
    single = match(root / "A", root / "B", cache=False)
    from rebasin.transfer import transfer

    transfer(root / "A", root / "Aft", root / "B", tmp_path / "single", mode="rebasin", alpha=1.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dist_helper.py"), str(root / "A"), str(root / "B"), str(root / "Aft"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        perms = load_file(tmp_path / f"perms-rank{rank}.safetensors")
        assert all(torch.equal(perms[k], single.perms[k]) for k in single.perms), rank
        res = json.loads((tmp_path / f"result-rank{rank}.json").read_text())
        assert res["objective_history"] == pytest.approx(single.objective_history, rel=1e-6)
        assert res["distributed"]["world_size"] == 2
        shares = res["distributed"]["ranks"]
        assert [s["groups"] for s in shares] == [4, 4] and all(s["tensors"] > 0 for s in shares)
    assert json.loads((tmp_path / "transfer-rank1.json").read_text())["rank_only"]
    got = load_file(tmp_path / "transfer" / "model.safetensors")
    want = load_file(tmp_path / "single" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
