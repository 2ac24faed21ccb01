"""Data-free calibration of α: planted best α, the verdict, --require-gain, deterministic probes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CASES, save_like

from rebasin.calibrate import Candidate, block_of, calibrate, representable, task_vector
from rebasin.cli import main
from rebasin.model import open_model
from rebasin.permutation import apply_to_state, random_perms
from rebasin.probes import Probes, make_probes
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


def _diff_transfer(planted, new_base: str, out, *extra: str) -> list[str]:
    """The CLI argv of a calibrated diff-mode transfer of the planted fine-tune onto ``planted / new_base``."""
    return ["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
            str(planted / new_base), "-o", str(out), "--mode", "diff", "--probe-count", "8", "--probe-length", "16",
            *extra]


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


def test_bfloat16_forwards_recover_the_planted_alpha(planted):
    c = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", perms=None, alpha="auto",
                  probe_count=8, probe_length=16, dtype=torch.bfloat16)
    assert c.dtype == "bfloat16"
    assert abs(c.alpha - 0.5) < 0.05, c.curve
    assert c.verdict == "carries over" and c.kl_chosen < 0.05 * c.kl_base


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.5, 0.37, representable(0.37, torch.bfloat16), 1.7])
def test_candidate_sums_in_float32_and_rounds_once(base_dtype, alpha):
    """set() gives the float32 sum rounded once into the module's bfloat16: exactly on the float32 paths
    (a float32 base; an α bfloat16 cannot hold), and up to a last-place rounding of α·δ on a rare
    element when a bfloat16 base meets a bfloat16-valued α (one fused bfloat16 add)."""
    g = torch.Generator().manual_seed(0)
    module = torch.nn.Linear(700, 900).to(base_dtype)  # 630k weights: several set() slices
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    delta = {k: (0.05 * torch.randn(p.shape, generator=g)).bfloat16() for k, p in module.named_parameters()}
    base = {k: p.detach().clone() for k, p in module.named_parameters()}
    cand = Candidate(module, delta, torch.bfloat16)
    cand.set(alpha)
    fused = base_dtype == torch.bfloat16 and alpha == representable(alpha, torch.bfloat16)
    for k, p in module.named_parameters():
        want = torch.add(base[k].float(), delta[k].float(), alpha=alpha).bfloat16()
        assert p.dtype == torch.bfloat16
        if not fused:
            assert torch.equal(p, want), k
            continue
        off = p != want
        assert off.float().mean() < 1e-5, k
        ulp = (want.float().abs() * 2.0 ** -7).clamp_min(1e-30)
        assert ((p.float() - want.float()).abs() <= ulp)[off].all(), k
    # control: a bfloat16 sum rounds an α bfloat16 cannot hold, so the float32 slices are needed there
    if base_dtype == torch.bfloat16 and alpha != representable(alpha, torch.bfloat16):
        summed = torch.add(base["weight"], delta["weight"], alpha=alpha)
        assert (summed != torch.add(base["weight"].float(), delta["weight"].float(), alpha=alpha).bfloat16()
                ).float().mean() > 1e-3
    assert cand.representable(0.37) == representable(0.37, torch.bfloat16) != 0.37


def test_narrow_task_vector_is_the_float32_difference_rounded_once(tmp_path):
    """bfloat16 A and A_ft: τ taken in bfloat16 (one rounding of the float32 difference, no float32
    copies) equals the float32 difference rounded, bit for bit, permuted or not."""
    from rebasin.hf import load_hf_model

    model = CASES["llama"].build()
    model.save_pretrained(tmp_path / "A")
    sa = {k: v.bfloat16() for k, v in load_file(tmp_path / "A" / "model.safetensors").items()}
    g = torch.Generator().manual_seed(3)
    save_like(tmp_path / "A16", sa, tmp_path / "A")
    save_like(tmp_path / "Aft16", {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16()
                                   for k, v in sa.items()}, tmp_path / "A")
    ft = load_hf_model(tmp_path / "Aft16", what="test", dtype=torch.bfloat16)
    spec = open_model(tmp_path / "A").spec
    for perms in (None, random_perms(spec, torch.Generator().manual_seed(1))):
        narrow = task_vector(ft, tmp_path / "A16", "llama", perms, store=torch.bfloat16)
        wide = task_vector(ft, tmp_path / "A16", "llama", perms, store=torch.float32)
        assert narrow and narrow.keys() == wide.keys()
        for k in narrow:
            assert narrow[k].dtype == torch.bfloat16
            assert torch.equal(narrow[k], wide[k].bfloat16()), k
    assert any(torch.count_nonzero(v) for v in narrow.values())


def test_forward_dtype_policy(monkeypatch):
    import rebasin.calibrate as cal

    assert cal.forward_dtype(cal.BF16_MIN_PARAMS - 1) == torch.float32  # small: always float32
    rates = {torch.float32: 1.0, torch.bfloat16: 5.0}
    monkeypatch.setattr(cal, "gemm_rate", lambda device, dtype: rates[dtype])
    assert cal.forward_dtype(cal.BF16_MIN_PARAMS) == torch.bfloat16
    rates[torch.bfloat16] = 1.5  # bfloat16 without hardware support: slower than this threshold
    assert cal.forward_dtype(cal.BF16_MIN_PARAMS) == torch.float32


def test_kl_from_stored_probabilities_equals_the_direct_kl():
    """Teacher keeps p and Σ p·log p; the divergence of a candidate must equal KL(p ‖ q) computed directly,
    in float32 and when p is stored in bfloat16 (then against the rounded p)."""
    from rebasin.calibrate import Teacher

    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(4, 6, 50, generator=g) * 3
    student_logits = torch.randn(4, 6, 50, generator=g) * 3

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, input_ids):
            from types import SimpleNamespace
            return SimpleNamespace(logits=self.logits[input_ids[:, 0]])

    probes = Probes({"input_ids": torch.arange(4).unsqueeze(1)}, "test")
    for budget in (1 << 40, 0):
        import rebasin.calibrate as cal
        old, cal.LOGIT_BUDGET = cal.LOGIT_BUDGET, budget
        try:
            t = Teacher(Fixed(teacher_logits), probes, chunk=2)
        finally:
            cal.LOGIT_BUDGET = old
        total = sum(float(t.divergence(i, Fixed(student_logits)(**t.inputs(sl)), sl)[0].sum())
                    for i, sl in enumerate(t.slices()))
        p = torch.cat(t.targets).float()
        direct = float((p * (torch.log_softmax(teacher_logits, -1) - torch.log_softmax(student_logits, -1))).sum())
        assert total == pytest.approx(direct, rel=1e-4, abs=1e-4)


def test_unrelated_base_gets_the_does_not_carry_over_verdict(planted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_diff_transfer(planted, "C", out)) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    c = rep["calibration"]
    assert c["kl_chosen"] <= c["kl_base"]
    if c["verdict"] == "does not carry over":
        assert "does not carry over: best α ≈" in printed or "within the probes' noise of B's" in printed
    assert c["line"] in printed


def test_transferred_target_is_the_finetune_when_b_is_a(planted):
    """log p_T = log p_B + log p_Aft − log p_A is A_ft's own distribution when B = A: both targets give
    the same curve (control: onto another B they differ)."""
    opts = {"perms": None, "alpha": "auto", "probe_count": 8, "probe_length": 16}
    plain = calibrate(planted / "A", planted / "Aft", planted / "A", "llama", **opts)
    moved = calibrate(planted / "A", planted / "Aft", planted / "A", "llama", target="transferred", **opts)
    assert moved.target == "transferred" and plain.alpha == moved.alpha
    for (a1, d1), (a2, d2) in zip(plain.curve, moved.curve, strict=True):
        assert a1 == a2 and abs(d1 - d2) <= 1e-4 * max(d1, 1e-3), (plain.curve, moved.curve)
    other = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", target="transferred", **opts)
    assert abs(other.kl_base - calibrate(planted / "A", planted / "Aft", planted / "B", "llama", **opts).kl_base) \
        > 0.1 * other.kl_base


def test_transferred_targets_forward_of_b_gives_d0(planted):
    """Forming T runs B (the candidate at α = 0) over the probes once: the D(0) it returns is what the
    search would measure with a forward of its own (control: D(1) differs)."""
    from rebasin.calibrate import Teacher, _per_probe, mean_divergence, place_delta, task_vector
    from rebasin.hf import load_hf_model

    ft = load_hf_model(planted / "Aft", what="test")
    probes = make_probes(ft, count=8, length=16, seed=0, model_dir=planted / "Aft")
    teacher = Teacher(ft, probes, 2)
    teacher.subtract(load_hf_model(planted / "A", what="test"))
    b = load_hf_model(planted / "B", what="test")
    cand = Candidate(b, place_delta(task_vector(ft, planted / "A", "llama", None, store=torch.float32), b, None))
    cand.set(0.0)
    parts = teacher.onto(cand.module)
    sums, positions = torch.cat([s for s, _ in parts]), sum(n for _, n in parts)
    d0 = float(sums.sum()) / positions
    assert sums.shape == (8,) and d0 > 0 and d0 == mean_divergence(*_per_probe(cand, teacher, 0.0))
    assert mean_divergence(*_per_probe(cand, teacher, 1.0)) != d0


def test_transferred_target_carries_the_whole_change_onto_b(planted, tmp_path, capsys):
    """B = A + ½u, A_ft = A + u: imitating A_ft wants α = ½ (B + ½u = A_ft); carrying the fine-tune's
    change u over onto B wants α ≈ 1. The CLI names the target; --no-verdict cannot take one."""
    out = tmp_path / "out"
    assert main(_diff_transfer(planted, "B", out, "--alpha-target", "transferred")) == 0
    c = json.loads((out / "report.json").read_text())["calibration"]
    assert c["target"] == "transferred" and abs(c["alpha"] - 1.0) < 0.15, c["curve"]
    assert c["verdict"] == "carries over" and "KL(A_ft→B ‖ B)" in capsys.readouterr().out
    assert "A_ft→B" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
              str(planted / "B"), "-o", str(tmp_path / "x"), "--alpha", "1", "--no-verdict",
              "--alpha-target", "transferred"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


def test_a_fresh_process_calibrates_while_transformers_is_still_being_imported(planted, tmp_path):
    """`transfer` imports transformers in a background thread; in diff mode (no match to wait for)
    calibration asked for it at once and got a half-initialised module (AttributeError). A fresh
    interpreter, as a user's command runs, must wait for that import instead."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rebasin", "transfer", "--old-base", str(planted / "A"),
                           "--finetuned", str(planted / "Aft"), "--new-base", str(planted / "B"), "-o", str(out),
                           "--mode", "diff", "--probe-count", "4", "--probe-length", "8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "carries over" in proc.stdout and (out / "report.json").is_file()


