"""Full copies (PEFT's ``modules_to_save``): whole modules trained in full, one copy per adapter (e.g. a classifier head).

``SavedCopies`` stands where the original module stood and holds the original's own children,
parameters and buffers under their original names (so ``classifier.weight`` stays
``classifier.weight``); the per-adapter copies live under ``copies.<adapter>``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["FullCopies"]


class FullCopies(nn.Module):
    """The original module plus a trainable deep copy per adapter; the active adapter's copy runs."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self._base = (base,)  # outside the module tree; restore() puts it back
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, p in base._parameters.items():  # includes entries set to None (Linear(bias=False))
            self.register_parameter(name, p)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # copies are never merged; present for the common layer protocol
        self.enabled = True

    @property
    def base_module(self) -> nn.Module:
        """The original module, pointed at this wrapper's (possibly moved) direct tensors."""
        return self._sync_base()

    def _sync_base(self) -> nn.Module:
        """Point the original module at this wrapper's (possibly moved) direct tensors."""
        base = self._base[0]
        for name in base._parameters:
            base._parameters[name] = self._parameters[name]
        for name in base._buffers:
            base._buffers[name] = self._buffers[name]
        return base

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def add(self, name: str) -> None:
        """A trainable copy of the original for adapter ``name``."""
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self._sync_base())
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def remove(self, name: str) -> None:
        del self.copies[name]
        if name in self.active:
            self.active.remove(name)

    def restore(self) -> nn.Module:
        """The original module, carrying this wrapper's current tensors."""
        return self._sync_base()

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        names = self.adapter_names() if name is None else [n for n in [name] if n in self.copies]
        return [p for n in names for r, p in self.copies[n].named_parameters() if role is None or r == role]

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        """The copy's state dict: its roles are the module's own parameter and buffer names."""
        return {k: v.detach() for k, v in self.copies[name].state_dict().items()}

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.copies[name].load_state_dict(tensors, strict=True)

    def merge(self, name: str) -> None:  # a full copy has nothing to fold into the base
        pass

    unmerge = merge

    def forward(self, *args, **kwargs):
        if self.enabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name](*args, **kwargs)
        return self._sync_base()(*args, **kwargs)
