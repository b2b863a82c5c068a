"""DDP over a prepared model: every process holds the whole model and the gradients of the trained
tensors are all-reduced (averaged) during the backward, bucket by bucket.

The wrapped module is a ``ModelCall`` root, so that the fused loss (which does not call the model's own
forward) still runs inside DDP's forward and arms its reduction. The frozen base's buffers (a
quantized base's 4-bit codes) are equal on every process and never change, so they are broadcast
once, at the start, not at each forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.dist.call import ModelCall
from deltatune.dist.setup import World

__all__ = ["replicate"]


def replicate(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(ModelCall(model))`` on ``device``; rank 0's tensors are broadcast to all."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(ModelCall(model), device_ids=ids, forward_sync_buffers=False)
