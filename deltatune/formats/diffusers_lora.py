"""diffusers' LoRA file for a Stable Diffusion pipeline: ``pytorch_lora_weights.safetensors``, what
``pipeline.load_lora_weights(directory)`` reads.

Keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``lora_magnitude_vector``
for DoRA), the component being ``unet`` or ``text_encoder``: PEFT's tensor names with the component in
place of PEFT's ``base_model.model.`` prefix. The file's metadata key ``lora_adapter_metadata`` holds,
as JSON, each component's PEFT ``LoraConfig`` fields under ``<component>.<field>``: diffusers builds
the ``LoraConfig`` from them (rank, alpha, per-module patterns), instead of guessing alpha = rank
from the shapes, which would change the scale of an adapter with alpha != r.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from deltatune.adapters import adapter_record, describe_adapter
from deltatune.adapters.description import FULL
from deltatune.formats import peft
from deltatune.formats.atomic import atomic_write

__all__ = ["WEIGHTS_NAME", "METADATA_KEY", "COMPONENTS", "diffusers_lora_state", "save_diffusers_lora"]

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder")
"""The pipeline components a Stable Diffusion LoRA file carries (diffusers' ``_lora_loadable_modules``)."""
_NOT_LORA_CONFIG = ("library",)
"""Keys of deltatune's adapter_config.json that PEFT's ``LoraConfig`` does not take."""


def diffusers_lora_state(model: nn.Module, name: str = "default") -> tuple[dict, dict]:
    """(tensors by diffusers' key, metadata fields) of LoRA adapter ``name`` on ``model``, a module whose
    children ``unet`` / ``text_encoder`` hold the adapted layers. Raises ValueError for another method,
    for modules trained in full, or for a layer outside the components."""
    cfg = adapter_record(model).configs[name]
    if type(cfg).method != "lora":
        raise ValueError(f"diffusers' LoRA files hold LoRA adapters; adapter {name!r} is {type(cfg).method}")
    parts = describe_adapter(model, name)
    tensors, metadata = {}, {}
    for component in COMPONENTS:
        mine = {path[len(component) + 1:]: part for path, part in parts.items() if path.startswith(component + ".")}
        if not mine:
            continue
        if any(part.method == FULL for part in mine.values()):
            raise ValueError(f"diffusers' LoRA files hold no modules trained in full ({component}: modules_to_save)")
        for path, part in mine.items():
            for role, tensor in part.tensors.items():
                key = peft.file_key(path, part.method, part.geometry, role)[len(peft.PREFIX):]
                tensors[f"{component}.{key}"] = tensor.contiguous().cpu()
        config = peft.to_peft_config(cfg, mine, sorted(mine))
        for key, value in config.items():
            if key not in _NOT_LORA_CONFIG:
                metadata[f"{component}.{key}"] = value
    outside = sorted(p for p in parts if not p.startswith(tuple(c + "." for c in COMPONENTS)))
    if outside:
        raise ValueError(f"diffusers' LoRA files hold {', '.join(COMPONENTS)} layers; the adapter also has {outside[:3]}")
    return tensors, metadata


def save_diffusers_lora(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` as ``<directory>/pytorch_lora_weights.safetensors`` (atomically); returns the file."""
    from safetensors.torch import save_file

    tensors, metadata = diffusers_lora_state(model, name)
    path = Path(directory) / WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path
