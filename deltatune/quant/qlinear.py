"""``QuantLinear``: a linear layer whose frozen weight is stored in 4-bit (NF4/FP4) or int8, and the
``Geometry`` that lets ``add_adapter`` put any weight method on it unchanged (QLoRA, Dettmers et al. 2023).

The layer keeps its quantized weight as buffers (``packed``, ``absmax``, and ``nested_absmax`` /
``offset`` with double quantization; ``packed``/``scale``/``zero`` for int8) and its format as plain
attributes. The forward dequantizes to ``compute_dtype`` and calls cuBLAS; a custom autograd
function keeps only the quantized buffers for the backward (re-dequantizing there) instead of a
dense copy of every weight. The ``DeltaLayer`` wrapper holds the same buffers under the same names,
so ``QuantLinearGeometry`` reads them from the wrapper (``.to(device)`` moves the wrapper's). To be
sharded by FSDP the same tensors can be held as frozen float parameters instead (``storage.py``:
``float_storage`` says so, and ``stored`` views them back, free of copies).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from deltatune.adapters import DeltaLayer, Geometry, delta_layers, matches_name, output_head, register_geometry, set_module
from deltatune.quant.int8 import Int8Tensor, quantize_int8
from deltatune.quant.nf4 import QuantizedTensor, quantize_4bit
from deltatune.quant.storage import stored
from deltatune.quant.triton_matmul import quant_matmul

__all__ = ["QuantLinear", "QuantLinearGeometry", "quantize", "quantize_model", "export_merged", "merge_errors"]

KINDS = ("nf4", "fp4", "int8")


def quantize(w: torch.Tensor, kind: str = "nf4", blocksize: int | None = 64, double_quant: bool = False):
    """Quantize ``w``: "nf4"/"fp4" give a ``QuantizedTensor`` (bitsandbytes layout), "int8" an ``Int8Tensor``.

    For int8, ``blocksize=None`` means one scale and zero point per output channel (row).
    """
    if kind == "int8":
        if double_quant:
            raise ValueError("double_quant applies to nf4/fp4 only")
        return quantize_int8(w, blocksize)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return quantize_4bit(w, kind, 64 if blocksize is None else blocksize, double_quant)


def _quantized(module: nn.Module):
    """The ``QuantizedTensor``/``Int8Tensor`` view of ``module``'s buffers (a QuantLinear or its wrapper),
    or of their float storage (``storage.py``: a view, no copy)."""
    shape = torch.Size((module.out_features, module.in_features))
    # buffers: nn.Module's own lookup (what ``module.packed`` falls back to, minus the failed first try)
    t = module.__getattr__ if module.float_storage is None else functools.partial(stored, module)
    if module.quant_kind == "int8":
        return Int8Tensor(t("packed"), t("scale"), t("zero"), shape, module.weight_dtype, "int8", module.blocksize)
    nested = (t("nested_absmax"), t("offset")) if module.double_quant else (None, None)
    return QuantizedTensor(t("packed"), t("absmax"), shape, module.weight_dtype, module.quant_kind,
                           module.blocksize, *nested)


def _base_matmul(x: torch.Tensor, q) -> torch.Tensor:
    """``F.linear(x, dequantize(q))`` for any leading shape; a fused kernel for few tokens on CUDA (``quant_matmul``)."""
    y = quant_matmul(x.reshape(-1, x.shape[-1]), q)  # (tokens, out)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class _DequantLinear(torch.autograd.Function):
    """``x @ W.T`` with W dequantized on the fly; saves nothing dense for the backward."""

    @staticmethod
    def forward(ctx, x, q):
        ctx.q = q
        return _base_matmul(x, q)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.q.dequantize(grad.dtype), None  # (..., out) @ (out, in); W is frozen


def quant_linear(x: torch.Tensor, q, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """``F.linear(x, dequantize(q), bias)`` computed in ``compute_dtype``, returned in ``x``'s dtype."""
    h = x.to(compute_dtype)
    y = _DequantLinear.apply(h, q) if torch.is_grad_enabled() and h.requires_grad else _base_matmul(h, q)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


