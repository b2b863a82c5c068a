"""Per-call routing: which adapter each row of a batch uses, passed to the layers with the call.

Serving batches requests for different adapters together; ``set_active`` (model-wide, for training)
cannot express that. A ``Routing`` travels with one forward call instead: ``DeltaLayer.forward(x,
routing=...)`` applies each delta to the rows that ask for it. ``routed(model, rows)`` passes one to
every adapter layer of a model for the calls made inside it (keyword hooks removed on exit), so a
transformers model can be called unchanged. This is the plain reference; a stacked adapter pool
with a segmented kernel can take its place behind the same ``Routing`` later.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.surgery import delta_layers, list_adapters

__all__ = ["Routing", "routed"]


@dataclass(frozen=True)
class Routing:
    """The adapter of each batch row (dimension 0 of the layer inputs): a name, or None for the base."""

    rows: tuple[str | None, ...]

    def index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """Row indices that use adapter ``name`` (None when no row does)."""
        rows = [i for i, n in enumerate(self.rows) if n == name]
        return torch.tensor(rows, device=device) if rows else None

    def forward(self, layer: DeltaLayer, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with each row's own adapter applied (the base for rows routed to None)."""
        if layer.merged:
            raise ValueError(f"per-row routing needs unmerged adapters; {layer.merged} are merged into this layer")
        if x.shape[0] != len(self.rows):
            raise ValueError(f"routing gives {len(self.rows)} rows, the input has {x.shape[0]}")
        y = layer.geometry.base_forward(layer, x)
        for name, delta in layer.deltas.items():
            on = self.index(name, x.device)
            if on is not None:
                y = y.index_copy(0, on, delta.apply(layer, x[on], y[on], True))
            if delta.changes_base:  # rows not using it get back what it took out of the base
                off = torch.tensor([i for i, n in enumerate(self.rows) if n != name], device=x.device)
                if len(off):
                    y = y.index_copy(0, off, delta.apply(layer, x[off], y[off], False))
        return y


@contextlib.contextmanager
def routed(model: nn.Module, rows: list[str | None]):
    """Context in which every call of ``model`` applies adapter ``rows[i]`` to batch row ``i``.

    Raises KeyError for an adapter name the model does not have. Yields ``model``.
    """
    known = list_adapters(model)
    unknown = sorted({n for n in rows if n is not None and n not in known})
    if unknown:
        raise KeyError(f"routing names adapters {unknown} this model does not have (have {sorted(known)})")
    routing = Routing(tuple(rows))

    def pass_routing(module, args, kwargs):
        return args, {**kwargs, "routing": routing}

    handles = [layer.register_forward_pre_hook(pass_routing, with_kwargs=True) for _, layer in delta_layers(model)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
