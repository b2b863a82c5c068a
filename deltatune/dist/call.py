"""ModelCall: the root module a data-parallel run wraps, whose forward runs any function on the model.

FSDP2 gathers a module's parameters in the hooks of its ``forward`` and DDP arms its gradient
reduction there, but the training loss is not always ``model(**batch)``: the fused path
(``deltatune.fast.loss``) runs the decoder and then the output head's weight directly, and an
evaluation runs many forwards. ``ModelCall(model)(fn, *args)`` is ``fn(model, *args)`` run inside the
root's hooks, so whatever ``fn`` does with the model (outside the decoder blocks, which have their own
FSDP units) sees gathered parameters, and its backward is reduced.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["ModelCall", "call"]


class ModelCall(nn.Module):
    """``ModelCall(model)(fn, *args, **kwargs)`` returns ``fn(model, *args, **kwargs)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def call(root: nn.Module | None, model: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(model, *args, **kwargs)``, run inside ``root``'s hooks (a ``ModelCall`` under FSDP or DDP) when
    there is one. The arguments travel in a closure: the root's forward moves none of them."""
    if root is None:
        return fn(model, *args, **kwargs)
    return root(lambda m: fn(m, *args, **kwargs))
