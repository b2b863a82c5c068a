"""Layer geometry: how a base layer type runs and how its weight is laid out. Knows no adapter method.

One ``Geometry`` per layer type, kept in one table (``GEOMETRIES``) that other layer types register
into (``register_geometry``: the quantized linear layer does). A method asks the geometry for the
base layer's output, for its weight as a 2-D ``(out, in)`` matrix, for how a 2-D delta maps back onto
the stored weight, and for the family (``"linear"``, ``"conv"``, ``"embedding"``) that decides the
shapes of its own factors. Everything a particular method computes (LoRA's A and B, their init)
lives in that method's file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Geometry", "GEOMETRIES", "register_geometry", "geometry_for"]


class Geometry:
    """A dense linear map ``y = x @ W.T + b``, W of shape (out, in). Subclasses override what differs."""

    #: the geometry's name in files and error messages
    name = "linear"
    #: decides the shapes of a method's factors: "linear", "conv" or "embedding"
    family = "linear"
    #: counts as a linear layer for ``targets="all-linear"``
    is_linear = True
    #: attributes copied from the base module onto the wrapper (model code reads them)
    attributes = ("in_features", "out_features")

    def features(self, base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of ``base``."""
        return base.in_features, base.out_features

    def base_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, computed from the wrapper's (shared) parameters."""
        return F.linear(x, layer.weight, layer.bias)

    def base_weight(self, layer: nn.Module) -> torch.Tensor:
        """The base weight as a dense 2-D (out, in...) matrix (for SVD inits and merges)."""
        return layer.weight

    def to_weight_layout(self, base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """A 2-D (out, in...) delta in the layout of the stored weight."""
        return delta

    def fused_weight(self, layer: nn.Module):
        """The (out, in) weight the fused linear kernels use: a tensor, an object with ``.shape`` and
        ``.dequantize(dtype)`` (a quantized weight), or None where the fused path does not apply."""
        return layer.weight if type(self) is Geometry else None

    def add_to_weight(self, layer: nn.Module, delta: torch.Tensor) -> None:
        """``W += delta`` in place (delta in the stored layout). Quantized geometries requantize here."""
        w = layer.weight
        w.data.copy_((w.data.float() + delta.float()).to(w.dtype))


class GPT2Conv1DGeometry(Geometry):
    """transformers' GPT-2 ``Conv1D``: ``y = x @ W + b`` with W stored transposed, (in, out)."""

    name = "gpt2_conv1d"
    attributes = ("nf", "nx")

    def features(self, base):
        return base.weight.shape[0], base.weight.shape[1]

    def base_forward(self, layer, x):
        out_shape = x.shape[:-1] + (layer.weight.shape[1],)
        y = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)
        return y.view(out_shape)

    def base_weight(self, layer):
        return layer.weight.T

    def to_weight_layout(self, base, delta):
        return delta.T


class ConvGeometry(Geometry):
    """``nn.Conv1d``/``Conv2d``/``Conv3d``; the 2-D weight is (out, in * prod(kernel))."""

    name = "conv"
    family = "conv"
    is_linear = False
    attributes = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                  "groups", "padding_mode")

    def features(self, base):
        return base.in_channels, base.out_channels

    def conv(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's convolution (stride, padding, dilation, padding mode) with another weight."""
        return layer.base_module._conv_forward(x, weight, None)

    def base_forward(self, layer, x):
        return layer.base_module._conv_forward(x, layer.weight, layer.bias)

    def base_weight(self, layer):
        return layer.weight.flatten(1)

    def to_weight_layout(self, base, delta):
        return delta.view(base.weight.shape)


class EmbeddingGeometry(Geometry):
    """``nn.Embedding``: ``y = W[x]``; as a linear map of one-hot inputs its 2-D weight is W.T (dim, num)."""

    name = "embedding"
    family = "embedding"
    is_linear = False
    attributes = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse")

    def features(self, base):
        return base.num_embeddings, base.embedding_dim

    def embed(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's lookup (padding index, max norm, ...) in another (num, dim) table."""
        b = layer.base_module
        return F.embedding(x, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def base_forward(self, layer, x):
        return self.embed(layer, x, layer.weight)

    def base_weight(self, layer):
        return layer.weight.T

    def to_weight_layout(self, base, delta):
        return delta.T


GEOMETRIES: dict[type, Geometry] = {
    nn.Linear: Geometry(),
    nn.Conv1d: ConvGeometry(),
    nn.Conv2d: ConvGeometry(),
    nn.Conv3d: ConvGeometry(),
    nn.Embedding: EmbeddingGeometry(),
}


def register_geometry(cls: type, geometry: Geometry) -> None:
    """Let adapters wrap modules of type ``cls`` (exact type) with ``geometry``."""
    GEOMETRIES[cls] = geometry


def _register_transformers_conv1d() -> None:
    try:  # transformers is optional; import only to learn the class if it is installed
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return
    GEOMETRIES.setdefault(Conv1D, GPT2Conv1DGeometry())


def geometry_for(module: nn.Module) -> Geometry | None:
    """The registered ``Geometry`` of ``module``'s exact type (or of the base it wraps), or None."""
    own = getattr(module, "geometry", None)
    if isinstance(own, Geometry):
        return own
    if type(module).__name__ == "Conv1D":
        _register_transformers_conv1d()
    return GEOMETRIES.get(type(module))
