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


class LoKrDelta(nn.Module):
    """One LoKr adapter on one layer: W1 (or W1a, W1b) and W2 (or W2a, W2b)."""

    method = "lokr"
    changes_base = False

    def __init__(self, factors: dict[str, torch.Tensor], rank: int, alpha: float, rank_dropout: float,
                 rank_dropout_scale: bool, module_dropout: float):
        super().__init__()
        for role, tensor in factors.items():
            self.register_parameter(role, nn.Parameter(tensor))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = rank_dropout, rank_dropout_scale, module_dropout

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
        return None  # a Kronecker product: the plain forward runs

    def _delta_2d(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * W1 ⊗ W2``: (out, in...) as a 2-D matrix."""
        p = {role: t if dtype is None else t.to(dtype) for role, t in self._parameters.items()}
        w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]  # (l, m)
        if "w2" in p:  # (k, n) or (k, n, *kernel)
            w2 = p["w2"]
        elif "t2" in p:  # CP: (r, r, k1, k2) core -> (k, n, k1, k2); a Conv1d's core is (r, r, k, 1)
            w2 = torch.einsum("ijkl,ip,jr->prkl", p["t2"], p["w2_a"], p["w2_b"])
        else:
            w2 = p["w2_a"] @ p["w2_b"]  # (k, n * prod(kernel))
        if w2.dim() == 4:  # (l, m, 1, 1) ⊗ (k, n, k1, k2) = (out, in, k1, k2), as PEFT's make_kron
            w1 = w1[:, :, None, None]
        # canonical strides: einsum can leave a size-1 dim with a stride torch.kron's internal view rejects
        delta = torch.kron(w1, w2.reshape(-1).view(w2.shape)) * self.scale
        return delta.reshape(w1.shape[0] * w2.shape[0], -1)  # PEFT reshapes to the base weight: same order

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
        return f"rank={self.rank}, alpha={self.alpha}, factors={sorted(self._parameters)}"


class LoKrMethod:
    """LoKr as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "lokr"
    config = LoKrConfig

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family in ("linear", "conv")

    def _rank_alpha(self, cfg: LoKrConfig, path: str) -> tuple[int, float]:
        return int(pattern_value(path, cfg.rank_pattern, cfg.r)), float(pattern_value(path, cfg.alpha_pattern, cfg.alpha))

    def settings(self, cfg: LoKrConfig, path: str) -> dict:
        rank, alpha = self._rank_alpha(cfg, path)
        return {"rank": rank, "alpha": alpha}

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: LoKrConfig, path: str) -> dict[str, tuple[int, ...]]:
        rank = self._rank_alpha(cfg, path)[0]
        if geometry.family == "conv":  # weight (out, in/groups, *kernel)
            fan_out, fan_in, kernel = base.weight.shape[0], base.weight.shape[1], tuple(base.weight.shape[2:])
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
        elif cfg.use_effective_conv2d and math.prod(kernel) > 1:  # PEFT: 1x1 kernels stay flat
            if len(kernel) > 2:
                raise ValueError(f"{path}: use_effective_conv2d takes Conv1d/Conv2d kernels, not {kernel}")
            shapes.update(t2=(rank, rank, *kernel, 1) if len(kernel) == 1 else (rank, rank, *kernel),
                          w2_a=(rank, k), w2_b=(rank, n))
        else:
            shapes.update(w2_a=(k, rank), w2_b=(rank, n * math.prod(kernel)))
        return shapes

    def make_delta(self, layer: nn.Module, cfg: LoKrConfig, path: str, dtype: torch.dtype | None) -> LoKrDelta:
        shapes = self.shapes(layer.geometry, layer.base_module, cfg, path)
        weight = layer.geometry.base_weight(layer)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        # which factor starts at zero: W1 (W1a) by default, W2 (W2b) the LyCORIS way, none with init_weights=False
        zero = {True: ("w1", "w1_a"), "lycoris": ("w2", "w2_b"), False: ()}[cfg.init_weights]
        factors = {}
        for role, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32, device=weight.device)
            if role in zero:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            factors[role] = t.to(dtype)
        rank, alpha = self._rank_alpha(cfg, path)
        return LoKrDelta(factors, rank, alpha, cfg.rank_dropout, cfg.rank_dropout_scale, cfg.module_dropout)


LOKR = register_method(LoKrMethod())
