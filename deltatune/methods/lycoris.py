"""What the LyCORIS methods (LoHa, ``methods/loha.py``; LoKr, ``methods/lokr.py``) share: a delta whose
ΔW is built from its factors on every forward, their init, and PEFT's CP (Tucker) form of a convolution.

``FactorDelta`` holds the factors as parameters and does everything but build ΔW: the forward
(``y + x @ ΔW^T``, or a convolution with ΔW in the base's layout), training-time ``rank_dropout``
(output rows of ΔW dropped, optionally rescaled) and ``module_dropout`` (the whole delta skipped for a
step), merge and unmerge (±ΔW), as PEFT's LoHa and LoKr layers do. Each method's delta gives
``_delta_2d``: ΔW as a 2-D (out, in...) matrix.

The CP form (``use_effective_conv2d``, convolutions with a kernel larger than 1; LyCORIS): a core T
(r, r, *kernel) with W_a (r, out) and W_b (r, in/groups) stands for ``W_a^T ×₁ W_b^T ×₂ T`` (out, in,
*kernel); a Conv1d's core is (r, r, k, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.adapters.geometry import Geometry
from deltatune.adapters.targeting import pattern_value

__all__ = ["FactorDelta", "rank_alpha", "conv_weight_shape", "cp_core_shape", "cp_weight", "init_factors",
           "factor_dtype", "supports_factors"]


def rank_alpha(cfg, path: str) -> tuple[int, float]:
    """Module ``path``'s (rank, alpha) under ``cfg`` (``r`` / ``alpha`` with ``rank_pattern`` / ``alpha_pattern``)."""
    return int(pattern_value(path, cfg.rank_pattern, cfg.r)), float(pattern_value(path, cfg.alpha_pattern, cfg.alpha))


def conv_weight_shape(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in/groups, kernel) of a convolution's weight (out, in/groups, *kernel)."""
    return base.weight.shape[0], base.weight.shape[1], tuple(base.weight.shape[2:])


def cp_core_shape(rank: int, kernel: tuple[int, ...], use_effective_conv2d: bool, path: str) -> tuple[int, ...] | None:
    """The CP core's shape for ``kernel`` where the CP form applies (``use_effective_conv2d`` and a kernel
    larger than 1; PEFT keeps 1x1 kernels flat), else None. ValueError for kernels of more than 2 dims."""
    if not (use_effective_conv2d and math.prod(kernel) > 1):
        return None
    if len(kernel) > 2:
        raise ValueError(f"{path}: use_effective_conv2d takes Conv1d/Conv2d kernels, not {kernel}")
    return (rank, rank, *kernel, 1) if len(kernel) == 1 else (rank, rank, *kernel)


def cp_weight(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """``W_a^T ×₁ W_b^T ×₂ T``: core (r, r, k1, k2), W_a (r, out), W_b (r, in) -> (out, in, k1, k2)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, w_a, w_b)


def init_factors(shapes: dict[str, tuple[int, ...]], zero: tuple[str, ...], device, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """Fresh factors of ``shapes``: the roles in ``zero`` at zero, the rest Kaiming-uniform (a=√5, as
    PEFT's), drawn in fp32 and cast to ``dtype``."""
    factors = {}
    for role, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32, device=device)
        if role in zero:
            nn.init.zeros_(t)
        else:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        factors[role] = t.to(dtype)
    return factors


def factor_dtype(layer: nn.Module, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of new factors on ``layer``: ``dtype``, or the base weight's where it is a float."""
    weight = layer.geometry.base_weight(layer)
    return weight.device, dtype or (weight.dtype if weight.is_floating_point() else torch.float32)


def supports_factors(geometry: Geometry) -> bool:
    """Whether a weight-built delta fits ``geometry``: linear layers and convolutions."""
    return geometry.family in ("linear", "conv")


class FactorDelta(nn.Module):
    """One adapter on one layer whose ΔW (``_delta_2d``) is built from ``factors`` on each forward; see the
    module docstring. ``scale = alpha / rank``."""

    method = ""
    changes_base = False
    additive = True  # ΔW does not depend on W: merging at a weight w adds w·ΔW, unmerging takes it out

    def __init__(self, factors: dict[str, torch.Tensor], rank: int, alpha: float, rank_dropout: float,
                 rank_dropout_scale: bool, module_dropout: float):
        super().__init__()
        for role, tensor in factors.items():
            self.register_parameter(role, nn.Parameter(tensor))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = rank_dropout, rank_dropout_scale, module_dropout

    def _delta_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * ΔW`` as a 2-D (out, in...) matrix, in ``dtype`` (None: the factors')."""
        raise NotImplementedError

    def _factors(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {role: p if dtype is None else p.to(dtype) for role, p in self._parameters.items()}

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
        return None  # ΔW is not a low-rank product of two factors: the plain forward runs

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
            if self.rank_dropout_scale:
                keep = keep / keep.mean()
            delta = delta * keep.to(delta.device)[:, None]
        geometry, h = layer.geometry, x.to(delta.dtype)
        if geometry.family == "conv":
            out = geometry.conv(layer, h, geometry.to_weight_layout(layer.base_module, delta))
        else:
            out = F.linear(h, delta)
        return y + out.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
