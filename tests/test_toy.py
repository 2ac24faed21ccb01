"""rebasin.toy at the tiny preset: data determinism, the pair builder (kind (b) is a symmetry), caching, evaluation."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from rebasin.toy import KINDS, build_pair_set, recipe
from rebasin.toy.cache import cache_root, is_complete, key, read_meta
from rebasin.toy.evaluate import evaluate, gain_recovered, merge, outputs
from rebasin.toy.families import new_model, toy_task
from rebasin.toy.text import MASK_ID, VOCAB, decode, encode, eval_windows, mask_tokens, random_windows, stdlib_corpus


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")


@pytest.fixture(scope="module")
def llama_pairs(cache):
    return build_pair_set(recipe("llama", "tiny"), 0, cache=cache)


# --------------------------------------------------------------------------- data


def test_corpus_domains_and_tokens():
    c = stdlib_corpus(recipe("llama", "tiny").corpus_chars)
    for task in ("general", "sub"):
        for split in ("train", "test"):
            s = c.stream(task, split)
            assert s.dtype == torch.int64 and len(s) > 1000
            assert int(s.min()) > MASK_ID and int(s.max()) < VOCAB
    prose, code = decode(c.general_train[:20_000]), decode(c.sub_train[:20_000])
    assert code.count("def ") + code.count("self.") > 5 * (prose.count("def ") + prose.count("self.") + 1)
    assert decode(encode("héllo\n")) == "h?llo\n"


def test_data_is_deterministic_per_seed():
    task = toy_task(recipe("bert", "tiny"))
    b1 = task.batch("sub", torch.Generator().manual_seed(3))
    b2 = task.batch("sub", torch.Generator().manual_seed(3))
    b3 = task.batch("sub", torch.Generator().manual_seed(4))
    assert b1.keys() == {"input_ids", "labels"}
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert not torch.equal(b1["input_ids"], b3["input_ids"])
    # the corpus itself: rebuilt from scratch, the same bytes
    r = recipe("llama", "tiny")
    fresh = stdlib_corpus.__wrapped__(r.corpus_chars)
    assert fresh.digest == stdlib_corpus(r.corpus_chars).digest
    vit = toy_task(recipe("vit", "tiny"))
    v1, v2 = (vit.batch("sub", torch.Generator().manual_seed(0)) for _ in range(2))
    assert torch.equal(v1["pixel_values"], v2["pixel_values"]) and v1["pixel_values"].shape[1:] == (1, 8, 8)
    assert torch.equal(vit.digits.images("sub", "test"), torch.roll(vit.digits.images("general", "test"), 1, -1))


def test_windows_and_masks():
    stream = torch.arange(1000)
    w = random_windows(stream, 4, 16, torch.Generator().manual_seed(0))
    assert w.shape == (4, 16) and torch.equal(w[:, 1:] - w[:, :-1], torch.ones(4, 15, dtype=torch.long))
    e = eval_windows(stream, 5, 16)
    assert torch.equal(e, eval_windows(stream, 5, 16)) and e.shape == (5, 16)
    ids = torch.randint(32, 127, (8, 64), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, 0.15, torch.Generator().manual_seed(1))
    picked = labels != -100
    assert picked.any(dim=1).all()
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(inputs[~picked], ids[~picked])
    assert (inputs[picked] == MASK_ID).float().mean() > 0.5


# --------------------------------------------------------------------------- pairs and cache


def test_pair_set_layout_and_cache(llama_pairs, cache):
    ps = llama_pairs
    assert set(ps.B) == set(ps.B_ft) == set(KINDS)
    dirs = [ps.A, ps.A_ft, *ps.B.values(), *ps.B_ft.values()]
    assert len(set(dirs)) == len(dirs) and all(is_complete(d) for d in dirs)
    assert all(d.parent == cache / "llama" for d in dirs)
    assert read_meta(ps.A)["recipe"] == ps.recipe.shared_params()
    again = build_pair_set(ps.recipe, 0, cache=cache)
    assert again.timings == {} and again.A == ps.A and again.B == ps.B
    other = build_pair_set(ps.recipe.scaled(ft_lr=ps.recipe.ft_lr * 2), 0, cache=cache, kinds=("continued",))
    assert other.A == ps.A and other.A_ft != ps.A_ft and set(other.timings) == {"A_ft", "B_continued_ft"}


def test_cache_key_and_root(monkeypatch, tmp_path):
    assert key({"a": 1, "b": 2}) == key({"b": 2, "a": 1}) != key({"a": 1, "b": 3})
    monkeypatch.setenv("REBASIN_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "toy" and cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_permuted_kind_is_a_symmetry(family, llama_pairs, cache):
    ps = llama_pairs if family == "llama" else build_pair_set(recipe(family, "tiny"), 0, cache=cache,
                                                               kinds=("permuted",))
    r = ps.recipe
    for b_dir, a_dir in ((ps.B["permuted"], ps.B.get("continued")), (ps.B_ft["permuted"], ps.B_ft.get("continued"))):
        if a_dir is None:  # only (b) was asked for: (a)'s directories are its parents in the cache
            a_dir = next(p for p in (cache / family).iterdir()
                         if p.name.startswith("B_continued" + ("_ft-" if "ft" in b_dir.name else "-")))
        y_a, y_b = outputs(r, a_dir), outputs(r, b_dir)
        torch.testing.assert_close(y_b, y_a, rtol=1e-5, atol=1e-5 * float(y_a.abs().max()))
    from rebasin.io.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a_dir), open_checkpoint(b_dir)
    assert any(not torch.equal(ca.get(n), cb.get(n)) for n in ca.tensors)  # the weights really moved


# --------------------------------------------------------------------------- evaluation


def test_evaluate_and_gain(llama_pairs):
    ps, r = llama_pairs, llama_pairs.recipe
    m = evaluate(r, ps.A)
    assert set(m) == {"sub", "general"} and all(0.0 < v < 10.0 for v in m.values())
    assert evaluate(r, ps.A) == m  # the held-out sets are fixed
    fresh = evaluate(r, new_model(r, 0))
    assert abs(fresh["general"] - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5  # untrained ≈ uniform
    assert gain_recovered(r, 2.0, 1.5, 1.0) == pytest.approx(0.5)
    assert gain_recovered(r, 0.5, 0.8, 0.9) == pytest.approx(0.75)
    assert gain_recovered(r, 1.0, 0.5, 1.0) is None
    vit = recipe("vit", "tiny")
    acc = evaluate(vit, new_model(vit, 0))
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_merge(llama_pairs):
    ps, r = llama_pairs, llama_pairs.recipe
    b = ps.B["continued"]
    torch.testing.assert_close(outputs(r, merge(r, ps.A, b, weight=0.0)), outputs(r, b))
    torch.testing.assert_close(outputs(r, merge(r, ps.A, b, weight=1.0)), outputs(r, ps.A), rtol=1e-5, atol=1e-5)
    perms = ps.planted
    torch.testing.assert_close(outputs(r, merge(r, ps.B["continued"], ps.B["permuted"], perms, weight=0.5)),
                               outputs(r, ps.B["permuted"]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_replay_batches_mix_in_general_rows(family):
    task = toy_task(recipe(family, "tiny"))
    n = task.recipe.batch
    mixed = task.batch("sub", torch.Generator().manual_seed(3), replay=0.5)
    g = torch.Generator().manual_seed(3)
    own, general = task._rows("sub", n - n // 2, g), task._rows("general", n // 2, g)
    for k, v in mixed.items():
        assert v.shape[0] == n and torch.equal(v, torch.cat([own[k], general[k]]))
    plain = task.batch("sub", torch.Generator().manual_seed(3))
    assert not torch.equal(plain[next(iter(plain))], mixed[next(iter(mixed))])


def test_probe_budget_is_the_large_model_shape():
    """The study's probe-budget methods calibrate small models with the ≥100M default shape (and half its
    probes): 64 × 16 tokens for text, 128 images for image classifiers — what calibrate would pick itself
    at LARGE_PARAMS; a smaller model's own default differs (the control)."""
    from rebasin.calibrate import LARGE_PARAMS, probe_shape
    from rebasin.toy.transfers import BUDGET, probe_budget

    text = {"architectures": ["LlamaForCausalLM"]}
    vit = {"architectures": ["ViTForImageClassification"]}
    assert probe_budget("≥100M probes", text) == {"probe_count": 64, "probe_length": 16}
    assert probe_budget("half ≥100M probes", text) == {"probe_count": 32, "probe_length": 16}
    assert probe_budget("≥100M probes", vit)["probe_count"] == 128
    assert probe_budget("half ≥100M probes", vit)["probe_count"] == 64
    assert probe_shape(LARGE_PARAMS - 1, config=text) != (64, 16)
    assert [m.name for m in BUDGET] == ["rebasin auto [≥100M probes]", "rebasin auto [half ≥100M probes]"]
