"""The LoRA layer: ``y = base(x) + scale * B(A(dropout(x)))`` (Hu et al. 2021, arXiv:2106.09685).

One ``LoraLayer`` wraps one base layer of any registered type. The per-type details (how the base
layer runs, the shapes of A and B, how ``B @ A`` maps onto the base weight's layout) live in small
``LayerKind`` strategy objects kept in one table, ``LAYER_KINDS``, that other layer types (the
quantized linear layer, for one) register into with ``register_layer_kind``.

The wrapper keeps the base layer's parameters and buffers under their own names (``q_proj.weight``,
not ``q_proj.base_layer.weight``) so that a base checkpoint loads unchanged; adapters add only
``lora_A.<name>`` and ``lora_B.<name>``. The original module object is kept aside (outside the module
tree) so that ``remove_adapter`` can put it back: the exact inverse of wrapping.

Adapters live in ``ParameterDict``s keyed by adapter name, one entry per adapter with its own rank,
so a batch whose rows use different adapters (per-row routing, for serving) can later gather or
segment over these entries without changing how they are stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerKind", "LoraLayer", "LAYER_KINDS", "register_layer_kind", "kind_for"]


class LayerKind:
    """How LoRA attaches to one base layer type. Subclasses override what differs.

    The default describes a linear map ``y = x @ W.T + b`` with ``W`` of shape (out, in):
    A is (r, in), B is (out, r), and the merged delta ``B @ A`` has W's layout.
    """

    #: counts as a linear layer for ``targets="all-linear"``
    is_linear = True
    #: PEFT's file key names for A and B (``<path>.lora_A.weight``)
    peft_keys = ("lora_A.weight", "lora_B.weight")
    #: geometry attributes copied from the base module onto the wrapper (read by model code)
    attributes = ("in_features", "out_features")

    def features(self, base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of ``base``."""
        return base.in_features, base.out_features

    def lora_shapes(self, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for ``base`` at ``rank``."""
        fan_in, fan_out = self.features(base)
        return (rank, fan_in), (fan_out, rank)

    def base_forward(self, layer: "LoraLayer", x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, computed from the wrapper's (shared) parameters."""
        return F.linear(x, layer.weight, layer.bias)

    def delta(self, layer: "LoraLayer", x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The unscaled low-rank path ``B(A(x))`` on activations (never rebuilds W + BA)."""
        return F.linear(F.linear(x, A), B)

    def delta_weight(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The unscaled ``B @ A`` in the layout of the base weight."""
        return B @ A

    def base_weight(self, layer: "LoraLayer") -> torch.Tensor:
        """The base weight as a dense tensor in its stored layout (for PiSSA's SVD and merges)."""
        return layer.weight

    def fused_weight(self, layer: "LoraLayer"):
        """The (out, in) weight the fused linear kernels use: a tensor, an object with ``.shape`` and
        ``.dequantize(dtype)`` (a quantized weight, dequantized inside the fused node's forward and
        backward), or None where the fused path does not apply to this kind."""
        return layer.weight if type(self) is LayerKind else None

    def add_to_weight(self, layer: "LoraLayer", delta: torch.Tensor) -> None:
        """``W += delta`` in place. Quantized kinds dequantize, add and requantize here."""
        w = layer.weight
        w.data.copy_((w.data.float() + delta.float()).to(w.dtype))

    def init(self, A: torch.Tensor, B: torch.Tensor, method: str, rank: int) -> None:
        """Initialise A and B in place so that ``B @ A == 0`` (except for ``method="random"``)."""
        if method == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:  # "kaiming" (the paper's and PEFT's default) or "random"
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if method == "random":  # test helper: a non-trivial adapter
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


class Conv1DKind(LayerKind):
    """transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with W stored transposed, (in, out)."""

    attributes = ("nf", "nx")

    def features(self, base):
        return base.weight.shape[0], base.weight.shape[1]

    def base_forward(self, layer, x):
        out_shape = x.shape[:-1] + (layer.weight.shape[1],)
        y = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)
        return y.view(out_shape)

    def delta_weight(self, base, A, B):
        return (B @ A).T

    def base_weight(self, layer):
        return layer.weight.T


class ConvKind(LayerKind):
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``: A is a conv with the base's kernel and stride, B a 1x1 conv.

    Shapes follow PEFT: A (r, in, *kernel), B (out, r, 1, ...).
    """

    is_linear = False
    attributes = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                  "groups", "padding_mode")

    def features(self, base):
        return base.in_channels, base.out_channels

    def lora_shapes(self, base, rank):
        if base.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported")
        ones = (1,) * len(base.kernel_size)
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, *ones)

    def base_forward(self, layer, x):
        return layer.base_module._conv_forward(x, layer.weight, layer.bias)

    def delta(self, layer, x, A, B):
        conv = (F.conv1d, F.conv2d, F.conv3d)[A.dim() - 3]
        h = layer.base_module._conv_forward(x, A, None)  # base's stride/padding/dilation, (N, r, ...)
        return conv(h, B)

    def delta_weight(self, base, A, B):
        # (out, r) @ (r, in*k...) -> (out, in, *k)
        return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:])

    def base_weight(self, layer):
        return layer.weight.flatten(1)


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: ``y = W[x] + scale * A.T[x] @ B.T``; PEFT's A (r, num), B (dim, r).

    Like PEFT, A starts at zero and B Gaussian (the roles swap: A is the looked-up factor),
    and no dropout is applied to token ids.
    """

    is_linear = False
    peft_keys = ("lora_embedding_A", "lora_embedding_B")
    attributes = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse")

    def features(self, base):
        return base.num_embeddings, base.embedding_dim

    def _embed(self, layer, x, weight):
        b = layer.base_module
        return F.embedding(x, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def base_forward(self, layer, x):
        return self._embed(layer, x, layer.weight)

    def delta(self, layer, x, A, B):
        return self._embed(layer, x, A.T) @ B.T  # (..., r) @ (r, dim)

    def delta_weight(self, base, A, B):
        return (B @ A).T  # (num, dim)

    def base_weight(self, layer):
        return layer.weight.T

    def init(self, A, B, method, rank):
        if method == "random":
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)


LAYER_KINDS: dict[type, LayerKind] = {
    nn.Linear: LayerKind(),
    nn.Conv1d: ConvKind(),
    nn.Conv2d: ConvKind(),
    nn.Conv3d: ConvKind(),
    nn.Embedding: EmbeddingKind(),
}


def register_layer_kind(cls: type, kind: LayerKind) -> None:
    """Let ``add_adapter`` wrap modules of type ``cls`` (exact type) with the strategy ``kind``."""
    LAYER_KINDS[cls] = kind


def _register_transformers_conv1d() -> None:
    try:  # transformers is optional; import only to learn the class if it is installed
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return
    LAYER_KINDS.setdefault(Conv1D, Conv1DKind())


def kind_for(module: nn.Module) -> LayerKind | None:
    """The registered ``LayerKind`` for ``module``'s exact type, or None."""
    if type(module).__name__ == "Conv1D":
        _register_transformers_conv1d()
    return LAYER_KINDS.get(type(module))


@dataclass
class AdapterSlot:
    """Per-adapter settings of one layer (the tensors live in ``lora_A``/``lora_B``)."""

    rank: int
    alpha: float
    scale: float
    dropout: float
    init: str


class LoraLayer(nn.Module):
    """A base layer plus any number of named low-rank adapters.

    Holds the base module's own parameters and buffers under their original names. ``active``
    lists the adapters applied in ``forward`` (their outputs are summed); ``merged`` those folded
    into the base weight; ``enabled=False`` gives the base layer's behaviour.
    """

    def __init__(self, base: nn.Module, kind: LayerKind):
        super().__init__()
        self.kind = kind
        self._base = (base,)  # a tuple hides it from the module tree; remove_adapter restores it
        for name, p in base._parameters.items():  # includes entries set to None (Linear(bias=False))
            self.register_parameter(name, p)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        for attr in kind.attributes:
            setattr(self, attr, getattr(base, attr))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.slots: dict[str, AdapterSlot] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.enabled = True
        self.pissa: list[str] = []  # adapters whose initial B0 @ A0 was taken out of W (PiSSA)
        # Optional replacement of ``forward`` (the fused training path, per-row routing): a callable
        # ``impl(layer, x) -> y`` that must compute the same function as ``LoraLayer.forward``.
        self.forward_impl = None

    @property
    def base_module(self) -> nn.Module:
        """The original module (outside the module tree; shares parameters with this layer)."""
        return self._base[0]

    # -- adapters -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names of the adapters on this layer."""
        return list(self.slots)

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """A and B of adapter ``name`` (or of every adapter)."""
        names = self.adapter_names() if name is None else [n for n in [name] if n in self.slots]
        return [p for n in names for p in (self.lora_A[n], self.lora_B[n])]

    def restore(self) -> nn.Module:
        """The original module, carrying this wrapper's current parameters and buffers."""
        base = self.base_module
        for name in base._parameters:
            base._parameters[name] = self._parameters[name]
        for name in base._buffers:
            base._buffers[name] = self._buffers[name]
        return base

    def add(self, name: str, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            init: str = "kaiming", dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` (rank, alpha, dropout) initialised by ``init``; raises if present."""
        if name in self.slots:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight = self.kind.base_weight(self)
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        a_shape, b_shape = self.kind.lora_shapes(self.base_module, rank)
        A = torch.empty(a_shape, dtype=torch.float32, device=weight.device)
        B = torch.empty(b_shape, dtype=torch.float32, device=weight.device)
        if init == "pissa":
            self._pissa(name, A, B, rank, scale)
        else:
            self.kind.init(A, B, init, rank)
        self.lora_A[name] = nn.Parameter(A.to(dtype))
        self.lora_B[name] = nn.Parameter(B.to(dtype))
        self.slots[name] = AdapterSlot(rank, alpha, scale, dropout, init)

    def _pissa(self, name, A, B, rank, scale):
        """PiSSA (Meng et al. 2024, arXiv:2404.02948): A, B from the top-r SVD of W, W keeps the residual.

        With W = U S Vh: B = U_r sqrt(S_r/scale), A = sqrt(S_r/scale) Vh_r, W_res = W - scale B A,
        so the adapted layer's output is unchanged at init (as PEFT's ``init_lora_weights="pissa"``).
        """
        W = self.kind.base_weight(self).float()  # (out, in...) flattened to 2-D by the kind
        U, S, Vh = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
        root = torch.sqrt(S[:rank] / scale)
        A.copy_((root[:, None] * Vh[:rank]).reshape(A.shape))
        B.copy_((U[:, :rank] * root[None, :]).reshape(B.shape))
        self.kind.add_to_weight(self, -scale * self.kind.delta_weight(self.base_module, A, B))
        # kept (outside the state dict) so that the base behaviour can be given back exactly
        self.register_buffer(f"pissa_A0_{name}", A.clone(), persistent=False)
        self.register_buffer(f"pissa_B0_{name}", B.clone(), persistent=False)
        self.pissa.append(name)

    def _pissa_init(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"pissa_A0_{name}"), getattr(self, f"pissa_B0_{name}")

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first; a PiSSA adapter gives its part of W back)."""
        if name in self.merged:
            self.unmerge(name)
        if name in self.pissa:
            A0, B0 = self._pissa_init(name)
            with torch.no_grad():
                self.kind.add_to_weight(self, self.slots[name].scale * self.kind.delta_weight(self.base_module, A0, B0))
            delattr(self, f"pissa_A0_{name}")
            delattr(self, f"pissa_B0_{name}")
            self.pissa.remove(name)
        del self.lora_A[name], self.lora_B[name], self.slots[name]
        if name in self.active:
            self.active.remove(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of adapter ``name`` in the base weight's layout (fp32)."""
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        return self.slots[name].scale * self.kind.delta_weight(self.base_module, A, B)

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (no-op if already merged)."""
        if name not in self.merged:
            with torch.no_grad():
                self.kind.add_to_weight(self, self.delta_weight(name))
            self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the base weight (no-op if not merged)."""
        if name in self.merged:
            with torch.no_grad():
                self.kind.add_to_weight(self, -self.delta_weight(name))
            self.merged.remove(name)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_impl is not None:
            return self.forward_impl(self, x)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward in plain PyTorch, whatever ``forward_impl`` is set."""
        y = self.kind.base_forward(self, x)
        for name in self.slots:
            if name in self.merged:
                continue
            if self.enabled and name in self.active:
                A, B = self.lora_A[name], self.lora_B[name]
            elif name in self.pissa:  # not applied: give back the part PiSSA took out of W
                A, B = self._pissa_init(name)
            else:
                continue
            slot = self.slots[name]
            h = x if not x.is_floating_point() else x.to(A.dtype)
            if slot.dropout and self.training and x.is_floating_point():
                h = F.dropout(h, slot.dropout, training=True)
            y = y + (slot.scale * self.kind.delta(self, h, A, B)).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        ranks = {n: s.rank for n, s in self.slots.items()}
        return f"{type(self.base_module).__name__}, adapters={ranks}, active={self.active}, merged={self.merged}"
