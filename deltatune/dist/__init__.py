"""Data-parallel training over several processes with PyTorch's own FSDP2 (``fully_shard``) and DDP.

``torchrun --nproc-per-node N -m deltatune.cli train ...`` starts N processes; each calls
``init_world`` (which reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK), takes its slice of every
step's micro-batches and wraps the prepared model in a ``ModelCall`` root that is sharded (``fsdp``)
or replicated (``ddp``). This package knows nothing of the training loop: ``deltatune.train``
uses it.

    setup.py   World: rank, size, backend; init_world / close_world; sums and flags across ranks
    call.py    ModelCall: the root module whose forward runs any function on the model (the loss,
               an evaluation) inside the wrapper's hooks
    fsdp.py    shard(): fully_shard per decoder block, then the root; gathered() for saving
    ddp.py     replicate(): DistributedDataParallel over the root
    state.py   sharded <-> full tensors (checkpoints), gradient sync on/off across micro-batches
"""

from deltatune.dist.call import ModelCall, call
from deltatune.dist.setup import World, close_world, env_world_size, init_world
from deltatune.dist.state import full_tensor, gathered, grad_sync, shard_like

__all__ = ["World", "init_world", "close_world", "env_world_size", "ModelCall", "call", "full_tensor", "shard_like", "grad_sync", "gathered",
           "wrap"]


def wrap(model, sharding: str, world: World, device, param_dtype=None):
    """``model`` (the method applied, the fast path switched on) inside a ``ModelCall`` root that is
    sharded with FSDP2 (``sharding="fsdp"``) or replicated with DDP (``"ddp"``); returns the root.
    ``param_dtype``: FSDP's compute dtype of the parameters (None: as stored); gradients reduce in fp32."""
    if sharding == "fsdp":
        from deltatune.dist.fsdp import shard

        return shard(model, world, param_dtype=param_dtype)
    if sharding == "ddp":
        from deltatune.dist.ddp import replicate

        return replicate(model, world, device)
    raise ValueError(f"sharding must be 'fsdp' or 'ddp', got {sharding!r}")
