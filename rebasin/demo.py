"""``rebasin demo``: an end-to-end run on small ViTs trained here, nothing downloaded.

The story, on scikit-learn's 8×8 ``load_digits`` (fixed stratified train/test split):

- **A** (old base) and **B** (new base): the same tiny ``ViTForImageClassification``,
  trained independently (different init and data order: seeds ``seed`` and ``seed + 1``)
  on the digits.
- **A_ft**: A fine-tuned briefly (small learning rate, few epochs) on a domain shift the
  bases do poorly on: every image shifted one pixel to the right (``SHIFT``) — the sub-task.
- **B_ft**: B fine-tuned the same way — the upper bound a transfer can hope for.

The fine-tune is then moved from A to B through the public API
(:func:`rebasin.transfer.transfer`) in ``diff`` mode (``B + α(A_ft − A)``) and ``rebasin``
mode (``B + α·π(A_ft − A)``), and every model is evaluated on the shifted test images
(the sub-task) and on the original ones. Because A and B were
trained independently, their hidden units are in unrelated orders: diff mode adds the
task vector in the wrong coordinates, rebasin mode first permutes it into B's.

The four models are cached as Hugging Face model directories (safetensors) under
``--cache`` (default ``$REBASIN_CACHE/demo``, else ``~/.cache/rebasin/demo``), keyed by a
version string and every hyperparameter, each written atomically. The output folder
gets ``results.json``, ``results.md``, ``results.png`` and the transferred models under
``transfers/``. Every number is measured on the run that writes it.

Pixel convention of the saved models: ``pixel_values = image / 8 − 1`` (digits' 0..16
intensities mapped to [−1, 1]), shape ``(N, 1, 8, 8)``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = "rebasin-demo-1"
SHIFT = 1  # the sub-task: images rolled this many pixels to the right
PIXEL_SCALE = 8.0  # pixel_values = image / PIXEL_SCALE - 1


@dataclass(frozen=True)
class DemoConfig:
    """Every hyperparameter of the demo (all of them enter the cache key)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    patch: int = 4
    base_epochs: int = 30
    base_lr: float = 1e-3
    base_wd: float = 0.05
    ft_epochs: int = 5
    ft_lr: float = 1e-4
    batch: int = 64
    test_size: float = 0.3
    split_seed: int = 0
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)

    def vit_config(self) -> Any:
        import transformers

        return transformers.ViTConfig(
            image_size=8, patch_size=self.patch, num_channels=1, hidden_size=self.hidden,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=self.mlp_ratio * self.hidden, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})


FULL = DemoConfig()
QUICK = DemoConfig(hidden=32, layers=2, heads=4, base_epochs=6, base_lr=3e-3, ft_epochs=2, ft_lr=3e-4, batch=128)


@dataclass
class Data:
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    xs_train: Any  # shifted (sub-task) images
    xs_test: Any


