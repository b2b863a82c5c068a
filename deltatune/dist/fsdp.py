"""FSDP2 over a prepared model: ``fully_shard`` on every decoder block, then on the ``ModelCall`` root.

Sharding comes after the method is applied (and the fast path switched on), so the frozen base and
the adapter's tensors of a block are one unit: all-gathered before the block's forward, freed after
it (and gathered again for its backward), gradients reduce-scattered to each process's shard. What is
left outside the blocks (embeddings, final norm, output head, a classification head) belongs to the
root's unit, gathered for the whole call. The optimizer then holds only this process's shard of every
trained tensor (DTensors), and so do its states.

Mixed precision: ``param_dtype`` (bf16 on a GPU run with ``--precision bf16``) is what the gathered
parameters compute in; the sharded fp32 adapter weights stay the master copy and gradients are
reduced in fp32.

FSDP shards parameters only, and casts every floating one to ``param_dtype``. The caller
(``deltatune.train.parallel``) therefore hands over a quantized base (``deltatune.quant``) with its 4-bit
codes and scales held as frozen float parameters whose bytes are the codes (``quant.store_as_float``,
stored in ``param_dtype`` so that no cast touches them): each process then holds 1/N of the 4-bit
base, and the layer views the gathered bytes back as uint8 in its forward, bit for bit the unsharded
layer. After ``shard`` it points the module each adapter wraps (kept outside the module tree, so
``fully_shard`` does not see it) at the shards, so that no process keeps the whole frozen base.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.dist.call import ModelCall
from deltatune.dist.setup import World

__all__ = ["decoder_blocks", "shard"]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: modules of the classes transformers lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ...), else the children of the largest ``nn.ModuleList`` of one class."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def shard(model: nn.Module, world: World, param_dtype: torch.dtype | None = None) -> ModelCall:
    """``fully_shard`` each decoder block of ``model`` and the ``ModelCall`` root around it (in place);
    returns the root. Raises ``ValueError`` for a model without repeated blocks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(f"--sharding fsdp: found no decoder blocks in {type(model).__name__} to shard "
                         f"(no _no_split_modules, no nn.ModuleList); use --sharding ddp")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    root = ModelCall(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    return root
