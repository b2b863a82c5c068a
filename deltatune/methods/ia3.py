"""IA³ (Liu et al. 2022, arXiv:2205.05638, Sec. 3.3): learned vectors that rescale activations.

On an ordinary target the layer's output is scaled, ``y = l ⊙ base(x)`` (bias included), l of shape
(out, 1); on a feed-forward target (``feedforward``) the input is, ``y = base(l ⊙ x)``, l of shape
(1, in). Both start at ones (the base model). Shapes, init, forward and merge follow PEFT's IA³.

In the delta interface (``apply(layer, x, y) -> y`` with y the base output) input scaling is written
as ``y + W((l - 1) ⊙ x)``: the base is linear in x, so this equals ``base(l ⊙ x)`` without running the
base a second time on a scaled copy. Merging is a product (``W <- W ⊙ l``, and for output scaling the
bias too), so unmerging divides; as in PEFT, by ``l + 1e-8``. Linear-family geometries only (dense,
GPT-2 ``Conv1D``, 4-bit): PEFT's convolution IA³ is not built here yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.adapters.geometry import Geometry
from deltatune.adapters.method import register_method
from deltatune.adapters.targeting import matches_name

__all__ = ["IA3Config", "IA3Delta", "IA3"]

_EPS = 1e-8  # PEFT's guard against dividing by a zero scale when unmerging


@dataclass
class IA3Config:
    """Settings of one IA³ adapter."""

    method: ClassVar[str] = "ia3"

    targets: list[str] | str = "all-linear"
    """Modules to rescale: name suffixes, a full-name regex, or "all-linear"."""
    feedforward: list[str] | str | None = None
    """Targets whose input is rescaled instead of their output (the second layer of an MLP: "down_proj", "fc2"); same forms."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""
    init_weights: bool = True
    """Start every vector at ones (the base model); False draws them from N(0, 1) (tests)."""
    dtype: str | None = "float32"
    """Vector dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.feedforward, tuple):
            self.feedforward = list(self.feedforward)

    def replace(self, **changes) -> "IA3Config":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class IA3Delta(nn.Module):
    """One IA³ vector ``l`` on one layer: (out, 1) scaling the output, or (1, in) scaling the input."""

    method = "ia3"
    changes_base = False

    def __init__(self, l: torch.Tensor, feedforward: bool):
        super().__init__()
        self.l = nn.Parameter(l)
        self.feedforward = feedforward

    def roles(self) -> dict[str, nn.Parameter]:
        return {"l": self.l}

    def settings(self) -> dict:
        return {"feedforward": self.feedforward}

    def signature(self) -> tuple:
        return (self.feedforward,)

    def attach(self, layer: nn.Module) -> None:
        pass

    def detach(self, layer: nn.Module) -> None:
        pass

    def low_rank(self, training: bool):
        return None  # a product, not a sum of low-rank terms: the plain forward runs

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if not active:
            return y
        scale = self.l.flatten()
        if not self.feedforward:
            return (y * scale).to(y.dtype)  # (..., out) * (out,)
        W = layer.geometry.base_weight(layer)  # (out, in)
        h = (x.to(scale.dtype) * (scale - 1)).to(W.dtype)  # (..., in)
        return y + F.linear(h, W).to(y.dtype)

    def _scaled(self, layer: nn.Module, factor: torch.Tensor) -> torch.Tensor:
        """``W ⊙ factor - W`` in the stored layout (fp32): what turns W into W scaled by ``factor``."""
        W = layer.geometry.base_weight(layer).float()  # (out, in)
        scale = factor.float().flatten()
        scaled = W * (scale[None, :] if self.feedforward else scale[:, None])
        return layer.geometry.to_weight_layout(layer.base_module, scaled - W)

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        return self._scaled(layer, self.l)

    def unmerge_delta(self, layer: nn.Module) -> torch.Tensor:
        return self._scaled(layer, 1.0 / (self.l + _EPS))

    def bias_delta(self, layer: nn.Module, merging: bool) -> torch.Tensor | None:
        """What merging (or unmerging) adds to the bias: output scaling scales it too."""
        bias = getattr(layer, "bias", None)
        if self.feedforward or bias is None:
            return None
        scale = self.l.float().flatten()
        factor = scale if merging else 1.0 / (scale + _EPS)
        return bias.float() * (factor - 1)


class IA3Method:
    """IA³ as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "ia3"
    config = IA3Config

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family == "linear"

    def _feedforward(self, cfg: IA3Config, path: str) -> bool:
        return bool(cfg.feedforward) and matches_name(path, cfg.feedforward)

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: IA3Config, path: str) -> dict[str, tuple[int, ...]]:
        fan_in, fan_out = geometry.features(base)
        return {"l": (1, fan_in) if self._feedforward(cfg, path) else (fan_out, 1)}

    def settings(self, cfg: IA3Config, path: str) -> dict:
        return {"feedforward": self._feedforward(cfg, path)}

    def make_delta(self, layer: nn.Module, cfg: IA3Config, path: str, dtype: torch.dtype | None) -> IA3Delta:
        (shape,) = self.shapes(layer.geometry, layer.base_module, cfg, path).values()
        weight = layer.geometry.base_weight(layer)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        l = torch.ones(shape) if cfg.init_weights else torch.randn(shape)
        return IA3Delta(l.to(device=weight.device, dtype=dtype), self._feedforward(cfg, path))


IA3 = register_method(IA3Method())