@dataclass
class DemoResult:
    output: Path
    rows: list[dict[str, Any]]
    results: dict[str, Any]
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def load_data(cfg: DemoConfig) -> Data:
    """scikit-learn's digits (bundled with scikit-learn: nothing is downloaded), fixed split."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / PIXEL_SCALE - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=cfg.test_size, random_state=cfg.split_seed,
                              stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return Data(x[tr], y[tr], x[te], y[te], shift(x[tr]), shift(x[te]))


def shift(x: Any) -> Any:
    """The sub-task's domain shift: roll the images SHIFT pixels right (digits' borders are blank)."""
    import torch

    return torch.roll(x, SHIFT, dims=-1)


# --------------------------------------------------------------------------- training


def train(model: Any, x: Any, y: Any, *, epochs: int, lr: float, wd: float, batch: int, seed: int,
          desc: str, progress: bool, schedule: bool = True) -> Any:
    """AdamW (+ linear warm-up and cosine decay when ``schedule``), cross-entropy, in place."""
    import math

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    per_epoch = math.ceil(len(y) / batch)
    total, warm = epochs * per_epoch, max(1, epochs * per_epoch // 10)

    def factor(step: int) -> float:
        if not schedule:
            return 1.0
        return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=True)
    for _ in bar:
        order = torch.randperm(len(y), generator=g)
        run = 0.0
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{run / len(y):.3f}")
    model.eval()
    return model


@contextlib.contextmanager
def _atomic_dir(dest: Path):
    """Yield a temporary directory beside ``dest``, renamed to ``dest`` when the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():  # another process finished the same model first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_key(cfg: DemoConfig, seed: int) -> str:
    blob = json.dumps({"version": VERSION, "seed": seed, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache() -> Path:
    root = os.environ.get("REBASIN_CACHE")
    return Path(root) / "demo" if root else Path.home() / ".cache" / "rebasin" / "demo"


def build_models(cfg: DemoConfig, data: Data, cache: Path, seed: int, progress: bool = True,
                 log: Any = print) -> tuple[dict[str, Path], dict[str, float]]:
    """Train (or load from the cache) A, B, A_ft, B_ft; return their directories and timings."""
    import torch
    import transformers

    folder = cache / f"{cfg.hidden}h{cfg.layers}l-seed{seed}-{cache_key(cfg, seed)}"
    dirs = {name: folder / name for name in ("A", "B", "A_ft", "B_ft")}
    timings: dict[str, float] = {}
    bases = {"A": seed, "B": seed + 1}
    for name, s in bases.items():
        if (dirs[name] / "config.json").exists():
            continue
        t0 = time.perf_counter()
        torch.manual_seed(s)
        model = transformers.ViTForImageClassification(cfg.vit_config())
        train(model, data.x_train, data.y_train, epochs=cfg.base_epochs, lr=cfg.base_lr,
              wd=cfg.base_wd, batch=cfg.batch, seed=s, desc=f"train base {name} (seed {s})", progress=progress)
        _save(model, dirs[name], cfg, seed, {"role": f"base {name}", "init_seed": s, "data": "digits"})
        timings[f"train_{name}"] = time.perf_counter() - t0
    for name in ("A", "B"):
        ft = f"{name}_ft"
        if (dirs[ft] / "config.json").exists():
            continue
        t0 = time.perf_counter()
        model = transformers.ViTForImageClassification.from_pretrained(dirs[name]).eval()
        train(model, data.xs_train, data.y_train, epochs=cfg.ft_epochs, lr=cfg.ft_lr, wd=0.0, batch=cfg.batch,
              seed=seed + 1000, desc=f"fine-tune {name} -> {ft} (shifted digits)", progress=progress,
              schedule=False)
        _save(model, dirs[ft], cfg, seed, {"role": f"fine-tune of {name}", "data": f"digits rolled {SHIFT} px right"})
        timings[f"train_{ft}"] = time.perf_counter() - t0
    if not timings:
        log(f"models loaded from the cache: {folder}")
    return dirs, timings


def _save(model: Any, dest: Path, cfg: DemoConfig, seed: int, meta: dict[str, Any]) -> None:
    with _atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "rebasin_demo.json").write_text(json.dumps(
            {"version": VERSION, "seed": seed, "config": asdict(cfg), **meta}, indent=2) + "\n")


# --------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, data: Data) -> dict[str, float]:
    """Test accuracy on the shifted images (the sub-task) and the original ones."""
    import torch
    import transformers

    model = transformers.ViTForImageClassification.from_pretrained(model_dir).eval()
    out = {}
    with torch.no_grad():
        for key, x in (("sub", data.xs_test), ("orig", data.x_test)):
            out[key] = float((model(pixel_values=x).logits.argmax(-1) == data.y_test).float().mean())
    return out


# --------------------------------------------------------------------------- pipeline


def run_demo_pipeline(output: str | Path, cache: str | Path | None = None, seed: int = 0, *,
                      quick: bool = False, config: DemoConfig | None = None, progress: bool = True,
                      log: Any = print) -> DemoResult:
    """Build/load the models, transfer in both modes, evaluate, and write the artifacts."""
    import torch
    import transformers

    from rebasin.transfer import transfer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    cfg = config or (QUICK if quick else FULL)
    output = Path(output)
    cache = Path(cache) if cache is not None else default_cache()
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_data(cfg)
    dirs, timings = build_models(cfg, data, cache, seed, progress=progress, log=log)

    output.mkdir(parents=True, exist_ok=True)
    tdir = output / "transfers"
    transfers: dict[str, dict[str, Any]] = {}
    perms_file: Path | None = None
    match_info: dict[str, Any] | None = None
    for mode in ("rebasin", "diff"):
        for alpha in sorted(cfg.alphas, key=lambda a: (a != 1.0, a)):  # α = 1 first: it runs the match
            name = f"{mode}-a{alpha:g}"
            t0 = time.perf_counter()
            res = transfer(old_base=dirs["A"], finetuned=dirs["A_ft"], new_base=dirs["B"], output=tdir / name,
                           mode=mode, alpha=alpha, overwrite=True, progress=progress,
                           perms=perms_file if mode == "rebasin" else None)
            timings[f"transfer_{name}"] = time.perf_counter() - t0
            if mode == "rebasin" and perms_file is None:
                perms_file = Path(res.output) / "permutations.safetensors"
                m = res.report.get("match") or {}
                match_info = {k: m.get(k) for k in ("objective_identity", "objective", "sweeps", "solver")
                              if k in m}
            transfers[name] = {"mode": mode, "alpha": alpha, "dir": Path(res.output)}

    # Alignment check: weight averaging of the two bases, without and with π (git-re-basin's
    # classic test: a midpoint of unaligned models breaks, a midpoint of aligned ones works).
    from rebasin.apply import apply_checkpoint
    from rebasin.model import open_model
    from rebasin.permutation import load_perms

    t0 = time.perf_counter()
    aligned = apply_checkpoint(open_model(dirs["A"]), load_perms(perms_file)[0], tdir / "A-aligned",
                               overwrite=True, progress=False)
    merges = {}
    for name, src in (("merge-identity", dirs["A"]), ("merge-aligned", aligned)):
        merges[name] = transfer(old_base=dirs["B"], finetuned=src, new_base=dirs["B"], output=tdir / name,
                                mode="diff", alpha=0.5, overwrite=True, progress=False).output
    timings["merges"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def add(label: str, kind: str, path: Path, mode: str | None = None, alpha: float | None = None) -> None:
        rows.append({"model": label, "kind": kind, "mode": mode, "alpha": alpha, "path": str(path),
                     "accuracy": evaluate(path, data)})

    add("B (new base)", "base", dirs["B"])
    for a in sorted(cfg.alphas):
        add(f"B + {a:g}·(A_ft − A)   [diff]", "transfer", transfers[f"diff-a{a:g}"]["dir"], "diff", a)
    for a in sorted(cfg.alphas):
        add(f"B + {a:g}·π(A_ft − A)  [rebasin]", "transfer", transfers[f"rebasin-a{a:g}"]["dir"], "rebasin", a)
    add("B_ft (upper bound)", "reference", dirs["B_ft"])
    add("A (old base)", "reference", dirs["A"])
    add("A_ft (the fine-tune)", "reference", dirs["A_ft"])
    add("½(A + B)     [merge, no π]", "alignment", merges["merge-identity"])
    add("½(π(A) + B)  [merge, aligned]", "alignment", merges["merge-aligned"])
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    results = {
        "version": VERSION, "seed": seed, "quick": quick, "config": asdict(cfg), "cache": str(dirs["A"].parent),
        "task": {"bases": f"digits (A: seed {seed}, B: seed {seed + 1}, trained independently)",
                 "fine_tune": f"digits rolled {SHIFT} pixel(s) to the right (domain shift)",
                 "columns": {"sub": f"test accuracy on the shifted test images ({len(data.y_test)}) - the sub-task",
                             "orig": f"test accuracy on the original test images ({len(data.y_test)})"}},
        "match": match_info, "rows": rows, "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "params": sum(p.numel() for p in transformers.ViTForImageClassification(cfg.vit_config()).parameters()),
    }
    files = _write_artifacts(output, results)
    return DemoResult(output, rows, results, files)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ("model", "shifted (sub-task)", "original")
    body = [(r["model"], *(f"{100 * r['accuracy'][k]:.1f}%" for k in ("sub", "orig"))) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 2) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines)
    w = [max(len(str(r[i])) for r in (head, *body)) for i in range(3)]
    fmt = lambda r: "  ".join(str(c).ljust(w[0]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * x for x in w), *map(fmt, body)])


