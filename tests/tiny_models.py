"""Tiny random models of every supported family, built offline from transformers configs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T
from safetensors.torch import save_file

TEXT = {"vocab_size": 61, "max_position_embeddings": 32}


@dataclass(frozen=True)
class TinyCase:
    name: str
    family: str
    build: Callable[[], T.PreTrainedModel]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output: str  # attribute of the model output compared by equivalence tests


def _ids(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 61, (2, 9), generator=g)}


def _bert_ids(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 61, (2, 9), generator=g),
            "token_type_ids": torch.randint(0, 2, (2, 9), generator=g),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


def _pixels(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _clip_inputs(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 61, (2, 7), generator=g),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _seeded(fn: Callable[[], T.PreTrainedModel], seed: int = 0) -> Callable[[], T.PreTrainedModel]:
    def build() -> T.PreTrainedModel:
        torch.manual_seed(seed)
        model = fn().eval()
        # Random (not identity) norm parameters, so norms are really tested by the symmetry.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name.lower() or "ln_" in name:
                    p.add_(0.2 * torch.randn_like(p))
        return model
    return build


ENC = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
DEC = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "intermediate_size": 48, "vocab_size": 61, "max_position_embeddings": 64}

CASES: dict[str, TinyCase] = {c.name: c for c in [
    TinyCase("gpt2", "gpt2", _seeded(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=61, n_positions=32, bos_token_id=0, eos_token_id=0))),
        _ids, "logits"),
    TinyCase("bert", "bert", _seeded(lambda: T.BertForMaskedLM(T.BertConfig(**ENC, **TEXT))), _bert_ids, "logits"),
    TinyCase("bert-cls", "bert", _seeded(lambda: T.BertForSequenceClassification(T.BertConfig(
        **ENC, **TEXT, num_labels=3))), _bert_ids, "logits"),
    TinyCase("albert", "albert", _seeded(lambda: T.AlbertForMaskedLM(T.AlbertConfig(
        **ENC, embedding_size=16, **TEXT))), _bert_ids, "logits"),
    TinyCase("vit", "vit", _seeded(lambda: T.ViTForImageClassification(T.ViTConfig(
        **ENC, image_size=16, patch_size=4, num_labels=5))), _pixels, "logits"),
    TinyCase("clip", "clip", _seeded(lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(**ENC, **TEXT, bos_token_id=0, eos_token_id=2),
        vision_config={"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 40,
                       "image_size": 16, "patch_size": 4},
        projection_dim=8))), _clip_inputs, "logits_per_image"),
    TinyCase("llama", "llama", _seeded(lambda: T.LlamaForCausalLM(T.LlamaConfig(
        **DEC, attention_bias=True, mlp_bias=True))), _ids, "logits"),
    TinyCase("mistral", "mistral", _seeded(lambda: T.MistralForCausalLM(T.MistralConfig(**DEC))), _ids, "logits"),
    TinyCase("stablelm", "stablelm", _seeded(lambda: T.StableLmForCausalLM(T.StableLmConfig(
        **DEC, use_qkv_bias=True, partial_rotary_factor=0.5))), _ids, "logits"),
    TinyCase("qwen2", "qwen2", _seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        **DEC, tie_word_embeddings=True))), _ids, "logits"),
    TinyCase("qwen3", "qwen3", _seeded(lambda: T.Qwen3ForCausalLM(T.Qwen3Config(
        **{**DEC, "num_attention_heads": 8}, head_dim=8))), _ids, "logits"),
]}


def run_model(model: T.PreTrainedModel, case: TinyCase, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return getattr(model(**case.inputs(g)), case.output).float()


def save_like(d: Path, state: dict[str, torch.Tensor], like: Path) -> Path:
    """A model directory ``d``: ``like``'s config and tokenizer files with ``state`` as its weights."""
    shutil.copytree(like, d)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d
