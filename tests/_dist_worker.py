"""Run by tests/test_dist.py under ``python -m torch.distributed.run --nproc-per-node 2``: trains the
tiny Llama through the Python API once per --sharding given, in one process group (gloo, CPU) that the
script opens itself (``train`` then joins it and leaves it open).

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py SETTINGS_JSON OUT_ROOT ddp fsdp

With ``"shard_report": true`` in the settings the worker loads the model itself, hands it to ``train`` and
afterwards writes what each process holds of it to ``OUT_ROOT/<sharding>/shards-rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

import deltatune as dt
from deltatune.train import DataArgs, TrainArgs, train


def shard_report(model) -> dict:
    """{"params": {name: [local numel, whole numel, dtype]}} (a DTensor's local numel is this process's
    shard) and "hidden_whole_bytes": the bytes of plain (unsharded) tensors that the base modules
    wrapped by adapters (outside the module tree) still hold."""
    from torch.distributed.tensor import DTensor

    params = {n: [p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel(), str(p.dtype)]
              for n, p in model.named_parameters()}
    hidden = [t for m in model.modules() if isinstance(m, dt.DeltaLayer)
              for t in (*m.base_module._parameters.values(), *m.base_module._buffers.values())]
    whole = sum(t.numel() * t.element_size() for t in hidden if t is not None and not isinstance(t, DTensor))
    return {"params": params, "hidden_whole_bytes": whole}


def main(settings: str, root: str, *shardings: str) -> None:
    flat = json.loads(Path(settings).read_text())
    parts = (TrainArgs, DataArgs, dt.LoraConfig)
    names = [set(cls.__dataclass_fields__) for cls in parts]
    dist.init_process_group("gloo")
    for sharding in shardings:
        flat = {**flat, "sharding": sharding, "output": str(Path(root) / sharding)}
        args, data, lora = (cls(**{k: v for k, v in flat.items() if k in n}) for cls, n in zip(parts, names))
        if not flat.get("shard_report"):
            res = train(args, data, lora)
            assert res.status == "done", res.message
            continue
        from deltatune.hub import load_model

        model, tokenizer = load_model(args.model)
        res = train(args, data, lora, model=model, tokenizer=tokenizer)
        assert res.status == "done", res.message
        report = Path(args.output) / f"shards-rank{dist.get_rank()}.json"
        report.write_text(json.dumps(shard_report(model)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