def _write_artifacts(output: Path, results: dict[str, Any]) -> list[str]:
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plotted = _plot(output / "results.png", results["rows"])
    cfg, m = results["config"], results.get("match") or {}
    md = [
        "# rebasin demo", "",
        f"Two tiny ViTs (hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
        f"{results['params']:,} parameters) trained independently on scikit-learn digits "
        f"(A: seed {results['seed']}, B: seed {results['seed'] + 1}); A_ft = A fine-tuned "
        f"({cfg['ft_epochs']} epochs, lr {cfg['ft_lr']:g}) on the digits shifted {SHIFT} pixel right, "
        "a domain shift both bases do poorly on; B_ft = B fine-tuned the same way (the upper bound).",
        "The fine-tune is moved to B in diff mode, B + α(A_ft − A), and rebasin mode, B + α·π(A_ft − A).",
        "Test accuracy (measured by this run):", "",
        format_table(results["rows"], markdown=True), "",
    ]
    if m:
        md.append(f"Weight matching A → B: alignment objective {m.get('objective_identity', float('nan')):.6g} "
                  f"(identity) → {m.get('objective', float('nan')):.6g} (matched).")
        md.append("")
    if plotted:
        md += ["![accuracies](results.png)", ""]
    md.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in results["timings_s"].items()))
    (output / "results.md").write_text("\n".join(md) + "\n")
    return ["results.json", "results.md"] + (["results.png"] if plotted else [])


