"""Adapter files in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT: ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``, no ``.weight``), and ``base_model.model.<path>.<param>``
for ``modules_to_save`` copies. Files are written to a temporary name and renamed, so a crash never
leaves half a file; pickle files (``adapter_model.bin``) are refused, never opened.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.config import LoraConfig
from deltatune.lora import LoraLayer, kind_for
from deltatune.model import (
    _registry, _saved_copies, adapter_params, add_adapter, lora_layers, matches_name, pattern_value, remove_adapter,
    select_targets,
)
from deltatune.saved import SavedCopies

__all__ = ["save_adapter", "load_adapter", "AdapterFileError", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter directory or file that cannot be read; the message names the file and the key."""


# -- writing -----------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain_module_names(model: nn.Module) -> list[str]:
    """Module names as they are in the base model (no adapter internals, no copies)."""
    names, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, LoraLayer):
            skip.append(name + ".lora_")
        if isinstance(module, SavedCopies):
            skip.append(name + ".copies")
        names.append(name)
    return names


def _target_list(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest target list PEFT resolves to exactly ``paths``: leaf names if that is exact."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    hit = {n for n in _plain_module_names(model) if n and matches_name(n, leaves)}
    return leaves if hit == set(paths) else sorted(paths)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's file keys."""
    state = {}
    for path, layer in lora_layers(model):
        if name in layer.slots:
            key_a, key_b = layer.kind.peft_keys
            state[f"{PREFIX}{path}.{key_a}"] = layer.lora_A[name].detach()
            state[f"{PREFIX}{path}.{key_b}"] = layer.lora_B[name].detach()
    for path, saved in _saved_copies(model):
        if name in saved.copies:
            for key, value in saved.copies[name].state_dict().items():
                state[f"{PREFIX}{path}.{key}"] = value.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` to directory ``path`` in PEFT's format; returns the directory."""
    from safetensors.torch import save_file

    reg = _registry(model)
    if name not in reg["configs"]:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(reg['configs'])})")
    cfg = reg["configs"][name]
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.slots]
    paths = [p for p, _ in layers]
    # Write each module's actual rank and alpha where they differ from the global ones, keyed by
    # its full path: exact whatever patterns (or combine()) produced them.
    rank_pattern = {p: layer.slots[name].rank for p, layer in layers if layer.slots[name].rank != cfg.r}
    alpha_pattern = {p: layer.slots[name].alpha for p, layer in layers if layer.slots[name].alpha != cfg.alpha}
    saved = sorted({p.rsplit(".", 1)[-1] for p, s in _saved_copies(model) if name in s.copies})
    peft_cfg = cfg.replace(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                           modules_to_save=saved or None).to_peft(_target_list(model, paths))
    peft_cfg["exclude_modules"] = None  # the target list is already exact

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, name)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_cfg, indent=2, sort_keys=True)
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out


# -- reading -----------------------------------------------------------------------------------------
def read_adapter_files(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """Read and check an adapter directory: (config, tensors by file key, weights file path)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise AdapterFileError(f"{root}: no such adapter directory")
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = LoraConfig.from_peft(raw, source=str(config_path))
    except (ValueError, TypeError) as e:
        raise AdapterFileError(str(e)) from None
    if not weights_path.is_file():
        pickled = [p.name for p in (root / "adapter_model.bin", root / "adapter_model.pt") if p.exists()]
        if pickled:
            raise AdapterFileError(
                f"{root / pickled[0]}: pickle files are never loaded (they can run code); convert it to "
                f"{WEIGHTS_NAME} with a tool you trust, then load that")
        raise AdapterFileError(f"{weights_path}: missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterFileError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return cfg, tensors, weights_path


def _split_key(key: str, weights_path: Path) -> tuple[str, str]:
    """(module path, PEFT suffix) of a file key; raises naming the key if it is not PEFT's form."""
    if not key.startswith(PREFIX):
        raise AdapterFileError(f"{weights_path}: key {key!r} does not start with {PREFIX!r}")
    rest = key[len(PREFIX):]
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"):
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return rest, ""


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True,
                 trainable: bool = False) -> nn.Module:
    """Load a PEFT-format adapter (made by PEFT or deltatune) from ``path`` as adapter ``name``.

    Everything is checked before the model is touched: every key must name a module the model has,
    with the shape the config and the module give; on any error the model is left as it was.
    With ``trainable=False`` the loaded parameters do not require grad. Returns ``model``.
    """
    cfg, tensors, weights_path = read_adapter_files(path)
    config_path = Path(path) / CONFIG_NAME
    try:
        targets = select_targets(model, cfg)
    except ValueError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    lora_keys, saved_keys = {}, {}
    for key, value in tensors.items():
        module_path, suffix = _split_key(key, weights_path)
        (lora_keys if suffix else saved_keys)[key] = (module_path, suffix, value)

    expected = {}
    for target in targets:
        module = model.get_submodule(target)
        kind = module.kind if isinstance(module, LoraLayer) else kind_for(module)
        base = module.base_module if isinstance(module, LoraLayer) else module
        rank = int(pattern_value(target, cfg.rank_pattern, cfg.r))
        try:
            a_shape, b_shape = kind.lora_shapes(base, rank)
        except ValueError as e:
            raise AdapterFileError(f"{config_path}: module {target!r}: {e}") from None
        key_a, key_b = kind.peft_keys
        expected[f"{PREFIX}{target}.{key_a}"] = (target, tuple(a_shape), rank)
        expected[f"{PREFIX}{target}.{key_b}"] = (target, tuple(b_shape), rank)
    for key, (module_path, suffix, value) in lora_keys.items():
        if key not in expected:
            try:
                model.get_submodule(module_path)
                why = "is not among the modules the config's target_modules select"
            except AttributeError:
                why = "is not a module of this model"
            raise AdapterFileError(f"{weights_path}: key {key!r}: module {module_path!r} {why}")
        target, shape, rank = expected[key]
        if tuple(value.shape) != shape:
            raise AdapterFileError(
                f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, but module {target!r} "
                f"({type(model.get_submodule(target)).__name__}) with rank {rank} from {config_path.name} needs {shape}")
    missing = sorted(set(expected) - set(lora_keys))
    if missing:
        raise AdapterFileError(f"{weights_path}: no tensor for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                               f"({len(missing)} keys the config's target_modules call for)")
    saved_paths = {}
    if cfg.modules_to_save:
        for n, m in model.named_modules():
            if n and matches_name(n, cfg.modules_to_save) and not isinstance(m, LoraLayer):
                base = m.base_module if isinstance(m, SavedCopies) else m
                for k, v in base.state_dict().items():
                    saved_paths[f"{PREFIX}{n}.{k}"] = (n, k, tuple(v.shape))
    for key, (module_path, _, value) in saved_keys.items():
        if key not in saved_paths:
            raise AdapterFileError(f"{weights_path}: key {key!r} is neither a LoRA tensor nor part of a "
                                   f"modules_to_save module of this model")
        if tuple(value.shape) != saved_paths[key][2]:
            raise AdapterFileError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, "
                                   f"module {saved_paths[key][0]!r} needs {saved_paths[key][2]}")

    add_adapter(model, cfg, name, activate=activate)
    try:
        with torch.no_grad():
            for key, (target, _, _) in expected.items():
                layer = model.get_submodule(target)
                param = layer.lora_A[name] if key.endswith(("lora_A.weight", "lora_embedding_A")) else layer.lora_B[name]
                param.copy_(lora_keys[key][2])
            by_module = {}
            for key, (module_path, param, _) in saved_paths.items():
                if key in saved_keys:
                    by_module.setdefault(module_path, {})[param] = saved_keys[key][2]
            for module_path, state in by_module.items():
                model.get_submodule(module_path).copies[name].load_state_dict(state, strict=True)
    except BaseException:
        remove_adapter(model, name)
        raise
    if not trainable:
        for p in adapter_params(model, name):
            p.requires_grad_(False)
    return model
