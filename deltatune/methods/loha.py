"""LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098; LyCORIS): a Hadamard product of two
low-rank pairs, ``ΔW = scale * (W1a @ W1b) ⊙ (W2a @ W2b)`` with ``scale = alpha / r``.

The product has rank up to r² from 4r(out + in) parameters. Shapes, init and forward follow PEFT's
LoHa: on a convolution the 2-D ΔW is (out, in/groups * prod(kernel)) and is applied as a convolution
with the base's stride, padding and groups. With ``use_effective_conv2d`` a convolution with a kernel
larger than 1 takes PEFT's CP (Tucker) form instead: each pair becomes a core T (r, r, *kernel) with
W_a (r, out) and W_b (r, in/groups), ``W_a^T ×₁ W_b^T ×₂ T`` (out, in, *kernel), as in LyCORIS.
W1a, W1b, W2a (and the cores) start Kaiming-uniform and W2b at zero, so the model starts as the base. ΔW is built from the factors on every forward (the
method has no activation-side form); training-time ``rank_dropout`` drops output rows of ΔW and
rescales, ``module_dropout`` skips the whole delta for a step, both as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.adapters.geometry import Geometry
from deltatune.adapters.method import register_method
from deltatune.adapters.targeting import pattern_value

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


class LoHaDelta(nn.Module):
    """One LoHa adapter on one layer: the factors W1a, W2a (out, r) and W1b, W2b (r, in...), or in the CP
    form the cores T1, T2 (r, r, *kernel) with W1a, W2a (r, out) and W1b, W2b (r, in)."""

    method = "loha"
    changes_base = False

    def __init__(self, factors: dict[str, torch.Tensor], rank: int, alpha: float, rank_dropout: float,
                 module_dropout: float):
        super().__init__()
        for role, tensor in factors.items():
            self.register_parameter(role, nn.Parameter(tensor))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def roles(self) -> dict[str, nn.Parameter]:
        return dict(self._parameters)

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha}

    def signature(self) -> tuple:
        return (self.scale, self.rank_dropout, self.module_dropout)

    def attach(self, layer: nn.Module) -> None:
        pass

    def detach(self, layer: nn.Module) -> None:
        pass

    def low_rank(self, training: bool):
        return None  # ΔW is built from a Hadamard product: the plain forward runs

    def _delta_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * (W1a @ W1b) ⊙ (W2a @ W2b)`` (or the CP products): (out, in...) as a 2-D matrix."""
        f = {role: p if dtype is None else p.to(dtype) for role, p in self.roles().items()}
        if "t1" in f:  # (r, r, k1, k2) cores -> (out, in, k1, k2); a Conv1d's core is (r, r, k, 1)
            pair1 = torch.einsum("ijkl,jr,ip->prkl", f["t1"], f["w1_b"], f["w1_a"])
            pair2 = torch.einsum("ijkl,jr,ip->prkl", f["t2"], f["w2_b"], f["w2_a"])
            return (pair1 * pair2 * self.scale).flatten(1)
        return (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * self.scale

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        return layer.geometry.to_weight_layout(layer.base_module, self._delta_2d(torch.float32))

    def unmerge_delta(self, layer: nn.Module) -> torch.Tensor:
        return -self.merge_delta(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if not active or (self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout):
            return y
        delta = self._delta_2d()  # (out, in...)
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.shape[0]) > self.rank_dropout).to(delta.dtype)
            delta = delta * (keep / keep.mean()).to(delta.device)[:, None]
        geometry = layer.geometry
        h = x.to(delta.dtype)
        if geometry.family == "conv":
            out = geometry.conv(layer, h, geometry.to_weight_layout(layer.base_module, delta))
        else:
            out = F.linear(h, delta)
        return y + out.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoHaMethod:
    """LoHa as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "loha"
    config = LoHaConfig

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family in ("linear", "conv")

    def _rank_alpha(self, cfg: LoHaConfig, path: str) -> tuple[int, float]:
        return int(pattern_value(path, cfg.rank_pattern, cfg.r)), float(pattern_value(path, cfg.alpha_pattern, cfg.alpha))

    def settings(self, cfg: LoHaConfig, path: str) -> dict:
        rank, alpha = self._rank_alpha(cfg, path)
        return {"rank": rank, "alpha": alpha}

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: LoHaConfig, path: str) -> dict[str, tuple[int, ...]]:
        rank = self._rank_alpha(cfg, path)[0]
        out = geometry.features(base)[1]
        if geometry.family != "conv":
            fan_in = geometry.features(base)[0]
            return {"w1_a": (out, rank), "w1_b": (rank, fan_in), "w2_a": (out, rank), "w2_b": (rank, fan_in)}
        in_per_group, kernel = base.weight.shape[1], tuple(base.weight.shape[2:])  # (out, in/groups, *kernel)
        if not (cfg.use_effective_conv2d and math.prod(kernel) > 1):  # PEFT: 1x1 kernels stay flat
            fan_in = in_per_group * math.prod(kernel)
            return {"w1_a": (out, rank), "w1_b": (rank, fan_in), "w2_a": (out, rank), "w2_b": (rank, fan_in)}
        if len(kernel) > 2:
            raise ValueError(f"{path}: use_effective_conv2d takes Conv1d/Conv2d kernels, not {kernel}")
        core = (rank, rank, *kernel, 1) if len(kernel) == 1 else (rank, rank, *kernel)
        return {"t1": core, "w1_a": (rank, out), "w1_b": (rank, in_per_group),
                "t2": core, "w2_a": (rank, out), "w2_b": (rank, in_per_group)}

    def make_delta(self, layer: nn.Module, cfg: LoHaConfig, path: str, dtype: torch.dtype | None) -> LoHaDelta:
        shapes = self.shapes(layer.geometry, layer.base_module, cfg, path)
        weight = layer.geometry.base_weight(layer)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        factors = {}
        for role, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32, device=weight.device)
            if role == "w2_b" and cfg.init_weights:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            factors[role] = t.to(dtype)
        rank, alpha = self._rank_alpha(cfg, path)
        return LoHaDelta(factors, rank, alpha, cfg.rank_dropout, cfg.module_dropout)


LOHA = register_method(LoHaMethod())
