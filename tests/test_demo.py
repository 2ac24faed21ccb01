"""``rebasin demo`` at the tiny preset: artifacts, the printed table, and the transfer arithmetic it reports."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("transformers")

from rebasin.demo import KIND_TEXT, format_demo, run_demo_pipeline
from rebasin.io.checkpoint import open_checkpoint
from rebasin.toy import KINDS

METHODS = {"diff α=1", "rebasin α=1", "diff auto", "rebasin auto"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    try:
        res = run_demo_pipeline(root / "out", root / "cache", seed=0, preset="tiny", progress=False, log=lines.append)
    finally:
        torch.set_num_threads(before)
    return root, res, lines


def test_artifacts(demo):
    root, res, lines = demo
    out = root / "out"
    assert res.files == ["results.json", "results.md", "results.png"]
    for f in res.files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert data["preset"] == "tiny" and list(data["kinds"]) == list(KINDS)
    for kind in KINDS:
        assert {r["method"] for r in data["kinds"][kind]["rows"]} == METHODS
        assert (out / "transfers" / f"{kind}-rebasin-a1" / "permutations.safetensors").is_file()
    assert lines and lines[0].startswith("models:")  # progress is reported from the start


def test_table_and_verdicts(demo):
    _, res, _ = demo
    text, md = format_demo(res), (res.output / "results.md").read_text()
    for kind in KINDS:
        assert KIND_TEXT[kind] in text and KIND_TEXT[kind] in md
        k = res.kinds[kind]
        for row in k["rows"]:
            if "error" in row:  # calibration not available in this build: the row says so
                continue
            assert set(row["metrics"]) == {"sub", "general"} and row["recovered"] is not None
            if isinstance(row["alpha_requested"], str):
                assert row["calibration"]["verdict"] in ("carries over", "does not carry over")
                assert row["calibration"]["line"] in text
        assert set(k["merges"]) == {"plain", "aligned"}
    for name in ("B (new base)", "B_ft", "½(π(A) + B)", "½(A + B)"):
        assert name in text and name in md
    # (b) is a symmetry of (a): rebasin finds it, so its results match (a)'s
    rows = {kind: {r["method"]: r for r in res.kinds[kind]["rows"]} for kind in ("continued", "permuted")}
    assert rows["permuted"]["rebasin α=1"]["metrics"]["sub"] == pytest.approx(
        rows["continued"]["rebasin α=1"]["metrics"]["sub"], rel=1e-4)
    assert res.kinds["permuted"]["merges"]["aligned"] == pytest.approx(res.kinds["continued"]["merges"]["aligned"],
                                                                       rel=1e-4)


def _models(res, kind):
    d = res.kinds[kind]
    return (open_checkpoint(p) for p in (res.results["models"]["A"], res.results["models"]["A_ft"], d["B"]))


def test_diff_mode_is_b_plus_task_vector(demo):
    _, res, _ = demo
    a, aft, b = _models(res, "independent")
    out = open_checkpoint(res.output / "transfers" / "independent-diff-a1")
    assert set(out.keys()) == set(b.keys())
    moved = 0
    for name in b.tensors:
        expect = b.get(name) + (aft.get(name) - a.get(name))
        torch.testing.assert_close(out.get(name), expect, rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(aft.get(name), a.get(name)))
    assert moved > 0


def test_rebasin_mode_permutes_the_task_vector(demo):
    from rebasin.io.perms_file import load_perms
    from rebasin.model import open_model
    from rebasin.permutation import permute_tensor

    _, res, _ = demo
    spec = open_model(res.results["models"]["A"]).spec
    a, aft, b = _models(res, "permuted")
    pdir = res.output / "transfers" / "permuted-rebasin-a1"
    perms, _ = load_perms(pdir / "permutations.safetensors")
    out = open_checkpoint(pdir)
    for name in b.tensors:
        delta = aft.get(name) - a.get(name)
        if name in spec.axes:
            delta = permute_tensor(spec, name, delta, perms)
        torch.testing.assert_close(out.get(name), b.get(name) + delta, rtol=0, atol=1e-6, msg=name)
