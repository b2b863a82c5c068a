"""LoRA (Hu et al. 2021, arXiv:2106.09685): ``y = base(x) + scale * B(A(dropout(x)))``.

With rsLoRA's scale (Kalajdzievski 2023, arXiv:2312.03732) and PiSSA's initialisation (Meng et al.
2024, arXiv:2404.02948). Shapes follow PEFT per geometry family: linear A (r, in), B (out, r);
conv A (r, in, *kernel) run with the base's stride and padding, B a 1x1 conv (out, r, 1, ...);
embedding A (r, num) looked up by token id, B (dim, r), and no dropout on token ids. ``use_dora``
wraps the delta in DoRA's magnitude and direction (``methods/dora.py``).
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
from deltatune.methods.dora import DoraDelta, magnitude_shape

__all__ = ["LoraConfig", "LoraDelta", "LORA", "INIT_METHODS"]

INIT_METHODS = ("kaiming", "gaussian", "pissa", "random")


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    Targets are chosen by ``targets``: a list of module-name suffixes (``["q_proj", "v_proj"]``),
    a regular expression matched against the full module name, or ``"all-linear"`` (every linear
    layer except the output head). ``exclude`` takes the same forms. ``rank_pattern`` and
    ``alpha_pattern`` map a name pattern (regex on the name's tail, as in PEFT) to a rank or alpha
    that overrides ``r``/``alpha`` for the modules it matches.
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update (A is r x in, B is out x r)."""
    alpha: float = 8.0
    """Scaling numerator: scale = alpha / r (or alpha / sqrt(r) with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (training only)."""
    targets: list[str] | str = "all-linear"
    """Module-name suffixes, a full-name regex, or "all-linear"."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name pattern: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name pattern: alpha}."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023): scale = alpha / sqrt(r)."""
    init: str = "kaiming"
    """A's initialisation: "kaiming" (uniform), "gaussian", "pissa" (top-r SVD of W), or "random" (B too; tests)."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""
    dtype: str | None = "float32"
    """Adapter parameter dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): W' = m ⊙ (W + s·BA) / ||W + s·BA||, a learned magnitude m per output feature."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"LoraConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.use_dora and self.init == "pissa":
            raise ValueError("LoraConfig: use_dora does not combine with init='pissa'")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"LoraConfig.dtype must be float32, bfloat16, float16 or None, got {self.dtype!r}")

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


