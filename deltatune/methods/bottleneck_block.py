"""The pieces of bottleneck adapters that are not a layer's delta: one bottleneck's parameters, and the
wrapper of a whole block (a BERT-style sublayer output, a decoder MLP) that holds them.

``Bottleneck`` is ``scale * up(act(down(x)))`` (Houlsby et al. 2019, Sec. 2.1; AdapterHub's
``Adapter``: dropout after the scaling), with AdapterHub's three initialisations.

``BottleneckBlock`` stands where a block stood and keeps the block's own children under their own
names (``output.dense.weight`` stays ``output.dense.weight``; another method's layer inside it stays
visible: ``nests_adapters``). Its geometry (``BLOCK``, family "block") is what the core asks: a
module-level geometry whose ``wrapper`` is this class. Two kinds of block, told apart by structure:

* a post-norm sublayer output (BERT's ``BertSelfOutput``/``BertOutput``: children ``dense``,
  ``dropout``, ``LayerNorm``; ``forward(hidden_states, input_tensor)``), whose forward is rebuilt as
  AdapterHub's ``bottleneck_layer_forward`` with h = dropout(dense(hidden_states)), x = input_tensor:
  houlsby ``LN(h + a(h) + x)``, pfeiffer ``LN(h + a(LN(h + x)) + x)``, parallel ``LN(h + a(x) + x)``;
* any other block (a decoder MLP, ``forward(x)``): parallel ``block(x) + a(x)``, else ``y + a(y)``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.adapters.geometry import Geometry

__all__ = ["ACTIVATIONS", "Bottleneck", "BlockBottleneck", "BottleneckBlock", "BlockGeometry", "BLOCK",
           "is_post_norm_output", "block_width"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
"""Bottleneck non-linearities by AdapterHub's names ("swish" is SiLU; "gelu" the exact erf form)."""


