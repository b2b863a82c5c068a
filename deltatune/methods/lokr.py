"""LoKr (Yeh et al. 2023, arXiv:2309.14859; LyCORIS): a Kronecker product of two small factors,
``ΔW = alpha/r * W1 ⊗ W2`` with W (out, in) split as out = l·k, in = m·n.

W1 is (l, m) and W2 is (k, n); each is a full matrix or, when the rank r is small against its sides
(PEFT's rule: W2 when r < max(k, n) / 2, W1 only with ``decompose_both``), a low-rank product
``A @ B``. The split comes from ``factorization`` (the two divisors nearest the square root, or near
``decompose_factor``). Shapes, init (W1 or W1a at zero), forward and merge follow PEFT's LoKr (GPT-2
``Conv1D`` and the 4-bit layer take the linear math on their (out, in) weight).

On a convolution (out, in/groups, *kernel) the split is of out and in/groups; W1 stays (l, m) and the
kernel goes to W2: a full (k, n, *kernel), a flat product (k, r) @ (r, n * prod(kernel)), or with
``use_effective_conv2d`` (kernels larger than 1) PEFT's CP form, a core T2 (r, r, *kernel) with W2a (r, k)
and W2b (r, n). ΔW is ``kron`` of the two laid out as PEFT's ``make_kron`` does and read in the base
weight's shape, so a Conv1d with a full W2 gets PEFT's own layout (``kron`` of a 2-D and a 3-D tensor).
The forward, the dropouts, merging and the CP form's pieces are shared with LoHa (``methods/lycoris.py``).
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

__all__ = ["LoKrConfig", "LoKrDelta", "LOKR", "factorization"]


@dataclass
class LoKrConfig:
    """Settings of one LoKr adapter."""

    method: ClassVar[str] = "lokr"

    r: int = 8
    """Rank of the factors that are decomposed (see the module docstring)."""
    alpha: float = 8.0
    """Scaling numerator: scale = alpha / r."""
    targets: list[str] | str = "all-linear"
    """Module-name suffixes, a full-name regex, or "all-linear"."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    decompose_both: bool = False
    """Also write W1 as a low-rank product when the rank is small against its sides."""
    decompose_factor: int = -1
    """Split each dimension with one factor near this number (-1: near its square root)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name pattern: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name pattern: alpha}."""
    rank_dropout: float = 0.0
    """Training only: probability of dropping each output row of ΔW."""
    rank_dropout_scale: bool = False
    """With rank_dropout: rescale the kept rows by the inverse of their share."""
    module_dropout: float = 0.0
    """Training only: probability of skipping the whole delta for a forward."""
    use_effective_conv2d: bool = False
    """Convolutions with a kernel larger than 1 and a decomposed W2: W2 as a CP core (r, r, *kernel) with two factors."""
    init_weights: bool | str = True
    """True: W1 (or W1a) at zero, the base model at init; "lycoris": W2 (or W2b) at zero instead; False: all random (tests)."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter."""
    dtype: str | None = "float32"
    """Factor dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.r <= 0:
            raise ValueError(f"LoKrConfig.r must be a positive integer, got {self.r}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")

    def replace(self, **changes) -> "LoKrConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = ``dimension`` and m <= n: m = ``factor`` if it divides, else the divisor pair
    nearest the square root whose smaller member stays <= ``factor`` (LyCORIS' rule, as PEFT's)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (m, n) if m <= n else (n, m)


class LoKrDelta(FactorDelta):
    """One LoKr adapter on one layer: W1 (or W1a, W1b) and W2 (or W2a, W2b)."""

    method = "lokr"

    def _delta_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * W1 ⊗ W2``: (out, in...) as a 2-D matrix."""
        p = self._factors(dtype)
        w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]  # (l, m)
        if "w2" in p:  # (k, n) or (k, n, *kernel)
            w2 = p["w2"]
        elif "t2" in p:  # CP: (r, r, k1, k2) core -> (k, n, k1, k2)
            w2 = cp_weight(p["t2"], p["w2_a"], p["w2_b"])
        else:
            w2 = p["w2_a"] @ p["w2_b"]  # (k, n * prod(kernel))
        if w2.dim() == 4:  # (l, m, 1, 1) ⊗ (k, n, k1, k2) = (out, in, k1, k2), as PEFT's make_kron
            w1 = w1[:, :, None, None]
        # canonical strides: einsum can leave a size-1 dim with a stride torch.kron's internal view rejects
        delta = torch.kron(w1, w2.reshape(-1).view(w2.shape)) * self.scale
        return delta.reshape(w1.shape[0] * w2.shape[0], -1)  # PEFT reshapes to the base weight: same order

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, factors={sorted(self._parameters)}"


class LoKrMethod:
    """LoKr as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "lokr"
    config = LoKrConfig

    def supports(self, geometry: Geometry) -> bool:
        return supports_factors(geometry)

    def settings(self, cfg: LoKrConfig, path: str) -> dict:
        rank, alpha = rank_alpha(cfg, path)
        return {"rank": rank, "alpha": alpha}

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: LoKrConfig, path: str) -> dict[str, tuple[int, ...]]:
        rank = rank_alpha(cfg, path)[0]
        if geometry.family == "conv":  # weight (out, in/groups, *kernel)
            fan_out, fan_in, kernel = conv_weight_shape(base)
        else:
            (fan_in, fan_out), kernel = geometry.features(base), ()
        (l, k), (m, n) = factorization(fan_out, cfg.decompose_factor), factorization(fan_in, cfg.decompose_factor)
        shapes = {}
        if cfg.decompose_both and rank < max(l, m) / 2:
            shapes.update(w1_a=(l, rank), w1_b=(rank, m))
        else:
            shapes["w1"] = (l, m)
        if rank >= max(k, n) / 2:
            shapes["w2"] = (k, n, *kernel)
        elif (core := cp_core_shape(rank, kernel, cfg.use_effective_conv2d, path)) is not None:
            shapes.update(t2=core, w2_a=(rank, k), w2_b=(rank, n))
        else:
            shapes.update(w2_a=(k, rank), w2_b=(rank, n * math.prod(kernel)))
        return shapes

    def make_delta(self, layer: nn.Module, cfg: LoKrConfig, path: str, dtype: torch.dtype | None) -> LoKrDelta:
        shapes = self.shapes(layer.geometry, layer.base_module, cfg, path)
        device, dtype = factor_dtype(layer, dtype)
        # which factor starts at zero: W1 (W1a) by default, W2 (W2b) the LyCORIS way, none with init_weights=False
        zero = {True: ("w1", "w1_a"), "lycoris": ("w2", "w2_b"), False: ()}[cfg.init_weights]
        factors = init_factors(shapes, zero, device, dtype)
        rank, alpha = rank_alpha(cfg, path)
        return LoKrDelta(factors, rank, alpha, cfg.rank_dropout, cfg.rank_dropout_scale, cfg.module_dropout)


LOKR = register_method(LoKrMethod())
