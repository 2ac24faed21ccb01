"""``rebasin demo`` at the reduced (quick) size: artifacts, table, accuracies, diff-mode arithmetic."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from rebasin.demo import QUICK, cache_key, format_table, run_demo_pipeline
from rebasin.io.checkpoint import open_checkpoint

EXPECTED_ROWS = 6 + 2 * len(QUICK.alphas)  # B, diff × α, rebasin × α, B_ft, A, A_ft, 2 merges


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    res = run_demo_pipeline(root / "out", root / "cache", seed=0, quick=True, progress=False, log=lambda *_: None)
    return root, res


def test_artifacts(demo):
    root, res = demo
    out = root / "out"
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["quick"] is True and len(data["rows"]) == EXPECTED_ROWS
    for mode in ("diff", "rebasin"):
        for a in QUICK.alphas:
            assert (out / "transfers" / f"{mode}-a{a:g}" / "config.json").is_file()
    assert (out / "transfers" / "rebasin-a1" / "permutations.safetensors").is_file()
    # the models are cached under a key with the version and every hyperparameter
    cached = [p for p in (root / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and cached[0].name.endswith(cache_key(QUICK, 0))
    assert {p.name for p in cached[0].iterdir()} == {"A", "B", "A_ft", "B_ft"}


def test_table_rows_and_accuracies(demo):
    _, res = demo
    names = [r["model"] for r in res.rows]
    assert names[0].startswith("B (") and any(n.startswith("B_ft") for n in names)
    assert any(n.startswith("A (") for n in names) and any(n.startswith("A_ft") for n in names)
    for mode in ("diff", "rebasin"):
        assert sorted(r["alpha"] for r in res.rows if r["mode"] == mode) == sorted(QUICK.alphas)
    for r in res.rows:
        assert set(r["accuracy"]) == {"sub", "orig"}
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
    text, md = format_table(res.rows), (res.output / "results.md").read_text()
    for n in names:
        assert n in text
        assert n.replace("|", "\\|") in md


def test_diff_mode_is_b_plus_task_vector(demo):
    root, res = demo
    cache = next(p for p in (root / "cache").iterdir() if not p.name.startswith("."))
    a, aft, b = (open_checkpoint(cache / n) for n in ("A", "A_ft", "B"))
    out = open_checkpoint(res.output / "transfers" / "diff-a1")
    assert set(out.keys()) == set(b.keys())
    moved = 0
    for name in b.keys():
        expect = b.get(name) + (aft.get(name) - a.get(name))
        torch.testing.assert_close(out.get(name), expect, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(aft.get(name), a.get(name)))
    assert moved > 0  # the task vector is not empty


def test_rebasin_mode_permutes_the_task_vector(demo):
    """B + π(A_ft − A) with π read from the written permutations file (the rebasin arithmetic)."""
    from rebasin.model import open_model
    from rebasin.permutation import load_perms, permute_tensor

    root, res = demo
    cache = next(p for p in (root / "cache").iterdir() if not p.name.startswith("."))
    a_model = open_model(cache / "A")
    a, aft, b = (open_checkpoint(cache / n) for n in ("A", "A_ft", "B"))
    pdir = res.output / "transfers" / "rebasin-a1"
    perms, _ = load_perms(pdir / "permutations.safetensors")
    out = open_checkpoint(pdir)
    for name in b.keys():
        delta = aft.get(name) - a.get(name)
        if name in a_model.spec.axes:
            delta = permute_tensor(a_model.spec, name, delta, perms)
        torch.testing.assert_close(out.get(name), b.get(name) + delta, rtol=0, atol=1e-6, msg=name)


def test_cached_rerun_reuses_models(demo, tmp_path):
    root, _ = demo
    cache = next(p for p in (root / "cache").iterdir() if not p.name.startswith("."))
    before = {n: (cache / n / "model.safetensors").stat().st_mtime_ns for n in ("A", "B", "A_ft", "B_ft")}
    res = run_demo_pipeline(tmp_path / "out2", root / "cache", seed=0, quick=True, progress=False,
                            log=lambda *_: None)
    after = {n: (cache / n / "model.safetensors").stat().st_mtime_ns for n in before}
    assert before == after
    assert not any(k.startswith("train_") for k in res.results["timings_s"])