@pytest.mark.parametrize("target", ["finetune", "transferred"])
def test_headless_features_are_compared_in_bs_basis(tmp_path, target):
    """A headless model's output features are its residual stream, which a transfer's π may move:
    B = π(A) and A_ft = A + u make B + 1·π(u) = π(A_ft) exactly, so D(1) = 0 once A's side is gathered
    into B's basis (the residual permutation moves most units, so without that the test fails)."""
    import transformers as T
    from tiny_models import ENC, TEXT

    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**ENC, **TEXT)).eval().save_pretrained(tmp_path / "A")
    sa = load_file(tmp_path / "A" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    save_like(tmp_path / "Aft", {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
                                 for k, v in sa.items()}, tmp_path / "A")
    spec = open_model(tmp_path / "A").spec.free_output()
    pi = random_perms(spec, torch.Generator().manual_seed(3))
    assert (pi["residual"] != torch.arange(len(pi["residual"]))).float().mean() > 0.5
    save_like(tmp_path / "B", apply_to_state(spec, pi, sa), tmp_path / "A")
    c = calibrate(tmp_path / "A", tmp_path / "Aft", tmp_path / "B", "bert", perms=pi, alpha="auto", probe_count=8,
                  probe_length=16, target=target)
    d = dict(c.curve)
    assert c.divergence == "nmse" and d[1.0] < 1e-6 * d[0.0] + 1e-9, c.curve
    assert min(d, key=d.get) == 1.0, c.curve  # (the verdict may still say no: random noise on the
    # embeddings, which no σ of a headless model moves, survives the null model)


def test_require_gain_refuses_with_exit_7_and_writes_nothing(planted, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_diff_transfer(planted, "Bp", out, "--require-gain", "0.5"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 7 and not out.exists() and not list(tmp_path.iterdir())
    assert last.startswith("rebasin: error: ") and "--require-gain" in last


def test_same_lineage_is_detected(planted, tmp_path):
    r = transfer(planted / "A", planted / "Aft", planted / "B", tmp_path / "out", mode="rebasin", alpha=1.0)
    assert r.report["lineage"] and r.report["lineage"].startswith("B continues A")
    # B re-released with its units re-ordered: not the identity, and rebasin is the mode to use
    r = transfer(planted / "A", planted / "Aft", planted / "Bp", tmp_path / "outp", mode="rebasin", alpha=1.0)
    assert r.report["lineage"] and r.report["lineage"].startswith("B is A's lineage with its units re-ordered")
    # an independently initialised base: neither line
    r = transfer(planted / "A", planted / "Aft", planted / "C", tmp_path / "outc", mode="rebasin", alpha=1.0)
    assert r.report["lineage"] is None


def test_numeric_alpha_is_checked_and_warned_when_worse_than_b(planted, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_diff_transfer(planted, "Bp", out, "--alpha", "3")) == 0
    printed = capsys.readouterr().out
    assert "warning: α = 3 leaves the output further from the fine-tune than B" in printed


def test_no_verdict_skips_calibration_and_writes_the_same_weights(planted, tmp_path, capsys):
    outs = {}
    for flag in ([], ["--no-verdict"]):
        out = tmp_path / ("plain" if flag else "checked")
        assert main(["transfer", "--old-base", str(planted / "A"), "--finetuned", str(planted / "Aft"), "--new-base",
                     str(planted / "B"), "-o", str(out), "--mode", "diff", "--alpha", "1", "--probe-count", "4",
                     "--probe-length", "8", *flag]) == 0
        outs[bool(flag)] = (load_file(out / "model.safetensors"), json.loads((out / "report.json").read_text()))
    assert outs[False][1]["calibration"] is not None and outs[True][1]["calibration"] is None
    assert outs[True][1]["verdict_skipped"] == "--no-verdict" and outs[False][1]["verdict_skipped"] is None
    assert "verdict: not measured (--no-verdict)" in (tmp_path / "plain" / "report.md").read_text()
    assert "verdict: not measured (--no-verdict)" in capsys.readouterr().out
    assert all(torch.equal(outs[False][0][k], v) for k, v in outs[True][0].items())


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


def test_sampled_probes_carry_the_samplers_logits_at_every_position():
    """The teacher reuses the logits the fine-tune sampled with: they are its full forward's, position for
    position (control: the same logits shifted by one position are not)."""
    model = CASES["llama"].build().eval()
    probes = make_probes(model, count=3, length=10, seed=4)
    ids = probes.inputs["input_ids"]
    assert probes.logits is not None and probes.logits.shape == (3, 10, model.config.vocab_size)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert torch.allclose(probes.logits, full, atol=1e-4)
    assert not torch.allclose(probes.logits[:, 1:], full[:, :-1], atol=1e-2)


def test_blocks_agree_between_checkpoint_and_module_names():
    assert block_of("vit.encoder.layer.3.output.dense.weight") == block_of("vit.layers.3.mlp.fc2.weight") == "vit.3"
    assert block_of("model.layers.12.mlp.up_proj.weight") == "model.12"
    assert block_of("lm_head.weight") == "lm_head"


@pytest.mark.parametrize("best, width", [(0.8, 1.0), (0.35, 0.5), (0.12, 0.3), (1.3, 1.0), (0.0, 1.0)])
def test_search_brackets_and_refines_the_minimum(best, width):
    """Smooth single-dipped curves (what task vectors give): α* within the refinement tolerance, in few forwards."""
    from rebasin.calibrate import REFINE_TOL, _search

    curve: dict[float, float] = {}

    def f(a: float) -> float:
        curve.setdefault(a, 1.0 + ((a - best) / width) ** 2 + 0.1 * (a - best) ** 3)
        return curve[a]

    _search(f, curve)
    found = min(curve, key=curve.get)
    assert abs(found - best) <= REFINE_TOL, sorted(curve)
    assert len(curve) <= 9, sorted(curve)


@pytest.mark.parametrize("spread", [0.0, 0.3, 1.5, 3.0])
def test_within_noise_is_the_one_standard_error_rule(spread):
    """Per-probe curves s_i(α) = (α − m_i)² with mean minimum m̄ = 1: the rise of D over the minimum,
    (1 − α)², equals one paired standard error, 2·(1 − α)·std(m)/√n, at α = 1 − 2·std(m)/√n (exact:
    the curves are parabolas, which the rule interpolates exactly). No spread: the minimum itself
    (control); a spread wider than the dip: α = 0, the output stays B."""
    from rebasin.calibrate import within_noise

    n = 32
    m = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = 1.0 + spread * (m - m.mean()) / m.std() if spread else torch.ones(n, dtype=torch.float64)
    points = (0.0, 0.5, 1.0, 1.5, 2.0)
    sums = {a: (a - m) ** 2 for a in points}
    curve = {a: float(s.sum()) / n for a, s in sums.items()}
    expected = max(0.0, 1.0 - 2 * spread / n ** 0.5)
    assert within_noise(curve, sums) == pytest.approx(expected, abs=0.5 / 63)
    tiny = {a: (a - (1.0 + 0.02 * (m - 1.0))) ** 2 for a in points}  # moves α by less than REFINE_TOL: kept
    assert within_noise({a: float(v.sum()) / n for a, v in tiny.items()}, tiny) == 1.0
    assert within_noise(curve, {}) == 1.0  # without per-probe sums: the minimum


def test_within_noise_between_evaluated_points_matches_a_dense_scan():
    """Per-probe curves that are not parabolas, on an uneven grid: the interpolated rule lands where a
    dense evaluation of the same curves puts the one-standard-error point (to the interpolation's
    error); a minimum at either end is returned as it is; float32 sums work too."""
    from rebasin.calibrate import within_noise

    n = 24
    gen = torch.Generator().manual_seed(1)
    m = 0.9 + 0.6 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = 1.0 + 0.3 * torch.rand(n, generator=gen, dtype=torch.float64)

    def s(a: float) -> torch.Tensor:
        return w * (a - m) ** 2 * (1 + 0.3 * a)

    points = (0.0, 0.25, 0.5, 0.8, 0.95, 1.1, 2.0)
    sums = {a: s(a) for a in points}
    curve = {a: float(v.sum()) / n for a, v in sums.items()}
    best = min(curve, key=curve.get)
    dense = torch.linspace(best, 0.0, 2001, dtype=torch.float64)
    rise = torch.stack([s(float(a)) - sums[best] for a in dense])
    within = rise.sum(1) <= n ** 0.5 * rise.std(1)
    expected = float(dense[int((~within).nonzero()[0, 0]) - 1])
    found = within_noise(curve, sums)
    assert found < best - 0.05 and found == pytest.approx(expected, abs=0.03), (found, expected, best)
    assert within_noise(curve, {a: v.float() for a, v in sums.items()}) == pytest.approx(found, abs=1e-3)
    rising = {a: (a + 0.1 * m) ** 2 for a in points}  # minimum at α = 0
    assert within_noise({a: float(v.sum()) for a, v in rising.items()}, rising) == 0.0
    falling = {a: (3.0 - a + 0.1 * m) ** 2 for a in points}  # minimum at the top end
    assert within_noise({a: float(v.sum()) for a, v in falling.items()}, falling) == 2.0


def test_sampler_keeps_each_steps_raw_logits_in_one_buffer():
    """Step t's logits land in keep[:, t] before end-of-sequence is masked; steps past keep_steps are
    drawn but not kept."""
    from rebasin.probes import _InverseCdfSampler

    sampler = _InverseCdfSampler(torch.Generator().manual_seed(0), keep_steps=2, never=[3])
    steps = [torch.randn(4, 5, generator=torch.Generator().manual_seed(t)) for t in range(3)]
    for scores in steps:
        out = sampler(None, scores.clone())
        assert out.argmax(-1).ne(3).all()
    assert sampler.step == 3 and sampler.keep.shape == (4, 2, 5)
    assert torch.equal(sampler.keep[:, 0], steps[0]) and torch.equal(sampler.keep[:, 1], steps[1])


def test_settled_needs_no_lowering_and_a_clear_verdict():
    """Half the probes settle "auto" when within_noise lowered nothing there and the reduction is clearly
    above (or below) the threshold; a lowered α, the top end, or a reduction at the threshold within
    the noise leave it open (the controls use the same spread)."""
    from rebasin.calibrate import ALPHA_MAX, CARRY_THRESHOLD, settled

    gen = torch.Generator().manual_seed(0)
    base = 1.0 + 0.2 * torch.rand(32, generator=gen, dtype=torch.float64)
    deep = {0.0: base, 0.5: 0.5 * base, 1.0: 0.1 * base}
    assert settled(deep, 1.0, 1.0)
    assert not settled(deep, 0.5, 1.0)  # within_noise lowered α from the minimum
    assert not settled({**deep, ALPHA_MAX: 0.05 * base}, ALPHA_MAX, ALPHA_MAX)
    assert settled({0.0: base, 0.5: 1.1 * base}, 0.0, 0.0)  # no gain at all: clearly below the threshold
    noise = 0.3 * torch.randn(32, generator=gen, dtype=torch.float64)
    edge = {0.0: base, 1.0: (1 - CARRY_THRESHOLD) * base + noise - noise.mean()}  # at the threshold
    assert not settled(edge, 1.0, 1.0)
    assert settled({0.0: base, 1.0: (1 - 3 * CARRY_THRESHOLD) * base + 0.01 * noise}, 1.0, 1.0)


def test_auto_measures_the_rest_of_the_probes_only_when_half_leaves_it_open(planted, monkeypatch, tmp_path,
                                                                          capsys):
    """The planted pair's minimum is clear on half the probes: "auto" stops there, with the verdict and
    about the α that every probe gives (control: CLEAR_Z = ∞ never settles, so every probe is measured);
    a given α, and auto-layer, measure every probe."""
    import rebasin.calibrate as cal

    opts = {"perms": None, "probe_count": 16, "probe_length": 16}
    half = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", alpha="auto", **opts)
    given = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", alpha=0.5, **opts)
    monkeypatch.setattr(cal, "CLEAR_Z", math.inf)
    full = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", alpha="auto", **opts)
    assert (half.measured, full.measured, given.measured) == (8, 16, 16), (half, full)
    assert half.verdict == full.verdict == "carries over" and abs(half.alpha - full.alpha) < 0.1, (half, full)
    assert len(half.noise) == len(half.curve)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert main(_diff_transfer(planted, "B", out)) == 0
    c = json.loads((out / "report.json").read_text())["calibration"]
    assert c["measured"] == c["probes"]["count"] // 2, c
    assert f"sampled probes; {c['measured']} of them settled it)" in capsys.readouterr().out
    assert f"the curve measured on {c['measured']} (they settled it)" in (out / "report.md").read_text()


def test_per_layer_alphas_must_win_beyond_noise():
    """The auto-layer rule: a gain on every probe is kept; the same total gain carried by one probe
    among noise is not (control: both have the same mean)."""
    from rebasin.calibrate import lower_beyond_noise

    reference = torch.full((16,), 2.0, dtype=torch.float64)
    assert lower_beyond_noise(reference - 0.1, reference)
    one = reference + 0.01
    one[3] -= 1.6 + 0.16  # about the same total gain, all on one probe, the others a hair worse
    assert not lower_beyond_noise(one, reference)
    assert not lower_beyond_noise(reference + 0.1, reference)


def test_held_out_rows_follow_the_chunks():
    from rebasin.calibrate import Teacher

    t = Teacher.__new__(Teacher)
    t.probes, t.chunk = Probes({"input_ids": torch.zeros(10, 2, dtype=torch.long)}, "test"), 3
    assert t.rows([1, 3]).tolist() == [3, 4, 5, 9]


def test_verdict_line_says_when_alpha_was_lowered_within_noise():
    from rebasin.calibrate import _verdict

    verdict, line = _verdict(0.4, 0.3, 0.0, "auto", minimum=(0.8, 0.5))
    assert verdict == "carries over"
    assert line == ("carries over: α = 0.40, KL −30% (lowered within the probes' noise from the minimum at "
                    "α = 0.80, KL −50%)")
    verdict, line = _verdict(0.0, 0.0, None, "auto", minimum=(0.3, 0.2))
    assert verdict == "does not carry over" and "the minimum at α = 0.30 (KL −20%) is within the probes' noise" in line
    verdict, line = _verdict(0.5, 0.07, None, "auto", minimum=(0.8, 0.12))  # lowered below the 10% threshold
    assert verdict == "does not carry over"
    assert "the minimum at α = 0.80 (KL −12%) is within the probes' noise of α = 0.50 (KL −7%)" in line
    assert _verdict(0.8, 0.5, 0.0, "auto")[1] == "carries over: α = 0.80, KL −50%"  # control: not lowered


def test_search_reports_a_minimum_at_the_top_end_without_extending():
    from rebasin.calibrate import ALPHA_MAX, _search, carries_over

    curve: dict[float, float] = {}

    def f(a: float) -> float:
        curve.setdefault(a, 1.0 - 0.3 * a)  # still falling at ALPHA_MAX: imitation by amplification
        return curve[a]

    _search(f, curve)
    assert max(curve) == ALPHA_MAX and min(curve, key=curve.get) == ALPHA_MAX
    assert not carries_over(0.6, 0.0, ALPHA_MAX) and carries_over(0.6, 0.0, ALPHA_MAX - 0.5)


def test_the_sampler_draws_from_the_softmax():
    """The inverse-CDF sampler used for probe sequences: exact temperature-1 sampling, seeded."""
    from rebasin.probes import _InverseCdfSampler

    scores = torch.tensor([[2.0, 0.0, -1.0, 1.0, -torch.inf]]).repeat(20000, 1)
    picks = _InverseCdfSampler(torch.Generator().manual_seed(0))(None, scores.clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / len(picks)
    p = torch.softmax(scores[0].double(), -1)
    assert freq[4] == 0 and torch.allclose(freq, p, atol=0.012), (freq, p)
    uniform = torch.full((5,), 0.2, dtype=torch.float64)
    assert not torch.allclose(freq, uniform, atol=0.012)  # control: the check tells distributions apart
    again = _InverseCdfSampler(torch.Generator().manual_seed(0))(None, scores.clone()).argmax(-1)
    assert torch.equal(picks, again)


def test_null_model_is_skipped_only_when_it_cannot_change_the_verdict(planted):
    c = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", perms=None, alpha="auto",
                  probe_count=8, probe_length=16)
    assert c.verdict == "carries over" and c.kl_null is not None and c.null_reduction < c.reduction
    u = calibrate(planted / "A", planted / "Aft", planted / "C", "llama", perms=None, alpha="auto",
                  probe_count=8, probe_length=16)
    if u.reduction < 0.1:
        assert u.kl_null is None and u.verdict == "does not carry over"
    assert set(c.phases) == {"load", "probes", "teacher", "base", "search", "null"}


def test_null_model_stops_once_its_answer_is_clear(planted, monkeypatch):
    """A given α measures every probe; the planted u loses its gain under a random symmetry by far, so the
    null stops at half the probes (its floor), with the verdict and a reduction near the one every
    probe gives (control: CLEAR_Z = ∞ measures all)."""
    import rebasin.calibrate as cal

    opts = {"perms": None, "alpha": 0.5, "probe_count": 16, "probe_length": 16}
    c = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", **opts)
    monkeypatch.setattr(cal, "CLEAR_Z", math.inf)
    full = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", **opts)
    assert (c.measured, c.null_probes, full.null_probes) == (16, 8, 16), (c, full)
    assert c.verdict == full.verdict == "carries over"
    assert c.null_reduction < 0.5 * c.reduction and abs(c.null_reduction - full.null_reduction) < 0.5 * c.reduction
    assert c.kl_null == pytest.approx(c.kl_base * (1 - c.null_reduction))


def test_a_null_model_open_on_half_the_probes_measures_them_all(planted, monkeypatch):
    """When half the probes settle α but not the null model's answer, every probe is measured, α is
    chosen again, and the null resumes where it stopped (control: the same run without the forced
    doubt stops at half)."""
    import rebasin.calibrate as cal

    real, calls = cal._null_model, []

    def doubtful(*args, **kwargs):
        reduction, sums, clear = real(*args, **kwargs)
        calls.append((len(args[6]), len(kwargs["done"])))
        return reduction, sums, clear and len(args[6]) == 4  # "open" on the half (2 of 4 chunks)
    opts = {"perms": None, "alpha": "auto", "probe_count": 16, "probe_length": 16}
    half = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", **opts)
    monkeypatch.setattr(cal, "_null_model", doubtful)
    c = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", **opts)
    assert (half.measured, c.measured) == (8, 16) and calls == [(2, 0), (4, 2)], (calls, half, c)
    assert c.verdict == half.verdict == "carries over" and c.null_probes >= 8


def test_null_model_refuses_a_gain_every_symmetry_keeps(planted, tmp_path):
    """A fine-tune that adds one constant to every norm weight: any re-ordering of it is the same, so the gain
    says nothing about alignment and the verdict is "does not carry over" (the planted u carries over)."""
    sa = load_file(planted / "A" / "model.safetensors")
    save_like(tmp_path / "Aft", {k: v + 0.5 if k.endswith("norm.weight") else v for k, v in sa.items()},
              planted / "A")
    c = calibrate(planted / "A", tmp_path / "Aft", planted / "A", "llama", perms=None, alpha="auto",
                  probe_count=8, probe_length=16)
    assert c.reduction == 0 and c.alpha == 0 and c.verdict == "does not carry over", c
    found = 1 - min(d for _, d in c.curve) / c.kl_base  # the gain the search found, before the verdict
    assert found > 0.5 and c.null_reduction is not None and c.null_reduction > 0.9 * found, c
    assert "a randomly re-ordered task vector" in c.line


def test_sampled_probes_ignore_the_models_generation_defaults():
    """Probes come from the fine-tune's own distribution: a repetition penalty or top-k in its
    generation_config.json must not shape them (and the model keeps its config)."""
    from transformers import GenerationConfig

    model = CASES["llama"].build()
    plain = make_probes(model, count=4, length=12, seed=3).inputs["input_ids"]
    eos = model.generation_config.eos_token_id
    custom = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, repetition_penalty=5.0, eos_token_id=eos)
    model.generation_config = custom
    shaped = make_probes(model, count=4, length=12, seed=3).inputs["input_ids"]
    assert torch.equal(plain, shaped) and model.generation_config is custom
    out = model.generate(input_ids=plain[:, :1], attention_mask=torch.ones_like(plain[:, :1]), max_new_tokens=11,
                         min_new_tokens=11, pad_token_id=0)
    assert not torch.equal(out, plain)  # control: the defaults do change what generate() draws


def test_an_output_of_alpha_zero_says_so(planted, tmp_path, capsys):
    """Diff mode onto a re-ordered base writes B (α = 0); the terminal and report.md say so instead of
    counting B's tensors as "unchanged (zero task vector there …)"."""
    out = tmp_path / "out"
    assert main(_diff_transfer(planted, "Bp", out)) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["alpha"] == 0 and rep["calibration"]["verdict"] == "does not carry over"
    assert "try --mode rebasin" in printed
    for text in (printed, (out / "report.md").read_text()):
        assert "the task vector scaled by 0" in text and "zero task vector there" not in text


@pytest.mark.parametrize("clear_z", [None, math.inf])
def test_calibration_benchmark_counts_the_token_forwards_run(planted, monkeypatch, clear_z):
    """The calibration benchmark's floor (``benchmarks.bench_calibration._floor``) counts the tokens the
    model's forwards ran: sampler steps, every α evaluated, the null model, as a hook on the decoder
    counts them; on half the probes (default) and on all (CLEAR_Z = ∞: another count, the control).
    Its GEMM seconds are the sampler's steps at ``count`` rows and the chunks at 4 probes × 16 tokens."""
    from transformers.models.llama import modeling_llama

    import benchmarks.bench_calibration as bench
    import rebasin.calibrate as cal

    if clear_z is not None:
        monkeypatch.setattr(cal, "CLEAR_Z", clear_z)
    seen = []
    real = modeling_llama.LlamaModel.forward

    def counting(self, input_ids=None, *args, **kwargs):
        seen.append(input_ids.numel())
        return real(self, input_ids, *args, **kwargs)
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counting)
    c = calibrate(planted / "A", planted / "Aft", planted / "B", "llama", perms=None, alpha="auto",
                  probe_count=16, probe_length=16)
    monkeypatch.setattr(bench, "_gemm_seconds", lambda shapes, rows, dtype: 1e-4 * rows ** 2)
    floor = bench._floor(c, planted / "B")
    assert c.null_probes is not None and c.measured == (16 if clear_z else 8)
    assert floor["token_forwards"] == sum(seen) and floor["sampled_tokens"] == 16 * 16
    sampled, evaluated = 16 * 16, sum(seen) - 16 * 16  # 16 steps of 16 rows; chunks of 64 tokens
    assert floor["gemm_floor_s"] == round(1e-4 * (sampled * 16 + evaluated * 64), 2)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_calibration_benchmark_gemm_shapes_are_the_modules_linear_layers(tmp_path, case):
    """Untied (Llama: its own head) and tied (Qwen2: the embedding is the head) checkpoints."""
    from benchmarks.bench_calibration import _gemm_shapes
    from rebasin.io.checkpoint import open_checkpoint

    model = CASES[case].build()
    model.save_pretrained(tmp_path)
    tensors = open_checkpoint(tmp_path).tensors
    assert any(n.endswith("lm_head.weight") for n in tensors) == (case == "llama")
    linear = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(_gemm_shapes(tensors)) == sorted(linear)
