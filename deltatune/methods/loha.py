"""LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098; LyCORIS): a Hadamard product of two
low-rank pairs, ``ΔW = scale * (W1a @ W1b) ⊙ (W2a @ W2b)`` with ``scale = alpha / r``.

The product has rank up to r² from 4r(out + in) parameters. Shapes, init and forward follow PEFT's
LoHa: on a convolution the 2-D ΔW is (out, in/groups * prod(kernel)) and is applied as a convolution
with the base's stride, padding and groups. With ``use_effective_conv2d`` a convolution with a kernel
larger than 1 takes PEFT's CP (Tucker) form instead: each pair becomes a core T (r, r, *kernel) with
W_a (r, out) and W_b (r, in/groups), ``W_a^T ×₁ W_b^T ×₂ T`` (out, in, *kernel), as in LyCORIS.
W1a, W1b, W2a (and the cores) start Kaiming-uniform and W2b at zero, so the model starts as the base. ΔW is built from the factors on every forward (the
method has no activation-side form); training-time ``rank_dropout`` drops output rows of ΔW and
rescales, ``module_dropout`` skips the whole delta for a step, both as in PEFT. The forward, the
dropouts, merging and the CP form's pieces are shared with LoKr (``methods/lycoris.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from deltatune.adapters.geometry import Geometry
from deltatune.adapters.method import register_method
from deltatune.methods.lycoris import (
    FactorDelta, conv_weight_shape, cp_core_shape, cp_weight, factor_dtype, init_factors, rank_alpha, supports_factors,
)

__all__ = ["LoHaConfig", "LoHaDelta", "LOHA"]

@dataclass
class LoHaConfig:
    """Settings of one LoHa adapter."""

    method: ClassVar[str] = "loha"

    r: int = 8
    """Rank of each of the two pairs (ΔW's rank is up to r²)."""
    alpha: float = 8.0
    """Scaling numerator: scale = alpha / r."""
    targets: list[str] | str = "all-linear"
    """Module-name suffixes, a full-name regex, or "all-linear"."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name pattern: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name pattern: alpha}."""
    rank_dropout: float = 0.0
    """Training only: probability of dropping each output row of ΔW (the rest rescaled)."""
    module_dropout: float = 0.0
    """Training only: probability of skipping the whole delta for a forward."""
    use_effective_conv2d: bool = False
    """Convolutions with a kernel larger than 1: each pair as a CP core (r, r, *kernel) with two (r, ...) factors."""
    init_weights: bool = True
    """W2b starts at zero (the base model); False: every factor Kaiming-uniform (tests)."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter."""
    dtype: str | None = "float32"
    """Factor dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.r <= 0:
            raise ValueError(f"LoHaConfig.r must be a positive integer, got {self.r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LoHaConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def replace(self, **changes) -> "LoHaConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class LoHaDelta(FactorDelta):
    """One LoHa adapter on one layer: the factors W1a, W2a (out, r) and W1b, W2b (r, in...), or in the CP
    form the cores T1, T2 (r, r, *kernel) with W1a, W2a (r, out) and W1b, W2b (r, in)."""

    method = "loha"

    def __init__(self, factors: dict[str, torch.Tensor], rank: int, alpha: float, rank_dropout: float,
                 module_dropout: float):
        super().__init__(factors, rank, alpha, rank_dropout, True, module_dropout)  # PEFT's LoHa always rescales

    def _delta_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * (W1a @ W1b) ⊙ (W2a @ W2b)`` (or the CP products): (out, in...) as a 2-D matrix."""
        f = self._factors(dtype)
        if "t1" in f:  # (r, r, k1, k2) cores -> (out, in, k1, k2)
            pair1 = cp_weight(f["t1"], f["w1_a"], f["w1_b"])
            pair2 = cp_weight(f["t2"], f["w2_a"], f["w2_b"])
            return (pair1 * pair2 * self.scale).flatten(1)
        return (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * self.scale


class LoHaMethod:
    """LoHa as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "loha"
    config = LoHaConfig

    def supports(self, geometry: Geometry) -> bool:
        return supports_factors(geometry)

    def settings(self, cfg: LoHaConfig, path: str) -> dict:
        rank, alpha = rank_alpha(cfg, path)
        return {"rank": rank, "alpha": alpha}

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: LoHaConfig, path: str) -> dict[str, tuple[int, ...]]:
        rank = rank_alpha(cfg, path)[0]
        out = geometry.features(base)[1]
        if geometry.family != "conv":
            fan_in = geometry.features(base)[0]
            return {"w1_a": (out, rank), "w1_b": (rank, fan_in), "w2_a": (out, rank), "w2_b": (rank, fan_in)}
        _, in_per_group, kernel = conv_weight_shape(base)
        core = cp_core_shape(rank, kernel, cfg.use_effective_conv2d, path)
        if core is None:
            fan_in = in_per_group * math.prod(kernel)
            return {"w1_a": (out, rank), "w1_b": (rank, fan_in), "w2_a": (out, rank), "w2_b": (rank, fan_in)}
        return {"t1": core, "w1_a": (rank, out), "w1_b": (rank, in_per_group),
                "t2": core, "w2_a": (rank, out), "w2_b": (rank, in_per_group)}

    def make_delta(self, layer: nn.Module, cfg: LoHaConfig, path: str, dtype: torch.dtype | None) -> LoHaDelta:
        shapes = self.shapes(layer.geometry, layer.base_module, cfg, path)
        device, dtype = factor_dtype(layer, dtype)
        factors = init_factors(shapes, ("w2_b",) if cfg.init_weights else (), device, dtype)
        rank, alpha = rank_alpha(cfg, path)
        return LoHaDelta(factors, rank, alpha, cfg.rank_dropout, cfg.module_dropout)


LOHA = register_method(LoHaMethod())
