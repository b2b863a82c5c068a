"""Trainable layer norms of bottleneck adapters on pre-norm decoders (Houlsby et al. 2019, Sec. 2.1:
"we also train the layer normalization parameters").

In a pre-norm decoder layer (Llama / Qwen2 / Mistral ``input_layernorm`` and
``post_attention_layernorm`` RMSNorms, GPT-2's ``ln_1`` / ``ln_2`` LayerNorms) the norms are modules of
their own, so each gets a ``DeltaLayer`` whose delta (``NormCopy``) is the adapter's own copy of the
norm's parameters: while the adapter is active the norm runs with the copy, otherwise with the base
tensors, which never change. The copy starts equal to the base (the adapted model is the base model at
init), is saved with the adapter (roles ``weight`` / ``bias``: the norm's own parameter names) and,
like the bottleneck, is never merged.

The norm runs through its own module code (``torch.func.functional_call``), so whatever the model's
norm computes (RMSNorm in fp32, Gemma's ``1 + weight``) stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call

from deltatune.adapters.geometry import Geometry

__all__ = ["NORM", "NormGeometry", "NormCopy", "is_layer_norm"]


def is_layer_norm(module: nn.Module) -> bool:
    """Whether ``module`` (or the base it wraps) is a layer norm: an ``nn.LayerNorm`` / ``nn.RMSNorm``, or a
    model's own ``...RMSNorm`` / ``...LayerNorm`` class with a 1-D ``weight``."""
    base = getattr(module, "base_module", module)
    if isinstance(base, (nn.LayerNorm, nn.RMSNorm)):
        return base.weight is not None
    weight = getattr(base, "weight", None)
    return (type(base).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(weight, nn.Parameter)
            and weight.dim() == 1)


class NormGeometry(Geometry):
    """A layer norm as an adapter site: its own forward, never merged, never fused."""

    name = "norm"
    family = "norm"
    is_linear = False
    attributes = ()

    def features(self, base):
        width = base.weight.shape[0]
        return width, width

    def base_forward(self, layer, x):
        base = layer.base_module
        for name in base._parameters:  # the wrapper's (possibly moved) tensors
            base._parameters[name] = layer._parameters[name]
        return base(x)

    def base_weight(self, layer):
        raise ValueError("a layer norm has no weight matrix")

    def fused_weight(self, layer):
        return None


NORM = NormGeometry()


class NormCopy(nn.Module):
    """One adapter's copy of a norm's parameters (the ``DeltaLayer`` delta): the norm runs with them."""

    method = "bottleneck"
    changes_base = False

    def __init__(self, norm: nn.Module, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, p in norm.named_parameters(recurse=False):  # weight (d,), and bias (d,) for LayerNorm
            value = p.detach().to(device=device, dtype=dtype or p.dtype).clone()
            self.register_parameter(name, nn.Parameter(value))

    def roles(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def settings(self) -> dict:
        return {}

    def signature(self) -> tuple:
        return ()

    def attach(self, layer: nn.Module) -> None:
        pass

    def detach(self, layer: nn.Module) -> None:
        pass

    def low_rank(self, training: bool):
        return None

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if not active:
            return y
        # in the base tensors' dtype, so the norm's output dtype is the base model's
        params = {name: p.to(layer._parameters[name].dtype) for name, p in self.named_parameters()}
        return functional_call(layer.base_module, params, (x,))  # (..., d)

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        raise ValueError("a bottleneck adapter's layer norms are part of a non-linear adapter, which cannot be "
                         "merged into the base weights (keep it unmerged)")

    unmerge_delta = merge_delta
