"""The one question the fast path asks a layer: what fused projection do you have?

An adapter layer (``deltatune.adapters.DeltaLayer``, or anything with the same methods) answers with
``fused_projection() -> (W, bias, [(A, B, scale), ...]) | None``: None where the fused functions do
not apply (dropout while training, an inactive delta that changed the base, a method without a
low-rank form, a trainable or unsupported base). A frozen plain ``nn.Linear`` is a projection without
adapters. The rules behind the answer are the layer's; nothing here restates them.

A delta whose fused form scales the projection's output (DoRA: ``low_rank`` gives ``(A, B, scale,
output_scale)``, ``y = f ⊙ (W x + s·B A x) + b`` with ``f = output_scale(layer)``) becomes the fused
functions' fourth element, ``(W, bias, [(A, B, scale)], f)``, when it is the layer's only active unmerged
delta; beside others the layer takes its plain forward (their order would matter).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.kernels import lora_group

__all__ = ["fast_layer_forward", "fusable", "projection"]


def projection(module: nn.Module):
    """``(W, bias, [(A, B, scale), ...])`` of ``module`` for the fused functions, or None where they don't
    apply. (Looked up on the class: ``nn.Module.__getattr__`` would make a miss cost an exception.)"""
    fused = getattr(type(module), "fused_projection", None)
    if fused is not None:
        return _output_scaled(module, fused(module))
    if type(module) is nn.Linear and not module.weight.requires_grad:
        return module.weight, module.bias, []
    return None


def _output_scaled(layer: nn.Module, proj):
    """``proj`` with a delta's output scale as its fourth element (see the module docstring), or None."""
    if proj is None or all(len(a) == 3 for a in proj[2]):
        return proj
    if len(proj[2]) != 1:
        return None
    weight, bias, [(A, B, scale, output_scale)] = proj
    return weight, bias, [(A, B, scale)], output_scale(layer)


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer whose geometry the fused functions take (a plain or
    quantized linear), whatever its adapters' state now: ``enable_fast_path`` gives those its forward."""
    if getattr(type(module), "fused_projection", None) is None:
        return False
    weight = getattr(type(module), "fused_weight", None)
    return (weight(module) if weight is not None else module.fused_projection()) is not None


def fast_layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An adapter layer's ``forward_impl`` on the fast path: its projection as one fused node, or its
    plain forward where the fused functions don't apply now."""
    proj = _output_scaled(layer, layer.fused_projection())
    if proj is None or not x.is_floating_point():
        return layer.plain_forward(x)
    if not proj[2] and len(proj) == 3 and isinstance(proj[0], torch.Tensor):
        return F.linear(x, proj[0], proj[1])
    return lora_group(x, [proj])[0]  # (a quantized W without adapters too: the node dequantizes it)