class Bottleneck(nn.Module):
    """``scale * up(act(down(x)))``: down (size, d_in) + bias, up (d_out, size) + bias; fp32 parameters.

    ``norm`` (d_out,) weight and bias are the adapter's own copy of the block's LayerNorm, when the
    layer norms train (``train_layer_norms``)."""

    def __init__(self, d_in: int, size: int, d_out: int, activation: str, scale: float, dropout: float,
                 init: str, norm: nn.LayerNorm | None = None, device=None, dtype=torch.float32):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down_weight = nn.Parameter(torch.empty(size, d_in, **kw))
        self.down_bias = nn.Parameter(torch.zeros(size, **kw))
        self.up_weight = nn.Parameter(torch.empty(d_out, size, **kw))
        self.up_bias = nn.Parameter(torch.zeros(d_out, **kw))
        if norm is not None:
            self.norm_weight = nn.Parameter(norm.weight.detach().to(**kw).clone())
            self.norm_bias = nn.Parameter(norm.bias.detach().to(**kw).clone())
        self.activation, self.scale, self.dropout = activation, scale, dropout
        self._act = ACTIVATIONS[activation]
        with torch.no_grad():
            if init == "mam_adapter":  # up zero: exactly the base model at init
                nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
                nn.init.zeros_(self.up_weight)
            elif init == "bert":  # AdapterHub's default: N(0, 0.02) for both
                self.down_weight.normal_(0.0, 0.02)
                self.up_weight.normal_(0.0, 0.02)
            elif init == "houlsby":  # N(0, 1e-2) truncated at two standard deviations
                nn.init.trunc_normal_(self.down_weight, 0.0, 1e-2, -2e-2, 2e-2)
                nn.init.trunc_normal_(self.up_weight, 0.0, 1e-2, -2e-2, 2e-2)
            else:
                raise ValueError(f"unknown bottleneck init {init!r} (known: 'mam_adapter', 'bert', 'houlsby')")

    @property
    def size(self) -> int:
        return self.down_weight.shape[0]

    def roles(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down_weight.dtype)
        h = F.linear(self._act(F.linear(h, self.down_weight, self.down_bias)), self.up_weight, self.up_bias)  # (..., d_out)
        h = F.dropout(h * self.scale, self.dropout, self.training)
        return h.to(x.dtype)

    def layer_norm(self, base: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """``base`` applied to x, with this adapter's own weight and bias if it has them."""
        if not hasattr(self, "norm_weight"):
            return base(x)
        w, b = self.norm_weight.to(x.dtype), self.norm_bias.to(x.dtype)
        return F.layer_norm(x, base.normalized_shape, w, b, base.eps)


class BlockBottleneck(nn.Module):
    """One adapter's bottleneck in a ``BottleneckBlock``, and where it sits ("houlsby", "pfeiffer", "parallel")."""

    method = "bottleneck"

    def __init__(self, bottleneck: Bottleneck, placement: str):
        super().__init__()
        self.bottleneck = bottleneck
        self.placement = placement

    def roles(self) -> dict[str, nn.Parameter]:
        return self.bottleneck.roles()


def _forward_params(module: nn.Module) -> list[str]:
    return list(inspect.signature(type(module).forward).parameters)[1:]


def is_post_norm_output(module: nn.Module) -> bool:
    """Whether ``module`` is a post-norm sublayer output: children ``dense``, ``dropout`` and a LayerNorm
    ``LayerNorm``, ``forward(hidden_states, input_tensor)`` (BERT, RoBERTa, ELECTRA, ...)."""
    if isinstance(module, BottleneckBlock):
        return module.post_norm
    children = dict(module.named_children())
    norm = children.get("LayerNorm")
    norm = getattr(norm, "base_module", norm)  # another adapter may hold it
    return ("dense" in children and "dropout" in children and isinstance(norm, nn.LayerNorm)
            and len(_forward_params(module)) >= 2)


def block_width(block: nn.Module) -> int:
    """The hidden size a block reads and writes (its output projection's out_features)."""
    for name in ("dense", "down_proj", "c_proj", "fc2", "o_proj"):
        child = getattr(block, name, None)
        if child is not None:
            out = getattr(child, "out_features", None) or getattr(child, "nf", None)
            if out:
                return int(out)
    raise ValueError(f"cannot tell the hidden size of {type(block).__name__} (no dense / down_proj / c_proj / "
                     f"fc2 / o_proj with out_features)")


class BottleneckBlock(nn.Module):
    """A block plus named bottleneck adapters (the ``AdapterModule`` protocol); see the module docstring."""

    nests_adapters = True  # the children are the block's own: adapters of other methods inside stay visible

    def __init__(self, base: nn.Module, geometry: Geometry):
        super().__init__()
        self.geometry = geometry
        self.post_norm = is_post_norm_output(base)
        self._base = (base,)  # outside the module tree; restore() gives it back
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, p in base._parameters.items():
            self.register_parameter(name, p)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        self.bottlenecks = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # never merged: a bottleneck is non-linear
        self.enabled = True

    @property
    def base_module(self) -> nn.Module:
        """The original block, pointed at this wrapper's current children and tensors."""
        base = self._base[0]
        for name in base._modules:
            base._modules[name] = self._modules[name]
        for name in base._parameters:
            base._parameters[name] = self._parameters[name]
        for name in base._buffers:
            base._buffers[name] = self._buffers[name]
        return base

    # -- the adapter protocol -------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.bottlenecks.keys())

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        names = self.adapter_names() if name is None else [n for n in [name] if n in self.bottlenecks]
        return [p for n in names for r, p in self.bottlenecks[n].roles().items() if role is None or r == role]

    def add(self, name: str, delta: BlockBottleneck) -> None:
        if name in self.bottlenecks:
            raise ValueError(f"adapter {name!r} already exists on this block")
        self.bottlenecks[name] = delta

    def remove(self, name: str) -> None:
        del self.bottlenecks[name]
        if name in self.active:
            self.active.remove(name)

    def restore(self) -> nn.Module:
        return self.base_module

    def merge(self, name: str) -> None:
        raise ValueError(f"adapter {name!r} is a bottleneck adapter: its output is not linear in the base "
                         f"weights, so it cannot be merged into them (keep it unmerged)")

    def unmerge(self, name: str) -> None:
        pass  # never merged

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        return {role: p.detach() for role, p in self.bottlenecks[name].roles().items()}

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        roles = self.bottlenecks[name].roles()
        with torch.no_grad():
            for role, value in tensors.items():
                roles[role].copy_(value)

    # -- forward --------------------------------------------------------------------------------
    def _on(self) -> list[BlockBottleneck]:
        return [self.bottlenecks[n] for n in self.active if n in self.bottlenecks] if self.enabled else []

    def forward(self, *args, **kwargs):
        on = self._on()
        if not on:
            return self.base_module(*args, **kwargs)
        if self.post_norm:
            return self._post_norm_forward(on, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        y = self.base_module(*args, **kwargs)
        for b in on:  # adapters in turn (AdapterHub's Stack)
            y = y + b.bottleneck(x if b.placement == "parallel" else y)
        return y

    def _post_norm_forward(self, on: list[BlockBottleneck], hidden_states, input_tensor, *args, **kwargs):
        """AdapterHub's ``bottleneck_layer_forward`` for one adapter (several: in turn), h and x as above."""
        h = self.dropout(self.dense(hidden_states))  # (B, T, d)
        x = input_tensor
        norm = self.LayerNorm
        for b in on:
            a = b.bottleneck
            if b.placement == "parallel":
                h = h + a(x)
            elif b.placement == "pfeiffer":
                h = h + a(a.layer_norm(norm, h + x))
            else:
                h = h + a(h)
        return on[-1].bottleneck.layer_norm(norm, h + x)

    def extra_repr(self) -> str:
        return f"{type(self._base[0]).__name__}, active={self.active}"


class BlockGeometry(Geometry):
    """A whole block as an adapter site: wrapped by ``BottleneckBlock``, never merged, never fused."""

    name = "block"
    family = "block"
    is_linear = False
    attributes = ()
    wrapper = BottleneckBlock

    def features(self, base):
        width = block_width(base)
        return width, width

    def base_forward(self, layer, x):
        return layer.base_module(x)

    def fused_weight(self, layer):
        return None


BLOCK = BlockGeometry()
