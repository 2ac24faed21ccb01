"""PEFT LoRA adapters: each low-rank pair mapped as (T_out·B_lora, A_lora·T_inᵀ).

With ΔW = s·B_lora A_lora (out × in), π acts on ΔW's out axis by ``T_out`` and on its in axis
by ``T_in`` (a gather, then any rotation of the axis's head blocks; both linear), so
π(ΔW) = (T_out B_lora)(A_lora T_inᵀ): B_lora's rows take the out axis's map and A_lora's
columns the in axis's map. The rank is unchanged and the adapter stays an adapter.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rebasin.errors import ArchitectureError, InputFileError
from rebasin.io.jsonfile import read_json
from rebasin.permutation import apply_axis
from rebasin.specs import Spec

ADAPTER_CONFIG = "adapter_config.json"
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def is_adapter_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter directory ``path``; InputFileError unless it is plain LoRA."""
    cfg = read_json(path / ADAPTER_CONFIG, what="adapter config")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputFileError(f"only LoRA adapters are supported, got peft_type={cfg.get('peft_type')}",
                             file=path / ADAPTER_CONFIG)
    if cfg.get("use_dora"):
        raise InputFileError("DoRA adapters are not supported (their magnitude vector is not a LoRA pair)",
                             file=path / ADAPTER_CONFIG)
    return cfg


@dataclass(frozen=True)
class LoraSite:
    """One adapted weight: checkpoint tensor ``weight`` with its out/in axes in the spec."""

    weight: str
    out_axis: int
    in_axis: int


def lora_site(name: str, spec: Spec, fan_in_fan_out: bool, *, where: object) -> tuple[LoraSite, str]:
    """Map an adapter tensor name to the base weight it adapts; returns (site, 'A' or 'B')."""
    m = _LORA.match(name)
    if not m:
        raise ArchitectureError("adapter tensor is not a LoRA A/B weight (embedding LoRA, DoRA, biases and "
                                "modules_to_save are not supported)", file=where, tensor=name)
    module = m.group("module")
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    weight = f"{module}.weight"
    if weight not in spec.axes:
        raise ArchitectureError(f"adapter targets '{weight}', which the old base does not have", file=where,
                                tensor=name)
    if len(spec.shapes[weight]) != 2:
        raise ArchitectureError(f"adapter targets a {len(spec.shapes[weight])}-D weight", file=where, tensor=name)
    out_axis, in_axis = (1, 0) if fan_in_fan_out else (0, 1)
    return LoraSite(weight, out_axis, in_axis), m.group("which")


def permute_lora(name: str, tensor: torch.Tensor, spec: Spec, perms: Mapping[str, torch.Tensor],
                 fan_in_fan_out: bool, *, where: object) -> torch.Tensor:
    """B_lora (out, r): rows mapped as the out axis; A_lora (r, in): columns as the in axis."""
    site, which = lora_site(name, spec, fan_in_fan_out, where=where)
    refs = spec.axes[site.weight]
    ref = refs[site.out_axis] if which == "B" else refs[site.in_axis]
    if ref is None:
        return tensor
    return apply_axis(spec, perms, ref, tensor, 0 if which == "B" else 1)