def _plot(path: Path, rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    labels = [r["model"].replace("   [", "\n[").replace("  [", "\n[") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.35 * len(rows)), 4.6))
    for j, (key, name) in enumerate((("sub", "shifted digits (sub-task)"), ("orig", "original digits"))):
        vals = [100 * r["accuracy"][key] for r in rows]
        bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=name, color=("#d62728", "#7f7f7f")[j])
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Moving a fine-tune (shifted digits) from base A to an independently trained base B")
    ax.legend(loc="upper center", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin demo``; ``REBASIN_DEMO_QUICK=1`` runs the reduced size."""
    quick = os.environ.get("REBASIN_DEMO_QUICK", "") not in ("", "0")
    res = run_demo_pipeline(args.output, getattr(args, "cache", None), getattr(args, "seed", 0), quick=quick)
    r = res.results
    print()
    print("Bases A, B: independent seeds; A_ft: A fine-tuned on shifted digits. Test accuracy:")
    print(format_table(res.rows))
    if r.get("match"):
        m = r["match"]
        print(f"\nweight matching A -> B: objective {m.get('objective_identity', float('nan')):.6g} (identity) -> "
              f"{m.get('objective', float('nan')):.6g} (matched)")
    print(f"\nwrote {', '.join(str(res.output / f) for f in res.files)} (transferred models in "
          f"{res.output / 'transfers'}); total {r['timings_s']['total']:.0f} s")
    return 0


__all__ = ["FULL", "QUICK", "DemoConfig", "DemoResult", "build_models", "evaluate", "format_table", "load_data",
           "run_demo", "run_demo_pipeline"]
