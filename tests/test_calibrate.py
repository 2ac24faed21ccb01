"""Data-free calibration of α: planted best α, the verdict, --require-gain, deterministic probes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CASES, save_like

from rebasin.calibrate import block_of
from rebasin.cli import main
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, random_perms
from rebasin.probes import make_probes
from rebasin.transfer import transfer


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A; A_ft = A + u; B = A + ½u (best diff α = ½, exactly); Bp = π(B) (best rebasin α = ½); C unrelated."""
    root = tmp_path_factory.mktemp("planted")
    model = CASES["llama"].build()
    model.save_pretrained(root / "A")
    sa = load_file(root / "A" / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    u = {k: 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else torch.zeros_like(v)
         for k, v in sa.items()}
    save_like(root / "Aft", {k: sa[k] + u[k] for k in sa}, root / "A")
    sb = {k: sa[k] + 0.5 * u[k] for k in sa}
    save_like(root / "B", sb, root / "A")
    spec = open_model(root / "A").spec
    save_like(root / "Bp", apply_to_state(spec, random_perms(spec, torch.Generator().manual_seed(2)), sb), root / "A")
    torch.manual_seed(123)
    type(model)(model.config).save_pretrained(root / "C")
    return root


def test_diff_mode_calibration_recovers_the_planted_alpha(planted, tmp_path):
    r = transfer(planted / "A", planted / "Aft", planted / "B", tmp_path / "out", mode="diff", alpha="auto",
                 probe_count=8, probe_length=16)
    c = r.report["calibration"]
    assert abs(c["alpha"] - 0.5) < 0.03, c["curve"]
    assert c["kl_chosen"] < 0.01 * c["kl_base"] and c["verdict"] == "carries over"
    assert c["line"].startswith("carries over: α = 0.5")
    assert (tmp_path / "out" / "alpha.png").is_file()


def test_rebasin_mode_calibration_through_a_planted_permutation(planted, tmp_path):
    r = transfer(planted / "A", planted / "Aft", planted / "Bp", tmp_path / "out", mode="rebasin", alpha="auto",
                 probe_count=8, probe_length=16)
    c = r.report["calibration"]
    assert abs(c["alpha"] - 0.5) < 0.03, c["curve"]
    # diff mode on the permuted base adds τ in the wrong coordinates: calibration backs off to ≈ B
    d = transfer(planted / "A", planted / "Aft", planted / "Bp", tmp_path / "diff", mode="diff", alpha="auto",
                 probe_count=8, probe_length=16).report["calibration"]
    assert d["kl_chosen"] > 10 * c["kl_chosen"]


def test_unrelated_base_gets_the_does_not_carry_over_verdict(planted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
                 str(planted / "C"), "-o", str(out), "--mode", "diff", "--probe-count", "8",
                 "--probe-length", "16"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    c = rep["calibration"]
    assert c["kl_chosen"] <= c["kl_base"]
    if c["verdict"] == "does not carry over":
        assert "does not carry over: best α ≈" in printed
    assert c["line"] in printed


def test_require_gain_refuses_with_exit_7_and_writes_nothing(planted, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
                 str(planted / "Bp"), "-o", str(out), "--mode", "diff", "--probe-count", "8", "--probe-length", "16",
                 "--require-gain", "0.5"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 7 and not out.exists() and not list(tmp_path.iterdir())
    assert last.startswith("rebasin: error: ") and "--require-gain" in last


def test_same_lineage_is_detected(planted, tmp_path):
    r = transfer(planted / "A", planted / "Aft", planted / "B", tmp_path / "out", mode="rebasin", alpha=1.0)
    assert r.report["lineage"] and r.report["lineage"].startswith("B continues A")


def test_numeric_alpha_is_checked_and_warned_when_worse_than_b(planted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
                 str(planted / "Bp"), "-o", str(out), "--mode", "diff", "--alpha", "3", "--probe-count", "8",
                 "--probe-length", "16"]) == 0
    printed = capsys.readouterr().out
    assert "warning: α = 3 leaves the output further from the fine-tune than B" in printed


def test_auto_layer_fits_only_alphas_and_reports_them(planted, tmp_path, monkeypatch):
    monkeypatch.setattr("rebasin.calibrate.LAYER_STEPS", 40)
    r = transfer(planted / "A", planted / "Aft", planted / "B", tmp_path / "out", mode="diff", alpha="auto-layer",
                 probe_count=8, probe_length=16)
    fit = r.report["calibration"]["layer_fit"]
    assert set(fit["blocks"]) == {"model", "model.0", "model.1", "lm_head"}
    assert all(abs(a - 0.5) < 0.2 for a in fit["blocks"].values())


def test_probes_are_deterministic_per_seed():
    model = CASES["llama"].build()
    a = make_probes(model, count=4, length=12, seed=7).inputs["input_ids"]
    b = make_probes(model, count=4, length=12, seed=7).inputs["input_ids"]
    c = make_probes(model, count=4, length=12, seed=8).inputs["input_ids"]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 12)
    bert = CASES["bert"].build()
    p1, p2 = make_probes(bert, count=3, length=10, seed=1), make_probes(bert, count=3, length=10, seed=1)
    assert torch.equal(p1.inputs["input_ids"], p2.inputs["input_ids"])
    vit = CASES["vit"].build()
    assert make_probes(vit, count=4, seed=0).inputs["pixel_values"].shape == (4, 3, 16, 16)


def test_blocks_agree_between_checkpoint_and_module_names():
    assert block_of("vit.encoder.layer.3.output.dense.weight") == block_of("vit.layers.3.mlp.fc2.weight") == "vit.3"
    assert block_of("model.layers.12.mlp.up_proj.weight") == "model.12"
    assert block_of("lm_head.weight") == "lm_head"