# -- the math per geometry family ----------------------------------------------------------------------
def _shapes(geometry: Geometry, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B for ``base`` at ``rank``."""
    if geometry.family == "conv":
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        ones = (1,) * len(base.kernel_size)
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, *ones)
    fan_in, fan_out = geometry.features(base)
    return (rank, fan_in), (fan_out, rank)


def _low_rank_path(layer: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The unscaled ``B(A(x))`` on activations (never rebuilds W + BA)."""
    geometry = layer.geometry
    if geometry.family == "conv":
        conv = (F.conv1d, F.conv2d, F.conv3d)[A.dim() - 3]
        return conv(geometry.conv(layer, x, A), B)  # (N, r, ...) -> (N, out, ...)
    if geometry.family == "embedding":
        return geometry.embed(layer, x, A.T) @ B.T  # (..., r) @ (r, dim)
    return F.linear(F.linear(x, A), B)


def _init(family: str, A: torch.Tensor, B: torch.Tensor, method: str, rank: int) -> None:
    """Initialise A and B in place so that ``B @ A == 0`` (except for ``method="random"``).

    Embeddings swap the roles as PEFT does: A starts at zero and B Gaussian.
    """
    if family == "embedding":
        nn.init.normal_(A) if method == "random" else nn.init.zeros_(A)
        nn.init.normal_(B)
        return
    if method == "gaussian":
        nn.init.normal_(A, std=1.0 / rank)
    else:  # "kaiming" (the paper's and PEFT's default) or "random"
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if method == "random":  # test helper: a non-trivial adapter
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        nn.init.zeros_(B)


class LoraDelta(nn.Module):
    """One LoRA adapter on one layer: parameters ``A`` and ``B``, and its rank, alpha, scale, dropout."""

    method = "lora"
    additive = True  # ΔW does not depend on W: merging at a weight w adds w·ΔW, unmerging takes it out

    def __init__(self, A: torch.Tensor, B: torch.Tensor, rank: int, alpha: float, scale: float, dropout: float,
                 init: str = "kaiming"):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.rank, self.alpha, self.scale, self.dropout, self.init = rank, alpha, scale, dropout, init
        self.changes_base = False  # PiSSA: the initial B0 @ A0 was taken out of W

    def roles(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def settings(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha}

    def signature(self) -> tuple:
        return (self.scale, self.dropout)

    def attach(self, layer: nn.Module) -> None:
        if self.init == "pissa":
            with torch.no_grad():
                self._pissa(layer)

    def _pissa(self, layer: nn.Module) -> None:
        """PiSSA: A, B from the top-r SVD of W, and W keeps the residual.

        With W = U S Vh: B = U_r sqrt(S_r/scale), A = sqrt(S_r/scale) Vh_r, W_res = W - scale B A,
        so the adapted layer's output is unchanged at init (as PEFT's ``init_lora_weights="pissa"``).
        The initial factors are kept (outside the state dict) to give the base behaviour back exactly.
        """
        geometry = layer.geometry
        W = geometry.base_weight(layer).float()  # (out, in...)
        U, S, Vh = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
        root = torch.sqrt(S[:self.rank] / self.scale)
        A0 = (root[:, None] * Vh[:self.rank]).reshape(self.A.shape)  # fp32
        B0 = (U[:, :self.rank] * root[None, :]).reshape(self.B.shape)
        geometry.add_to_weight(layer, -self.scale * self._weight(layer, A0, B0))
        self.register_buffer("A0", A0, persistent=False)
        self.register_buffer("B0", B0, persistent=False)
        self.A.copy_(A0)
        self.B.copy_(B0)
        self.changes_base = True

    def detach(self, layer: nn.Module) -> None:
        if self.changes_base:  # give PiSSA's part of W back
            with torch.no_grad():
                layer.geometry.add_to_weight(layer, self.scale * self._weight(layer, self.A0, self.B0))

    def _weight(self, layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The unscaled ``B @ A`` in the stored weight's layout."""
        return layer.geometry.to_weight_layout(layer.base_module, B.flatten(1) @ A.flatten(1))

    def matrix(self) -> torch.Tensor:
        """``scale * B @ A`` as the 2-D (out, in...) matrix ``Geometry.base_weight`` gives, in A's dtype."""
        return self.scale * (self.B.flatten(1) @ self.A.flatten(1))

    def update(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(h))`` on activations, without dropout (``h`` already in the adapter's dtype)."""
        return self.scale * _low_rank_path(layer, h, self.A, self.B)

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        return self.scale * self._weight(layer, self.A.float(), self.B.float())

    def unmerge_delta(self, layer: nn.Module) -> torch.Tensor:
        return -self.merge_delta(layer)

    def low_rank(self, training: bool):
        if self.dropout and training:
            return None
        return self.A, self.B, self.scale

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if active:
            A, B = self.A, self.B
        elif self.changes_base:  # not applied: give back the part PiSSA took out of W
            A, B = self.A0, self.B0
        else:
            return y
        dropped = bool(self.dropout) and self.training and x.is_floating_point()
        # Under autocast the matmuls cast x themselves: an fp32 copy of a bf16 x would be cast straight back
        # (two kernels forward and two backward a layer, for the same numbers). Dropout keeps its fp32 input.
        keep = not x.is_floating_point() or (not dropped and torch.is_autocast_enabled(x.device.type))
        h = x if keep else x.to(A.dtype)
        if dropped:
            h = F.dropout(h, self.dropout, training=True)
        return y + (self.scale * _low_rank_path(layer, h, A, B)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}"


class LoraMethod:
    """LoRA as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "lora"
    config = LoraConfig

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family in ("linear", "conv", "embedding")

    def rank_alpha(self, cfg: LoraConfig, path: str) -> tuple[int, float]:
        """The rank and alpha of module ``path`` (``rank_pattern``/``alpha_pattern`` first)."""
        return int(pattern_value(path, cfg.rank_pattern, cfg.r)), float(pattern_value(path, cfg.alpha_pattern, cfg.alpha))

    def settings(self, cfg: LoraConfig, path: str) -> dict:
        """Module ``path``'s rank and alpha under ``cfg`` (what error messages about its shapes name)."""
        rank, alpha = self.rank_alpha(cfg, path)
        return {"rank": rank, "alpha": alpha}

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: LoraConfig, path: str) -> dict[str, tuple[int, ...]]:
        a_shape, b_shape = _shapes(geometry, base, self.rank_alpha(cfg, path)[0])
        shapes = {"A": tuple(a_shape), "B": tuple(b_shape)}
        if cfg.use_dora:  # DoRA's magnitude (methods/dora.py)
            shapes["magnitude"] = magnitude_shape(geometry.family, tuple(b_shape))
        return shapes

    def make_delta(self, layer: nn.Module, cfg: LoraConfig, path: str,
                   dtype: torch.dtype | None) -> LoraDelta | DoraDelta:
        rank, alpha = self.rank_alpha(cfg, path)
        delta = self.delta(layer, rank, alpha, cfg.dropout, cfg.use_rslora, cfg.init, dtype)
        if cfg.use_dora:  # DoRA: this LoRA delta plus a magnitude (methods/dora.py)
            return DoraDelta(delta, layer.geometry.family)
        return delta

    def delta(self, layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
              init: str = "kaiming", dtype: torch.dtype | None = None) -> LoraDelta:
        """A LoRA delta for ``layer`` (a ``DeltaLayer``) at ``rank``/``alpha``, initialised by ``init``."""
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        geometry = layer.geometry
        weight = geometry.base_weight(layer)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        a_shape, b_shape = _shapes(geometry, layer.base_module, rank)
        A = torch.empty(a_shape, dtype=torch.float32, device=weight.device)
        B = torch.empty(b_shape, dtype=torch.float32, device=weight.device)
        if init != "pissa":  # PiSSA's factors come from W when the delta is attached
            _init(geometry.family, A, B, init, rank)
        return LoraDelta(A.to(dtype), B.to(dtype), rank, alpha, scale, dropout, init)


LORA = register_method(LoraMethod())
