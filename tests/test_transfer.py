"""Issue: transfer — diff/rebasin arithmetic, loads in transformers/peft, vocab, refusals."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CASES, run_model, save_like

from rebasin.cli import main
from rebasin.io.perms_file import load_perms
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, random_perms

TRANSFER_A1 = ["transfer", "--alpha", "1"]  # a given α: these tests check the arithmetic



@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A (llama), A_ft = A + τ, B = π0(A) (planted), and an independent B2."""
    root = tmp_path_factory.mktemp("trio")
    model = CASES["llama"].build()
    model.save_pretrained(root / "A")
    sa = load_file(root / "A" / "model.safetensors")
    spec = open_model(root / "A").spec
    p0 = random_perms(spec, torch.Generator().manual_seed(3))
    save_like(root / "B", apply_to_state(spec, p0, sa), root / "A")
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sa.items()}
    save_like(root / "Aft", ft, root / "A")
    torch.manual_seed(77)
    type(model)(model.config).save_pretrained(root / "B2")
    return root, sa, ft, spec, p0


def test_diff_mode_is_exact_and_alpha_zero_is_b(trio, tmp_path):
    root, sa, ft, _, _ = trio
    sb = load_file(root / "B2" / "model.safetensors")
    for alpha in (0.7, 0.0):
        out = tmp_path / f"diff{alpha}"
        assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(root / "Aft"), "--new-base",
                     str(root / "B2"), "-o", str(out), "--mode", "diff", "--alpha", str(alpha)]) == 0
        got = load_file(out / "model.safetensors")
        for k in sb:
            want = (sb[k].float() + alpha * (ft[k].float() - sa[k].float())).to(sb[k].dtype)
            assert torch.equal(got[k], want), k
        if alpha == 0.0:
            assert all(torch.equal(got[k], sb[k]) for k in sb)
        assert not (out / "permutations.safetensors").exists()


def test_rebasin_planted_gives_pi0_of_finetune(trio, tmp_path):
    import transformers as T

    root, sa, ft, spec, p0 = trio
    out = tmp_path / "rb"
    assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(root / "Aft"), "--new-base",
                 str(root / "B"), "-o", str(out), "--verify"]) == 0
    got = load_file(out / "model.safetensors")
    want = apply_to_state(spec, p0, ft)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    perms, meta = load_perms(out / "permutations.safetensors")
    assert meta["family"] == "llama"
    rep = json.loads((out / "report.json").read_text())
    assert rep["verify"]["max_abs_diff"] < 1e-4 and rep["match"]["objective"] >= rep["match"]["objective_identity"]
    assert (out / "alignment.png").stat().st_size > 1000 and "cos after" in (out / "report.md").read_text()
    # output loads in transformers and computes what pi0(A_ft) computes == what A_ft computes
    model = T.LlamaForCausalLM.from_pretrained(out).eval()
    aft = T.LlamaForCausalLM.from_pretrained(root / "Aft").eval()
    y0, y1 = run_model(aft, CASES["llama"]), run_model(model, CASES["llama"])
    assert float((y0 - y1).abs().max() / y0.abs().max()) < 1e-4
    # --perms reuses the permutations without matching
    out2 = tmp_path / "rb2"
    assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(root / "Aft"), "--new-base",
                 str(root / "B"), "-o", str(out2), "--perms", str(out / "permutations.safetensors")]) == 0
    got2 = load_file(out2 / "model.safetensors")
    assert all(torch.equal(got2[k], got[k]) for k in got)


def test_lora_adapter_transfer_loads_in_peft_and_matches_merged(trio, tmp_path):
    import peft
    import transformers as T

    root, sa, _, spec, p0 = trio
    base = T.LlamaForCausalLM.from_pretrained(root / "A")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
    pm.save_pretrained(root / "lora")
    merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "Aft_merged")
    # a fresh process calibrating the adapter (diff mode: nothing waits before it) imports peft while the
    # background transformers import may still run: it must not see a half-initialised transformers
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "rebasin", "transfer", "--old-base", str(root / "A"), "--finetuned",
                           str(root / "lora"), "--new-base", str(root / "B"), "-o", str(tmp_path / "lora_auto"),
                           "--mode", "diff", "--probe-count", "4", "--probe-length", "8"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "lora_out"
    assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(root / "lora"), "--new-base",
                 str(root / "B"), "-o", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"].endswith("B")
    full = tmp_path / "full_out"
    assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(tmp_path / "Aft_merged"),
                 "--new-base", str(root / "B"), "-o", str(full)]) == 0
    on_b = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(root / "B"), out).eval()
    full_model = T.LlamaForCausalLM.from_pretrained(full).eval()
    y_adapter, y_full = run_model(on_b, CASES["llama"]), run_model(full_model, CASES["llama"])
    assert float((y_adapter - y_full).abs().max() / y_full.abs().max()) < 1e-4
    # and the adapter really changed B's function
    y_b = run_model(T.LlamaForCausalLM.from_pretrained(root / "B").eval(), CASES["llama"])
    assert float((y_adapter - y_b).abs().max()) > 1e-3


