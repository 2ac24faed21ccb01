"""Tiny model families, their tasks and presets: every hyperparameter lives in a :class:`Recipe`.

| family | model | general task (bases) | sub-task (fine-tune) | metric |
|---|---|---|---|---|
| ``llama`` | ``LlamaForCausalLM`` (RoPE, GQA) | next char of stdlib docstrings | of stdlib code | nats/char |
| ``bert`` | ``BertForMaskedLM`` | masked chars of docstrings | of code | nats/masked char |
| ``vit`` | ``ViTForImageClassification`` | digits | digits shifted 1 px right | accuracy |

:class:`ToyTask` binds a recipe to its data: training batches, the training loss and the
held-out evaluation of both tasks (``{"sub": …, "general": …}``).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "bert", "vit")
TASKS = ("general", "sub")
TASK_NAMES = {
    "llama": {"general": "docstrings (prose)", "sub": "Python code"},
    "bert": {"general": "docstrings (prose)", "sub": "Python code"},
    "vit": {"general": "digits", "sub": "digits shifted 1 px"},
}


@dataclass(frozen=True)
class Recipe:
    """Architecture, data and training hyperparameters of one toy family (all enter the cache keys).

    Steps are optimizer steps of ``batch`` sequences of ``seq`` characters (text) or ``batch``
    images (ViT). ``base_*`` trains A (and the independent B) from scratch, ``continue_*`` trains
    A further into the same-lineage B, ``ft_*`` fine-tunes a base on the sub-task; ``ft_replay``
    of each fine-tune batch is general-task data (replay, as fine-tunes that must keep what the
    base could do are trained) and the learning rate decays (``ft_schedule``), so the fine-tunes
    learn the sub-task without forgetting the general one.
    """

    family: str
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 192
    seq: int = 128
    patch: int = 4
    batch: int = 16
    base_steps: int = 600
    base_lr: float = 3e-3
    continue_steps: int = 300
    continue_lr: float = 1.5e-3
    ft_steps: int = 150
    ft_lr: float = 1e-3
    ft_replay: float = 0.75
    ft_schedule: str = "cosine"
    weight_decay: float = 0.01
    warmup: float = 0.05
    mask_rate: float = 0.15
    eval_size: int = 128
    corpus_chars: int = 1_200_000

    @property
    def metric(self) -> str:
        """"loss" (lower is better) for the text families, "accuracy" (higher is better) for ViT."""
        return "accuracy" if self.family == "vit" else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def shared_params(self) -> dict[str, Any]:
        """The hyperparameters every trained model depends on: all but the stage-specific steps and
        learning rates (``base_*``, ``continue_*``, ``ft_*``, which enter the keys of their stages) and
        ``eval_size`` (evaluation only)."""
        return {k: v for k, v in asdict(self).items()
                if not k.startswith(("base_", "continue_", "ft_")) and k != "eval_size"}

    def scaled(self, **changes: Any) -> Recipe:
        return replace(self, **changes)


PRESETS: dict[str, dict[str, Recipe]] = {
    # what the demo and the quality study use
    "full": {
        "llama": Recipe("llama"),
        "bert": Recipe("bert", kv_heads=4, ffn=128, base_lr=2e-3, continue_lr=1e-3, ft_lr=1e-3),
        # ViT replays 90%: at 75% its fine-tunes themselves lost 1.7 accuracy points of the base's task
        "vit": Recipe("vit", hidden=64, heads=4, kv_heads=4, ffn=128, batch=64, base_steps=400, base_lr=2e-3,
                      continue_steps=200, continue_lr=1e-3, ft_steps=40, ft_lr=3e-4, ft_replay=0.9,
                      weight_decay=0.05),
    },
    # `--quick`: smaller and shorter
    "quick": {
        "llama": Recipe("llama", hidden=48, ffn=128, seq=64, base_steps=250, continue_steps=120, ft_steps=80,
                        eval_size=64, corpus_chars=400_000),
        "bert": Recipe("bert", hidden=48, kv_heads=4, ffn=96, seq=64, base_steps=250, continue_steps=120, ft_steps=80,
                       base_lr=2e-3, continue_lr=1e-3, eval_size=64, corpus_chars=400_000),
        "vit": Recipe("vit", hidden=32, kv_heads=4, ffn=64, batch=64, base_steps=200, base_lr=3e-3, continue_steps=100,
                      continue_lr=1e-3, ft_steps=30, ft_lr=3e-4, ft_replay=0.9, weight_decay=0.05),
    },
    # tests: seconds
    "tiny": {
        "llama": Recipe("llama", hidden=16, heads=4, kv_heads=2, ffn=32, seq=32, batch=8, base_steps=12,
                        continue_steps=6, ft_steps=6, eval_size=8, corpus_chars=60_000),
        "bert": Recipe("bert", hidden=16, heads=4, kv_heads=4, ffn=32, seq=32, batch=8, base_steps=12,
                       continue_steps=6, ft_steps=6, eval_size=8, corpus_chars=60_000),
        "vit": Recipe("vit", hidden=16, heads=4, kv_heads=4, ffn=32, batch=32, base_steps=12, continue_steps=6,
                      ft_steps=6, ft_lr=1e-3),
    },
}


def recipe(family: str, preset: str = "full") -> Recipe:
    """The preset recipe of ``family`` ("llama", "bert", "vit") at size ``preset`` ("full", "quick", "tiny")."""
    try:
        return PRESETS[preset][family]
    except KeyError:
        raise ValueError(f"unknown family/preset {family!r}/{preset!r}: families {FAMILIES}, "
                         f"presets {tuple(PRESETS)}") from None


def hf_config(r: Recipe) -> Any:
    """The ``transformers`` config of the recipe's model (dropout off: training is short and deterministic)."""
    import transformers as T

    from rebasin.toy.text import VOCAB

    if r.family == "llama":
        return T.LlamaConfig(vocab_size=VOCAB, hidden_size=r.hidden, num_hidden_layers=r.layers,
                             num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, intermediate_size=r.ffn,
                             max_position_embeddings=r.seq, tie_word_embeddings=False, bos_token_id=None,
                             eos_token_id=None, pad_token_id=None)
    if r.family == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=r.hidden, num_hidden_layers=r.layers,
                            num_attention_heads=r.heads, intermediate_size=r.ffn, max_position_embeddings=r.seq,
                            type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            pad_token_id=None)
    if r.family == "vit":
        return T.ViTConfig(image_size=8, patch_size=r.patch, num_channels=1, hidden_size=r.hidden,
                           num_hidden_layers=r.layers, num_attention_heads=r.heads, intermediate_size=r.ffn,
                           num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    raise ValueError(f"unknown family {r.family!r}; choose from {FAMILIES}")


@functools.cache
def quiet_transformers() -> None:
    """Silence ``transformers``' own progress bars and warnings (our code shows its own progress)."""
    import transformers as T

    T.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()


def model_class(r: Recipe) -> Any:
    import transformers as T

    quiet_transformers()

    return {"llama": T.LlamaForCausalLM, "bert": T.BertForMaskedLM, "vit": T.ViTForImageClassification}[r.family]


def new_model(r: Recipe, seed: int) -> Any:
    """A freshly initialised model (``torch.manual_seed(seed)`` before construction), in train mode."""
    torch.manual_seed(seed)
    return model_class(r)(hf_config(r)).train()


def load_model(r: Recipe, path: Any) -> Any:
    """Load a saved model directory of the recipe's family, in eval mode."""
    return model_class(r).from_pretrained(str(path)).eval()


class ToyTask:
    """The data of one recipe: seeded training batches, the loss, and held-out evaluation."""

    def __init__(self, r: Recipe) -> None:
        self.recipe = r
        if r.family == "vit":
            from rebasin.toy import digits

            self.digits = digits.load()
            self.digest = "sklearn-digits"
        else:
            from rebasin.toy.text import stdlib_corpus

            self.corpus = stdlib_corpus(r.corpus_chars)
            self.digest = self.corpus.digest

    def batch(self, task: str, generator: torch.Generator, replay: float = 0.0) -> dict[str, torch.Tensor]:
        """One training batch of ``task`` ("general" or "sub") drawn with ``generator``.

        Text: ``input_ids`` ``(batch, seq)`` (+ ``labels`` −100-masked for BERT). ViT:
        ``pixel_values`` ``(batch, 1, 8, 8)`` and ``labels`` ``(batch,)``. With ``replay`` > 0 the
        last ``round(replay · batch)`` rows are drawn from the general task instead.
        """
        n_general = round(replay * self.recipe.batch) if task != "general" else 0
        if n_general == 0:
            return self._rows(task, self.recipe.batch, generator)
        own = self._rows(task, self.recipe.batch - n_general, generator)
        general = self._rows("general", n_general, generator)
        return {k: torch.cat([own[k], general[k]]) for k in own}

    def _rows(self, task: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        r = self.recipe
        if r.family == "vit":
            idx = torch.randint(0, len(self.digits.y_train), (n,), generator=generator)
            return {"pixel_values": self.digits.images(task, "train")[idx], "labels": self.digits.y_train[idx]}
        from rebasin.toy.text import mask_tokens, random_windows

        ids = random_windows(self.corpus.stream(task, "train"), n, r.seq, generator)
        if r.family == "bert":
            inputs, labels = mask_tokens(ids, r.mask_rate, generator)
            return {"input_ids": inputs, "labels": labels}
        return {"input_ids": ids}

    def loss(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of ``batch`` (cross-entropy, nats)."""
        if self.recipe.family == "vit":
            return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        if self.recipe.family == "bert":
            return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @functools.cached_property
    def eval_sets(self) -> dict[str, dict[str, torch.Tensor]]:
        """Fixed held-out inputs of both tasks (the same for every model and run)."""
        r = self.recipe
        if r.family == "vit":
            return {t: {"pixel_values": self.digits.images(t, "test"), "labels": self.digits.y_test} for t in TASKS}
        from rebasin.toy.text import eval_windows, mask_tokens

        out = {}
        for t in TASKS:
            ids = eval_windows(self.corpus.stream(t, "test"), r.eval_size, r.seq)
            if r.family == "bert":
                inputs, labels = mask_tokens(ids, r.mask_rate, torch.Generator().manual_seed(1234))
                out[t] = {"input_ids": inputs, "labels": labels}
            else:
                out[t] = {"input_ids": ids}
        return out

    @torch.no_grad()
    def evaluate(self, model: Any, chunk: int = 64) -> dict[str, float]:
        """``{"sub": m, "general": m}``: held-out accuracy (ViT) or mean loss per predicted token (text)."""
        model.eval()
        out: dict[str, float] = {}
        for t, data in self.eval_sets.items():
            n = next(iter(data.values())).shape[0]
            total = count = 0.0
            for i in range(0, n, chunk):
                part = {k: v[i:i + chunk] for k, v in data.items()}
                if self.recipe.family == "vit":
                    logits = model(pixel_values=part["pixel_values"]).logits
                    total += float((logits.argmax(-1) == part["labels"]).sum())
                    count += len(part["labels"])
                    continue
                labels = part.get("labels")
                logits = model(input_ids=part["input_ids"]).logits.float()
                if labels is None:
                    logits, labels = logits[:, :-1], part["input_ids"][:, 1:]
                flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                       reduction="sum")
                total += float(flat)
                count += float((labels != -100).sum())
            out[t] = total / count
        return out


@functools.lru_cache(maxsize=8)
def toy_task(r: Recipe) -> ToyTask:
    """The (cached) :class:`ToyTask` of a recipe."""
    return ToyTask(r)
