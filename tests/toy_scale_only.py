"""A toy method written by following docs/architecture.md "How to add a method": one file and one
registry line (the ``register_method`` call at the bottom); the contract matrix then runs it.

ScaleOnly learns one gain per output feature, ``y = base(x) + g * (W x)`` (bias left alone), g = 0
at init. Its merge is multiplicative, ``W <- (1 + g) W``, so its unmerge divides: the seam a real
method like IA³ needs. It has no low-rank form, so the fused path falls back to the plain forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.adapters import Geometry, register_method


@dataclass
class ScaleOnlyConfig:
    """Settings of one ScaleOnly adapter."""

    method: ClassVar[str] = "scale_only"

    targets: list[str] | str = "all-linear"
    """Module-name suffixes, a full-name regex, or "all-linear"."""
    exclude: list[str] | str | None = None
    """Modules never adapted."""
    modules_to_save: list[str] | None = None
    """Modules trained in full, as copies per adapter."""
    init: float = 0.0
    """Initial gain (0 leaves the model unchanged)."""

    def replace(self, **changes) -> "ScaleOnlyConfig":
        return dataclasses.replace(self, **changes)


class ScaleOnlyDelta(nn.Module):
    """Per-output gains ``g`` (out,) on one linear layer."""

    method = "scale_only"
    changes_base = False

    def __init__(self, out_features: int, init: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.g = nn.Parameter(torch.full((out_features,), float(init), dtype=dtype, device=device))

    def roles(self):
        return {"g": self.g}

    def settings(self):
        return {}

    def signature(self):
        return ()

    def attach(self, layer):
        pass

    def detach(self, layer):
        pass

    def _scaled(self, layer, gain):  # diag(gain) @ W in the stored layout, fp32
        W = layer.geometry.base_weight(layer).float()  # (out, in)
        return layer.geometry.to_weight_layout(layer.base_module, gain.float()[:, None] * W)

    def merge_delta(self, layer):
        return self._scaled(layer, self.g)

    def unmerge_delta(self, layer):
        return -self._scaled(layer, self.g / (1 + self.g))

    def low_rank(self, training):
        return None

    def apply(self, layer, x, y, active):
        if not active:
            return y
        W = layer.geometry.base_weight(layer)
        h = F.linear(x.to(W.dtype), W)  # (..., out)
        return y + (self.g * h).to(y.dtype)


class ScaleOnlyMethod:
    name = "scale_only"
    config = ScaleOnlyConfig

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family == "linear"

    def shapes(self, geometry, base, cfg, path):
        return {"g": (geometry.features(base)[1],)}

    def settings(self, cfg, path):
        return {}

    def make_delta(self, layer, cfg, path, dtype):
        weight = layer.geometry.base_weight(layer)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        return ScaleOnlyDelta(layer.geometry.features(layer.base_module)[1], cfg.init, dtype, weight.device)


SCALE_ONLY = register_method(ScaleOnlyMethod())
