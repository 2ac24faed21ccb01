"""Tiny model families trained here, for the demo, the quality study and the tests (nothing downloaded).

- :mod:`rebasin.toy.text` — a character-level corpus from the standard library's sources
  (docstrings = the general task, code = the fine-tune's sub-task);
- :mod:`rebasin.toy.digits` — scikit-learn's digits (shifted digits = the sub-task);
- :mod:`rebasin.toy.families` — :class:`Recipe` (every hyperparameter), presets, HF configs of
  the three families (Llama with RoPE + GQA, BERT MLM, ViT), :class:`ToyTask` (batches, loss,
  held-out evaluation);
- :mod:`rebasin.toy.train` — the training loop;
- :mod:`rebasin.toy.cache` — the model cache (HF directories keyed by a hash of the recipe);
- :mod:`rebasin.toy.pairs` — pair sets: A, A_ft and three kinds of new base with their B_ft;
- :mod:`rebasin.toy.evaluate` — evaluation, fraction of the gain recovered, merges.

Needs ``transformers`` (and ``scikit-learn`` for ViT): the ``[demo]`` extra.
"""
from rebasin.toy.families import FAMILIES, PRESETS, Recipe, recipe
from rebasin.toy.pairs import KIND_LABELS, KINDS, PairSet, build_pair_set

__all__ = ["FAMILIES", "KINDS", "KIND_LABELS", "PRESETS", "PairSet", "Recipe", "build_pair_set", "recipe"]
