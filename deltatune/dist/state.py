"""Sharded and full tensors, for checkpoints and saved adapters written by one process and loadable by
any number of them; gradient synchronisation across the micro-batches of a step.

Under FSDP2 a parameter (and the optimizer's moments) is a ``DTensor`` holding this process's shard;
``full_tensor`` gathers the whole tensor (a collective: every process calls it), ``shard_like`` cuts
a whole tensor back into this process's shard of a parameter. Plain tensors (one process, DDP) pass
through both unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

__all__ = ["full_tensor", "shard_like", "grad_sync", "gathered"]


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered from every process); any other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as a tensor laid out like ``like``: this process's shard (a DTensor) when ``like`` is one,
    else ``full`` itself. Each process cuts its own shard: no communication."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def grad_sync(root: nn.Module | None, on: bool):
    """Within the block, reduce gradients across processes (``on``) or only accumulate them locally
    (every micro-batch of a step but the last). ``root``: the FSDP or DDP root, or None."""
    if root is None or on:
        if root is not None and hasattr(root, "set_requires_gradient_sync"):
            root.set_requires_gradient_sync(True)
        yield
    elif hasattr(root, "set_requires_gradient_sync"):  # FSDP2
        root.set_requires_gradient_sync(False)
        yield
    else:  # DDP
        with root.no_sync():
            yield


@contextlib.contextmanager
def gathered(root: nn.Module | None):
    """Within the block the model under an FSDP ``root`` holds whole, plain parameters (every unit is
    all-gathered; every process must enter), so it can be saved, merged or exported as a plain model.
    Costs the memory of the whole model on every process. No-op for None or a DDP root."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)] if root is not None else []
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