def test_vocabulary_change_maps_shared_tokens(tmp_path):
    import transformers as T

    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
           "max_position_embeddings": 16}
    tokens_a = [f"tok{i}" for i in range(40)]
    tokens_b = [t for i, t in enumerate(tokens_a) if i % 4 != 0][::-1] + [f"new{i}" for i in range(20)]  # 50
    dirs = {}
    for name, toks, seed in (("A", tokens_a, 0), ("B", tokens_b, 1)):
        torch.manual_seed(seed)
        m = T.BertForMaskedLM(T.BertConfig(vocab_size=len(toks), **cfg))
        m.save_pretrained(tmp_path / name)
        (tmp_path / name / "vocab.txt").write_text("\n".join(toks) + "\n")
        dirs[name] = tmp_path / name
    sa = load_file(dirs["A"] / "model.safetensors")
    ft = {k: v + 0.01 for k, v in sa.items()}
    save_like(tmp_path / "Aft", ft, dirs["A"])
    out = tmp_path / "out"
    assert main([*TRANSFER_A1, "--old-base", str(dirs["A"]), "--finetuned", str(tmp_path / "Aft"), "--new-base",
                 str(dirs["B"]), "-o", str(out), "--mode", "diff"]) == 0
    got, sb = load_file(out / "model.safetensors"), load_file(dirs["B"] / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    for ib, tok in enumerate(tokens_b):
        if tok in tokens_a:
            ia = tokens_a.index(tok)
            assert torch.allclose(got[key][ib], sb[key][ib] + (ft[key][ia] - sa[key][ia]))
        else:
            assert torch.equal(got[key][ib], sb[key][ib])
    rep = json.loads((out / "report.json").read_text())
    assert rep["vocab"]["shared_rows"] == 30 and rep["vocab"]["b_rows_kept_from_b"] == 20
    # rebasin mode also runs (matching uses the shared rows)
    assert main([*TRANSFER_A1, "--old-base", str(dirs["A"]), "--finetuned", str(tmp_path / "Aft"), "--new-base",
                 str(dirs["B"]), "-o", str(tmp_path / "rb")]) == 0
    # so does calibration of either target across the vocabulary change (compared on the shared tokens)
    for target in ("finetune", "transferred"):
        out = tmp_path / f"auto-{target}"
        assert main(["transfer", "--old-base", str(dirs["A"]), "--finetuned", str(tmp_path / "Aft"), "--new-base",
                     str(dirs["B"]), "-o", str(out), "--mode", "diff", "--probe-count", "8", "--probe-length", "12",
                     "--alpha-target", target]) == 0
        c = json.loads((out / "report.json").read_text())["calibration"]
        assert c["target"] == target
        assert all(math.isfinite(d) and d >= 0 for _, d in c["curve"]), c["curve"]


def test_dry_run_writes_nothing(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "dry"
    assert main([*TRANSFER_A1, "--old-base", str(root / "A"), "--finetuned", str(root / "Aft"), "--new-base",
                 str(root / "B"), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "peak_memory" in text and "permutations.safetensors" in text
    assert not out.exists()


# ---- refusals: message, exit code, nothing written ----

def _refused(argv, code, words, out, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _args(a, f, b, out, *extra):
    return ["transfer", "--old-base", str(a), "--finetuned", str(f), "--new-base", str(b), "-o", str(out), *extra]


def test_refuses_mismatched_architectures(trio, tmp_path, capsys):
    root = trio[0]
    CASES["gpt2"].build().save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    _refused(_args(root / "A", tmp_path / "gpt2", root / "B", out), 7, ["llama", "gpt2"], out, capsys)
    _refused(_args(root / "A", root / "Aft", tmp_path / "gpt2", out), 7, ["new base", "gpt2"], out, capsys)
    import transformers as T

    T.LlamaForCausalLM(T.LlamaConfig(**{**CASES["llama"].build().config.to_dict(), "intermediate_size": 40})
                       ).save_pretrained(tmp_path / "wide")
    _refused(_args(root / "A", tmp_path / "wide", root / "B", out), 7, ["ffn"], out, capsys)


def test_refuses_empty_task_vector(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "out"
    _refused(_args(root / "A", root / "A", root / "B", out, "--mode", "diff"), 7, ["task vector is empty"], out, capsys)


def test_refuses_nan(trio, tmp_path, capsys):
    root, _, ft, _, _ = trio
    bad = dict(ft)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][3, 3] = float("inf")
    save_like(tmp_path / "nan", bad, root / "A")
    out = tmp_path / "out"
    _refused(_args(root / "A", tmp_path / "nan", root / "B", out, "--mode", "diff"), 5,
             ["model.layers.1.mlp.up_proj.weight", "NaN/Inf", "nan"], out, capsys)


def test_refuses_truncated_and_pickle(trio, tmp_path, capsys):
    root = trio[0]
    shutil.copytree(root / "Aft", tmp_path / "trunc")
    data = (tmp_path / "trunc" / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[:-64])
    out = tmp_path / "out"
    _refused(_args(root / "A", tmp_path / "trunc", root / "B", out), 3, ["truncated", "trunc"], out, capsys)
    (tmp_path / "pkl").mkdir()
    shutil.copy(root / "A" / "config.json", tmp_path / "pkl" / "config.json")
    torch.save({}, tmp_path / "pkl" / "pytorch_model.bin")
    _refused(_args(root / "A", tmp_path / "pkl", root / "B", out), 3, ["never unpickled"], out, capsys)


def test_refuses_existing_output_unless_overwrite(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(_args(root / "A", root / "Aft", root / "B", out, "--mode", "diff")) == 6
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert main(_args(root / "A", root / "Aft", root / "B", out, "--mode", "diff", "--overwrite")) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()


def test_disk_full_mid_write_leaves_nothing(trio, tmp_path, capsys, monkeypatch):
    from rebasin.io.stream_writer import StreamingCheckpointWriter

    root = trio[0]
    calls = {"n": 0}
    real = StreamingCheckpointWriter._write_bytes

    def full_disk(self, view):  # the disk fills up on the 5th tensor, half way through the shard
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(self, view)

    monkeypatch.setattr(StreamingCheckpointWriter, "_write_bytes", full_disk)
    out = tmp_path / "out"
    argv = _args(root / "A", root / "Aft", root / "B", out, "--mode", "diff")
    _refused(argv, 8, ["No space left", "nothing was written"], out, capsys)