class QuantLinear(nn.Module):
    """A frozen linear layer ``y = x @ W.T + b`` with W quantized; computes in ``compute_dtype``."""

    def __init__(self, q, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.quant_kind = q.kind
        self.blocksize = q.blocksize
        self.double_quant = q.double_quant
        self.weight_dtype = q.dtype
        self.compute_dtype = compute_dtype or q.dtype
        self.float_storage = None  # {name: (dtype, shape, storage dtype)} once held as float parameters
        for name, tensor in q.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "nf4", blocksize: int | None = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "QuantLinear":
        """Quantize ``linear``'s weight (its bias stays in its dtype)."""
        w = linear.weight.detach()
        q = quantize(w, kind, blocksize, double_quant and kind != "int8")
        return cls(q, linear.bias, compute_dtype or w.dtype)

    def quantized(self):
        """The weight as a ``QuantizedTensor`` (nf4/fp4) or ``Int8Tensor``, sharing this module's buffers."""
        return _quantized(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the original weight dtype)."""
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized(), self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        fs = f", float_storage={next(iter(self.float_storage.values()))[2]}" if self.float_storage else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.quant_kind}, "
                f"blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}{fs}")


class QuantLinearGeometry(Geometry):
    """A ``QuantLinear`` under adapters: base output from the quantized weight, adapters in full precision.

    ``add_to_weight`` (merge, unmerge, PiSSA) dequantizes, adds and requantizes in place, and records
    the requantization error in the layer's ``merge_error`` (see ``merge_errors``): merging into a
    4-bit base is lossy, so ``merge(); unmerge()`` restores the weight only up to that error. For an
    exact merged model use ``export_merged`` (dense weights, no requantization).
    """

    name = "quant_linear"
    is_linear = True
    attributes = ("in_features", "out_features", "quant_kind", "blocksize", "double_quant", "weight_dtype",
                  "compute_dtype", "float_storage")

    def base_forward(self, layer, x):
        return quant_linear(x, _quantized(layer), getattr(layer, "bias", None), layer.compute_dtype)

    def base_weight(self, layer):
        return _quantized(layer).dequantize(layer.weight_dtype)

    def fused_weight(self, layer):
        return _quantized(layer)  # the fused kernels dequantize it in forward and again in backward

    def add_to_weight(self, layer, delta):
        q = _quantized(layer)
        target = q.dequantize(torch.float32) + delta.float()
        fresh = quantize(target, q.kind, q.blocksize, q.double_quant)
        for name, tensor in fresh.tensors().items():  # in place: the base module shares these tensors
            stored(layer, name).copy_(tensor)  # (through the view of a float storage, if any)
        error = fresh.dequantize(torch.float32) - target
        layer.merge_error = {  # what requantization lost, against the exact W + delta
            "max_abs": error.abs().max().item(),
            "rel_fro": (error.norm() / target.norm().clamp(min=1e-30)).item(),
            "delta_fro": delta.float().norm().item(),
        }


register_geometry(QuantLinear, QuantLinearGeometry())


def quantize_model(model: nn.Module, kind: str = "nf4", blocksize: int | None = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, skip: list[str] | str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a ``QuantLinear`` in place; returns ``model``.

    Args:
        kind: "nf4", "fp4" or "int8". blocksize: values per absmax (int8: None = per output channel).
        double_quant: quantize the absmax values too (nf4/fp4).
        compute_dtype: dtype of the matmuls (default: each layer's weight dtype).
        skip: module-name suffixes or a full-name regex to leave in full precision. The output head
            (``get_output_embeddings()`` / ``lm_head``) is always kept; norms and embeddings are not
            linear layers and stay as they are.
    """
    head = output_head(model)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m is not head and name.rpartition(".")[2] != "lm_head"
               and not (skip and matches_name(name, skip))]
    for name, linear in targets:
        set_module(model, name, QuantLinear.from_linear(linear, kind, blocksize, double_quant, compute_dtype))
        del linear
    return model


def _dense_linear(in_features, out_features, weight, bias, dtype) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def export_merged(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold the active adapters into dense weights and drop every wrapper, in place; returns ``model``.

    Each quantized layer (with or without LoRA) becomes an ``nn.Linear`` in ``dtype`` holding
    ``dequantize(W) + sum(scale * B @ A)`` over the active, not yet merged adapters, summed in fp32
    (no requantization, so no merge error). Other LoRA layers are merged and unwrapped.
    """
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, DeltaLayer):
            if isinstance(module.geometry, QuantLinearGeometry):
                weight = _quantized(module).dequantize(torch.float32)
                if module.enabled:
                    for adapter in module.active:
                        if adapter not in module.merged and adapter in module.deltas:
                            weight = weight + module.delta_weight(adapter)
                new = _dense_linear(module.in_features, module.out_features, weight, getattr(module, "bias", None), dtype)
            else:
                if module.enabled:
                    for adapter in module.active:
                        module.merge(adapter)
                new = module.restore()  # the base module carrying the layer's current (merged) tensors
            replacements.append((name, new))
        elif isinstance(module, QuantLinear):
            replacements.append((name, _dense_linear(module.in_features, module.out_features,
                                                     module.dequantize(torch.float32), module.bias, dtype)))
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def merge_errors(model: nn.Module) -> dict[str, dict[str, float]]:
    """{layer name: requantization error of its last merge/unmerge} for quantized LoRA layers."""
    return {n: m.merge_error for n, m in delta_layers(model) if m.merge_error is not None}
