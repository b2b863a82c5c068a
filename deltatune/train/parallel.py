"""The training loop's data-parallel parts (``torchrun --nproc-per-node N -m deltatune.cli train``).

Every process runs the same loop on the same seeded data order (``data.sample_index``). A step's
global batch is ``--micro-batch x --grad-accum x N`` examples: the step's ``grad_accum x N``
micro-batches are the ones one process would take with ``--grad-accum`` N times larger, and process
r takes the r-th consecutive ``grad_accum`` of them (``World.mine``). The loss of a micro-batch is
divided by the targets of the whole global step (summed over processes), and multiplied by N because
FSDP and DDP average gradients over processes: the reduced gradient is then exactly the one process's
gradient of the same global batch. Dropout is seeded per global micro-batch, so that too is the same.

Process 0 alone writes files (checkpoints, metrics, outputs) and logs; a checkpoint holds whole
tensors, so ``--resume`` works with another number of processes as long as the global micro-batches
stay the same (``grad_accum x N`` unchanged).

Under FSDP a quantized base's codes and scales are held as float parameters so that they are sharded
too (``quant.store_as_float``, in FSDP's compute dtype), and the modules adapters wrap are pointed at
the shards (``release_wrapped``): each process keeps 1/N of the frozen base, 4-bit or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from deltatune.dist import World, wrap
from deltatune.train.args import TrainArgs, TrainError

__all__ = ["sharding_of", "wrap_model", "release_wrapped", "check_world", "world_size_of", "quiet"]


def sharding_of(args: TrainArgs, world: World) -> str:
    """What ``--sharding`` means in ``world``: "fsdp" or "ddp" over several processes, "none" for one."""
    if world.size == 1:
        return "none"
    if args.sharding == "none":
        raise TrainError(f"--sharding none with {world.size} processes would train {world.size} separate copies; "
                         f"use --sharding fsdp or ddp, or run one process")
    kind = "fsdp" if args.sharding == "auto" else args.sharding
    if kind == "fsdp" and args.merge:
        raise TrainError("--merge does not run under --sharding fsdp (process 0 would merge alone into weights "
                         "that FSDP has sharded over all processes); train without --merge, then run "
                         "deltatune merge --adapter <output>/adapter, or use --sharding ddp")
    return kind


def wrap_model(model: torch.nn.Module, args: TrainArgs, world: World, device: torch.device,
               log=print) -> Optional[torch.nn.Module]:
    """The FSDP or DDP root around the prepared ``model`` (None for one process). FSDP computes in the
    --precision dtype (bf16 / fp16 parameters, fp32 gradient reduction) and shards a quantized base's
    codes, held as float parameters of that dtype."""
    kind = sharding_of(args, world)
    if kind == "none":
        return None
    if getattr(args, "retention", None):
        raise TrainError("--retention is measured by one process on the whole model; it does not run under torchrun "
                         "yet: measure it afterwards with deltatune eval --retention")
    if kind == "fsdp" and args.cuda_graphs:
        raise TrainError("--cuda-graphs does not combine with --sharding fsdp (the graphs would replay parameters "
                         "that FSDP gathers and frees around each block); use --sharding ddp")
    if kind == "fsdp" and (args.optimizer_states != "param" or args.optimizer_bits != 32):
        raise TrainError("--sharding fsdp shards torch's AdamW (its states follow the shards); --optimizer-states "
                         "cpu/paged and --optimizer-bits 8 need --sharding ddp")
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if kind == "fsdp" else None
    if kind == "fsdp":
        from deltatune.quant import store_as_float

        store_as_float(model, param_dtype)  # FSDP shards parameters only: the 4-bit codes as float ones
    try:
        root = wrap(model, kind, world, device, param_dtype=param_dtype)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if kind == "fsdp":
        release_wrapped(model)
    log(f"{kind} over {world.size} processes ({world.backend}): global batch = {args.micro_batch} x "
        f"{args.grad_accum} x {world.size} examples" if not args.tokens_per_step else
        f"{kind} over {world.size} processes ({world.backend}): {args.tokens_per_step:,} padded tokens a global step")
    return root


def release_wrapped(model: torch.nn.Module) -> None:
    """Point the module each adapter layer or full-copies wrapper wraps (kept outside the module tree, so
    ``fully_shard`` never sees it) at the wrapper's tensors: after sharding, its shards. Else it holds the
    whole frozen tensors it was built with, and every process keeps the whole base (4-bit or not)."""
    from deltatune.adapters import DeltaLayer, FullCopies

    for m in model.modules():
        if isinstance(m, (DeltaLayer, FullCopies)):
            m.restore()  # for these two a pure re-pointing of the wrapped module's tensors


def world_size_of(checkpoint: Path) -> int:
    """The number of processes that trained up to ``checkpoint`` (1 for checkpoints that do not say)."""
    return int(json.loads((Path(checkpoint) / "state.json").read_text()).get("world_size", 1))


def check_world(saved: dict, checkpoint: Path, args: TrainArgs, world: World) -> dict:
    """``saved`` (the run's recorded settings) as ``check_resume`` should compare them when resuming
    ``checkpoint`` on ``world``: another number of processes is fine when ``grad_accum x processes`` (the
    step's micro-batches) is unchanged. Raises ``TrainError`` when it is not."""
    before = world_size_of(checkpoint)
    accum = saved.get("grad_accum", 1)
    if before == world.size:
        return saved
    if accum * before != args.grad_accum * world.size:
        raise TrainError(f"--resume on {world.size} processes of a run trained on {before} with --grad-accum {accum}: "
                         f"the global step would change; use --grad-accum {accum * before / world.size:g} "
                         f"(global batch = micro-batch x grad-accum x processes)")
    return {**saved, "grad_accum": args.grad_accum}



def quiet(*_args, **_kwargs) -> None:
    """The log of every process but process 0 of a data-parallel run: nothing."""
