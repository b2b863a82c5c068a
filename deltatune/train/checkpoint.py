"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory ``step-00000120/`` under ``<output>/checkpoints/`` holding

- ``trainable.safetensors``: every parameter that trains (adapter tensors, saved copies, or the
  whole model for full fine-tuning), by parameter name;
- ``optimizer.safetensors``: the optimizer's state tensors, plus CPU/CUDA RNG states;
- ``state.json``: step, data position, scheduler and grad-scaler state, optimizer hyperparameters,
  Python and NumPy RNG states, and whatever the trainer adds.

Under FSDP (``deltatune.dist``) every process gathers the whole tensors of its shards and process 0
alone writes them, so a checkpoint is the same files whatever the number of processes that wrote it,
and any number can load it (each cuts its own shard back out).

It is written into a hidden temporary directory, every file fsync'ed, then renamed into place
(``rename`` of a directory is atomic on POSIX), so a directory named ``step-*`` is always complete;
a kill during the write leaves only a temporary directory, which the next run removes. Old
checkpoints are renamed away before they are deleted, for the same reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from deltatune.dist import full_tensor, shard_like

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "clean_stale",
           "trainable_state", "CheckpointError", "run_lock", "remove_if_only_lock"]

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that require grad, by name (tied parameters once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))
    _fsync(path)


# -- optimizer and RNG state as tensors + JSON --------------------------------------------------------
def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors by "state.<param>.<key>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# -- directories ----------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


@contextlib.contextmanager
def run_lock(out: str | Path):
    """Hold an exclusive lock on run directory ``out`` for the duration of the block.

    Two trainings writing one directory would interleave their metrics and prune each other's
    checkpoints; the second one raises ``CheckpointError`` instead, naming the holder's pid. The lock
    is the kernel's (``flock``): it goes with the process, so a killed run never leaves it behind.
    """
    path = Path(out) / ".lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise CheckpointError(f"{out} is in use by another training (pid {holder}); wait for it to end, "
                                  f"or choose another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def remove_if_only_lock(out: str | Path) -> bool:
    """Remove run directory ``out`` if it holds nothing but the ``.lock`` file; returns whether it did."""
    out = Path(out)
    try:
        if {p.name for p in out.iterdir()} <= {".lock"}:
            shutil.rmtree(out)
            return True
    except OSError:
        pass
    return False


def clean_stale(root: str | Path) -> list[Path]:
    """Remove temporary and half-deleted directories left by a killed run; returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)  # atomic: the step-* name disappears at once
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler=None, scaler=None, extra: dict | None = None, keep: int = 3, write: bool = True) -> Path:
    """Write checkpoint ``step`` atomically under ``root``, keep the newest ``keep``; returns its path.

    ``extra`` (JSON-able: data position, metrics) is stored in ``state.json``. Sharded tensors are
    gathered whole (every process of a data-parallel run must call this); ``write=False`` (every
    process but rank 0) only takes part in the gathering and writes nothing.
    """
    root = Path(root)
    trainable = {n: full_tensor(p) for n, p in trainable_state(model).items()}
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    opt_tensors = {k: full_tensor(v) for k, v in opt_tensors.items()}
    if not write:
        return root / f"step-{step:08d}"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(tmp / "trainable.safetensors", trainable)
    rng_tensors, rng_meta = _rng_state()
    _save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **rng_tensors})
    state = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_meta,
        **(extra or {}),
    }
    _write_json(tmp / "state.json", state)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. a signal right after a scheduled save)
        _discard(final)
    os.rename(tmp, final)
    _fsync(root)
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _discard(old)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, scaler=None, restore_rng: bool = True) -> dict:
    """Load checkpoint ``path`` into the given objects (in place); returns its ``state.json`` dict.

    Raises CheckpointError if the checkpoint's trainable parameters differ from ``model``'s.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / "trainable.safetensors"))
    params = trainable_state(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{path}: trainable parameters differ from the model's (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was the run started with other method settings?")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(shard_like(saved[name], p))
    tensors = load_file(str(path / "optimizer.safetensors"))
    if optimizer is not None:
        sd = _join_optimizer(tensors, state["optimizer"])
        ordered = [p for g in optimizer.param_groups for p in g["params"]]  # the ids state_dict() numbers
        for pid, st in sd["state"].items():  # moments of a sharded parameter: this process's shard
            for key, value in st.items():
                if torch.is_tensor(value) and pid < len(ordered) and value.shape == ordered[pid].shape \
                        and value.ndim > 0:
                    st[key] = shard_like(value, ordered[pid])
        optimizer.load_state_dict(sd)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        _set_rng_state(tensors, state["rng"])
    return state
