"""Float storage of a quantized layer's tensors, so that FSDP2 shards them.

``fully_shard`` shards a module's parameters along dim 0 and leaves its buffers whole on every
process; a ``QuantLinear`` keeps its codes and scales as buffers (uint8 ``packed``, ``absmax``, ...).
``store_as_float`` turns each of them into a frozen ``nn.Parameter`` (``requires_grad=False``) of a
float dtype whose bytes *are* the tensor's bytes: a flat (ceil(nbytes / itemsize),) tensor, zero-padded
to a whole element, e.g. 2 code bytes per bf16 element. Float, and in the dtype FSDP gathers in (its
mixed-precision ``param_dtype``), the parameter is never cast and shares the block's all-gather dtype
on every torch the package supports (how integer parameters are cast and gathered has varied between
versions). The layer records ``float_storage = {name: (dtype, shape, storage dtype)}`` (None while
it holds buffers) and ``stored`` views the bytes back in its forward, after FSDP's all-gather: no
copy, no arithmetic, so the result is bit for bit the unsharded layer's. ``store_as_buffers`` is the
exact inverse.

A cast would change the bytes: ``stored`` refuses a storage tensor of another dtype than it was written
in (e.g. after ``model.half()``) rather than decode garbage. Copies and collectives move float bytes
unchanged (NaN patterns included: no arithmetic touches them). Torch only.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["to_float", "from_float", "stored", "store_as_float", "store_as_buffers"]


def to_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of ``t`` as a flat (ceil(nbytes / itemsize),) ``dtype`` tensor, zero-padded to a whole
    element: a view (no copy) when ``t`` is contiguous and its bytes fill whole elements."""
    if not dtype.is_floating_point:
        raise ValueError(f"float storage needs a floating dtype, got {dtype}")
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
    pad = -raw.numel() % dtype.itemsize
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(dtype)


def from_float(storage: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``to_float``: the ``dtype`` tensor of ``shape`` whose bytes lead ``storage``; a view."""
    nbytes = shape.numel() * dtype.itemsize
    return storage.reshape(-1).view(torch.uint8)[:nbytes].view(dtype).view(shape)


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s quantized tensor ``name`` as the format holds it: the buffer, or the view of its float
    storage. Raises ``TypeError`` when the storage is no longer in the dtype it was written in."""
    t = getattr(module, name)
    spec = module.float_storage
    if spec is None:
        return t
    dtype, shape, storage_dtype = spec[name]
    if t.dtype != storage_dtype:
        raise TypeError(f"{type(module).__name__}.{name}: float storage written as {storage_dtype} is now "
                        f"{t.dtype}; a cast (model.to(dtype), a mixed-precision param_dtype) changed its bytes. "
                        f"Cast before store_as_float, or call store_as_buffers first")
    return from_float(t, dtype, shape)


def _layers(model: nn.Module):
    """(layer, wrapped module or None) for every quantized layer of ``model``: a ``QuantLinear``, or the
    ``DeltaLayer`` over one (which carries its ``float_storage`` attribute, and whose wrapped module,
    outside the module tree, shares its tensors and must follow them)."""
    from deltatune.adapters import DeltaLayer

    for m in model.modules():
        if hasattr(m, "float_storage"):
            yield m, m.base_module if isinstance(m, DeltaLayer) else None


def _tensor_names(layer: nn.Module) -> list[str]:
    """The tensors of the layer's format: ``Int8Tensor.tensors()`` / ``QuantizedTensor.tensors()``."""
    if layer.quant_kind == "int8":
        return ["packed", "scale", "zero"]
    return ["packed", "absmax"] + (["nested_absmax", "offset"] if layer.double_quant else [])


def store_as_float(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Hold every quantized layer's codes and scales as frozen float parameters, in place; returns ``model``.

    Args:
        dtype: the storage dtype (default: each layer's ``compute_dtype``). Under FSDP's mixed precision
            it must be ``param_dtype``, which FSDP then does not cast. Layers already in float storage
            are left as they are.
    """
    for layer, base in _layers(model):
        if layer.float_storage is not None:
            continue
        storage_dtype = dtype or layer.compute_dtype
        spec = {}
        for name in _tensor_names(layer):
            t = layer._buffers[name]
            spec[name] = (t.dtype, t.shape, storage_dtype)
            _hold(layer, base, name, nn.Parameter(to_float(t, storage_dtype), requires_grad=False))
        _set_spec(layer, base, spec)
    return model


def store_as_buffers(model: nn.Module) -> nn.Module:
    """Inverse of ``store_as_float``: the codes and scales back as buffers of their own dtypes, in place
    (copies of whole tensors: call it on a model FSDP does not shard); returns ``model``."""
    for layer, base in _layers(model):
        spec = layer.float_storage
        if spec is None:
            continue
        for name in spec:
            _hold(layer, base, name, stored(layer, name).clone())
        _set_spec(layer, base, None)
    return model


def _hold(layer: nn.Module, base: nn.Module | None, name: str, t: torch.Tensor) -> None:
    """``t`` as ``name`` of ``layer`` and of its wrapped module ``base`` (the same object, so that
    ``restore()`` hands it back): a parameter if it is one, else a buffer, replacing what was there."""
    for m in (layer, base):
        if m is not None:
            m._buffers.pop(name, None)
            m._parameters.pop(name, None)
            (m.register_parameter if isinstance(t, nn.Parameter) else m.register_buffer)(name, t)


def _set_spec(layer: nn.Module, base: nn.Module | None, spec: dict | None) -> None:
    """Record ``spec`` (None: buffers) as the float storage of ``layer`` and of its wrapped module."""
    for m in (layer, base):
        if m is not None:
            m.float_storage = spec
