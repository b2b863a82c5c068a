"""The adapter protocol: what every module that carries named adapters answers, whatever the method.

Weight wrappers (``DeltaLayer``), full trainable copies (``FullCopies``) and, later, modules that are
not weight wrappers (prompts, prefixes, new blocks, bottleneck modules) all implement it, so the
verbs (``add_adapter``, ``merge``, ``save_adapter``, ...) and the training loop walk one kind of
object. Modelled on torchtune's ``AdapterModule``; ``runtime_checkable`` so ``isinstance`` works.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["AdapterModule", "adapter_modules", "batch_preparers", "prepare_batch"]


@runtime_checkable
class AdapterModule(Protocol):
    """A module holding any number of named adapters.

    ``active`` lists the adapters applied in ``forward``, ``merged`` those folded into the base weight,
    ``enabled=False`` gives the base module's behaviour.
    """

    active: list[str]
    merged: list[str]
    enabled: bool

    def adapter_names(self) -> list[str]:
        """Names of the adapters this module holds."""

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        """Parameters of adapter ``name`` (all adapters if None), only those of ``role`` if given."""

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (unmerging it first)."""

    def restore(self) -> nn.Module:
        """The original module, carrying this module's current base tensors (when no adapter is left)."""

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (idempotent; a no-op where nothing can be folded)."""

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the base weight (idempotent)."""

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors by role (``{"A": ..., "B": ...}``): what file formats read."""

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (by role, as ``describe`` gives them) into adapter ``name``."""


_METHODS = ("adapter_names", "adapter_parameters", "remove", "restore", "merge", "unmerge", "describe", "load_roles")


@functools.lru_cache(maxsize=None)
def _may_be_adapter(cls: type) -> bool:
    """Whether instances of ``cls`` can satisfy the protocol: its methods are the class's. A cheap
    per-type filter before ``isinstance``, whose protocol check costs microseconds a module (a UNet
    plus CLIP has thousands, walked once per micro-batch by ``prepare_batch``)."""
    return all(callable(getattr(cls, m, None)) for m in _METHODS)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """``(path, module)`` of every adapter module of ``model``, in ``named_modules()`` order.

    Adapter modules are not searched inside (a full copy of a module is no separate adapter module),
    except those with ``nests_adapters = True`` (a bottleneck block, whose children are the base's own).
    """
    inside = None  # path of the adapter module being skipped over, with a trailing dot
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if _may_be_adapter(type(module)) and isinstance(module, AdapterModule):
            if not getattr(module, "nests_adapters", False):
                inside = path + "."
            yield path, module


def batch_preparers(model: nn.Module) -> list[Callable[[dict], dict]]:
    """The ``prepare_batch(batch) -> batch`` methods of ``model``'s adapter modules that change the input
    (prompt tuning, prefixes), in ``adapter_modules`` order: what ``prepare_batch`` applies. A caller
    preparing many batches of a model whose adapters stay put (the training loop) lists them once: the
    walk over the model costs about a millisecond a call for a 6-layer encoder."""
    return [prepare for _, module in adapter_modules(model)
            if (prepare := getattr(module, "prepare_batch", None)) is not None]


def prepare_batch(model: nn.Module, batch: dict, preparers: list[Callable[[dict], dict]] | None = None) -> dict:
    """The collated ``batch`` as the model's adapters need it: each adapter module that changes the
    input (a ``prepare_batch(batch) -> batch`` method: prompt tuning, prefixes) transforms it in turn.
    Weight adapters leave it as it is. ``preparers``: ``batch_preparers(model)`` listed beforehand."""
    for prepare in batch_preparers(model) if preparers is None else preparers:
        batch = prepare(batch)
    return batch
