"""``DeltaLayer``: one base layer plus any number of named deltas of any method.

The wrapper keeps the base layer's parameters and buffers under their own names (``q_proj.weight``,
not ``q_proj.base_layer.weight``), so a base checkpoint loads unchanged; each adapter adds one
submodule, ``deltas.<name>``, whose tensors the method names (LoRA: ``deltas.<name>.A`` / ``.B``).
The original module object is kept aside (outside the module tree) so that ``restore`` can put it
back: the exact inverse of wrapping.

A delta is a small module of its method (``deltatune.methods``) with this interface:

* ``apply(layer, x, y, active) -> y``: the layer's output with the delta's effect on it (LoRA adds
  ``scale * B(A(dropout(x)))``); called for every unmerged delta, ``active=False`` when the delta is
  switched off (a delta that changed the base weight at init, as PiSSA does, gives that back here);
* ``merge_delta(layer)`` / ``unmerge_delta(layer) -> ΔW``: what to add to the stored weight (fp32, its
  layout) to fold the delta in / take it back out (LoRA: ``±scale * B @ A``; a multiplicative method
  computes its inverse from the merged weight); ``delta_weight(layer)`` is the first of the two; an
  optional ``bias_delta(layer, merging)`` does the same for the bias (IA³ scales it);
* ``low_rank(training) -> (A, B, scale) | None``: its fused-kernel form, None where it has none;
* ``attach(layer)`` / ``detach(layer)``: once when added / removed (PiSSA takes its part of W out);
* ``roles() -> {role: Parameter}``, ``settings() -> dict`` (rank, alpha, ...), ``signature()``.

Which adapters a call applies is per call where ``routing`` is given (serving: each batch row its own
adapter, ``deltatune.adapters.routing``), and ``active`` otherwise (training).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.adapters.geometry import Geometry

__all__ = ["DeltaLayer"]


class DeltaLayer(nn.Module):
    """A base layer plus named deltas; ``active`` are summed in ``forward``, ``merged`` are in the weight."""

    def __init__(self, base: nn.Module, geometry: Geometry):
        super().__init__()
        self.geometry = geometry
        self._base = (base,)  # a tuple hides it from the module tree; restore() gives it back
        for name, p in base._parameters.items():  # includes entries set to None (Linear(bias=False))
            self.register_parameter(name, p)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        for attr in geometry.attributes:
            setattr(self, attr, getattr(base, attr))
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        # Per-adapter strengths other than 1 (``set_active(model, {name: weight})``): the delta's effect is
        # scaled by it, unmerged and merged alike; ``_merged_weights`` keeps the one each merge used.
        self.weights: dict[str, float] = {}
        self._merged_weights: dict[str, float] = {}
        self.enabled = True
        # The execution path: a callable ``impl(layer, x) -> y`` computing what ``plain_forward`` does
        # (the fused training path sets it), or None for the plain forward.
        self.forward_impl = None
        # What requantization lost in the last merge/unmerge into a quantized base (set by its geometry).
        self.merge_error: dict[str, float] | None = None

    @property
    def base_module(self) -> nn.Module:
        """The original module (outside the module tree; shares parameters with this layer)."""
        return self._base[0]

    # -- the adapter protocol -------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.deltas.keys())

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        names = self.adapter_names() if name is None else [n for n in [name] if n in self.deltas]
        return [p for n in names for r, p in self.deltas[n].roles().items() if role is None or r == role]

    def add(self, name: str, delta: nn.Module) -> None:
        """Put ``delta`` on this layer as adapter ``name``; raises if the name is taken."""
        if name in self.deltas:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        delta.attach(self)
        self.deltas[name] = delta

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        self.deltas[name].detach(self)
        del self.deltas[name]
        if name in self.active:
            self.active.remove(name)
        self.weights.pop(name, None)

    def restore(self) -> nn.Module:
        base = self.base_module
        for name in base._parameters:
            base._parameters[name] = self._parameters[name]
        for name in base._buffers:
            base._buffers[name] = self._buffers[name]
        return base

    def merge(self, name: str) -> None:
        if name not in self.merged:
            weight = self.weights.get(name, 1.0)
            delta = self.deltas[name]
            if weight != 1.0 and not getattr(delta, "additive", False):
                raise ValueError(f"adapter {name!r} ({delta.method}) merges only at weight 1: its ΔW depends on the "
                                 f"weight it is merged into, so a scaled merge could not be taken back out")
            with torch.no_grad():
                bias = self._bias_delta(delta, merging=True)  # from the bias before the weight changes
                change = delta.merge_delta(self)
                self.geometry.add_to_weight(self, change if weight == 1.0 else weight * change)
                self._add_to_bias(bias)
            self.merged.append(name)
            if weight != 1.0:
                self._merged_weights[name] = weight

    def unmerge(self, name: str) -> None:
        if name in self.merged:
            weight = self._merged_weights.pop(name, 1.0)
            with torch.no_grad():
                delta = self.deltas[name]
                bias = self._bias_delta(delta, merging=False)
                change = delta.unmerge_delta(self)
                self.geometry.add_to_weight(self, change if weight == 1.0 else weight * change)
                self._add_to_bias(bias)
            self.merged.remove(name)

    def _bias_delta(self, delta: nn.Module, merging: bool) -> torch.Tensor | None:
        """What folding ``delta`` in (or out) adds to the bias: None for most methods (an optional
        ``bias_delta(layer, merging)`` of the delta; IA³'s output scaling scales the bias too)."""
        get = getattr(type(delta), "bias_delta", None)
        return get(delta, self, merging) if get is not None else None

    def _add_to_bias(self, delta: torch.Tensor | None) -> None:
        if delta is not None:
            b = self.bias
            b.data.copy_((b.data.float() + delta).to(b.dtype))

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        return {role: p.detach() for role, p in self.deltas[name].roles().items()}

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        roles = self.deltas[name].roles()
        with torch.no_grad():
            for role, value in tensors.items():
                roles[role].copy_(value)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to the (unmerged) weight: fp32, the stored weight's layout."""
        return self.deltas[name].merge_delta(self)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        if routing is not None:
            return routing.forward(self, x)
        if self.forward_impl is not None:
            return self.forward_impl(self, x)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward in plain PyTorch, whatever ``forward_impl`` is set."""
        y = self.geometry.base_forward(self, x)
        for name, delta in self.deltas.items():
            if name not in self.merged:
                on = self.enabled and name in self.active
                weight = self.weights.get(name, 1.0) if on else 1.0
                if weight == 1.0:
                    y = delta.apply(self, x, y, on)
                else:  # the delta's effect scaled: linear in W, so merged and unmerged agree
                    y = y + weight * (delta.apply(self, x, y, True) - y)
        return y

    # -- what the fused path and CUDA graphs ask --------------------------------------------------
    def fused_weight(self):
        """The weight the fused kernels use (see ``Geometry.fused_weight``), or None."""
        return self.geometry.fused_weight(self)

    def fused_projection(self):
        """``(W, bias, [(A, B, scale), ...])`` of the active unmerged deltas for the fused kernels, or
        None where they do not apply (a trainable or unsupported base, a delta without a low-rank form
        in this mode, an inactive delta that still changes the output)."""
        weight = self.geometry.fused_weight(self)
        if weight is None or getattr(weight, "requires_grad", False):
            return None
        on = self.active if self.enabled else []
        for name, delta in self.deltas.items():
            if delta.changes_base and name not in on and name not in self.merged:
                return None  # it gives its part of W back: the plain forward does that
        factors = []
        for name in on:
            if name in self.merged or name not in self.deltas:
                continue
            low_rank = self.deltas[name].low_rank(self.training)
            if low_rank is None:
                return None
            strength = self.weights.get(name, 1.0)
            if strength != 1.0:
                if len(low_rank) != 3:  # an output scale (DoRA) does not scale linearly: the plain forward
                    return None
                low_rank = (low_rank[0], low_rank[1], low_rank[2] * strength)
            factors.append(low_rank)
        return weight, getattr(self, "bias", None), factors

    def state_signature(self) -> tuple:
        """What a CUDA-graph capture of this layer depends on besides its tensors."""
        return (self.enabled, tuple(self.merged), self.forward_impl,
                tuple((n, self.deltas[n].signature(), self.weights.get(n, 1.0)) for n in self.active if n in self.deltas))

    def extra_repr(self) -> str:
        return f"{type(self.base_module).__name__}, active={self.active}, merged={self.merged}"
