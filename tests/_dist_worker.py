"""Run by tests/test_dist.py under ``python -m torch.distributed.run --nproc-per-node 2``: trains the
tiny Llama through the Python API once per --sharding given, in one process group (gloo, CPU) that the
script opens itself (``train`` then joins it and leaves it open).

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py SETTINGS_JSON OUT_ROOT ddp fsdp
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

import deltatune as dt
from deltatune.train import DataArgs, TrainArgs, train


def main(settings: str, root: str, *shardings: str) -> None:
    flat = json.loads(Path(settings).read_text())
    parts = (TrainArgs, DataArgs, dt.LoraConfig)
    names = [set(cls.__dataclass_fields__) for cls in parts]
    dist.init_process_group("gloo")
    for sharding in shardings:
        flat = {**flat, "sharding": sharding, "output": str(Path(root) / sharding)}
        args, data, lora = (cls(**{k: v for k, v in flat.items() if k in n}) for cls, n in zip(parts, names))
        res = train(args, data, lora)
        assert res.status == "done", res.message
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
