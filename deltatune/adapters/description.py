"""The file-neutral description of one adapter: ``{module path: ModulePart}``, tensors by role.

Each file format (``deltatune.formats``) maps this description to and from its own key names, so a
new method (new roles) or a new format (kohya) is one file, and neither knows the other's names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deltatune.adapters.full_copies import FullCopies
from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.protocol import adapter_modules

__all__ = ["ModulePart", "describe_adapter", "load_description", "FULL"]

FULL = "full"
"""The method name of full trainable copies (PEFT's ``modules_to_save``)."""


@dataclass
class ModulePart:
    """One module's share of an adapter."""

    method: str
    """The method's name ("lora", ...), or ``FULL`` for a full copy of the module."""
    geometry: str
    """The wrapped layer's geometry ("linear", "conv", "embedding", ...); "" for full copies."""
    tensors: dict[str, torch.Tensor]
    """The tensors by role ("A", "B"; a full copy's own state-dict keys)."""
    settings: dict = field(default_factory=dict)
    """Per-module settings that the config's global values may not give (LoRA: rank, alpha)."""


def describe_adapter(model: nn.Module, name: str) -> dict[str, ModulePart]:
    """Adapter ``name`` of ``model`` as ``{module path: ModulePart}``, in module order (tensors detached)."""
    parts = {}
    for path, module in adapter_modules(model):
        if name not in module.adapter_names():
            continue
        if isinstance(module, DeltaLayer):
            delta = module.deltas[name]
            parts[path] = ModulePart(delta.method, module.geometry.name, module.describe(name), delta.settings())
        elif isinstance(module, FullCopies):
            parts[path] = ModulePart(FULL, "", module.describe(name))
        else:
            parts[path] = ModulePart(type(module).__name__, "", module.describe(name))
    return parts


def load_description(model: nn.Module, name: str, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy ``{module path: {role: tensor}}`` into adapter ``name``, already added to ``model``."""
    for path, tensors in parts.items():
        model.get_submodule(path).load_roles(name, tensors)
