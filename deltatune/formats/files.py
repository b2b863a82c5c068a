"""Adapter directories: ``save_adapter`` / ``load_adapter`` in PEFT's format (or deltatune's own, for
methods PEFT lacks), through the neutral description (``deltatune.adapters.description``).

Files are written to a temporary name and renamed, so a crash never leaves half a file; pickle files
(``adapter_model.bin``) are refused, never opened. Loading checks every key and shape against the
model before touching it; on any error the model is left as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.adapters import (
    FULL, FullCopies, DeltaLayer, Method, ModelMethod, adapter_params, add_adapter, adapter_record, describe_adapter,
    geometry_for, load_description, matches_name, method_for, remove_adapter, select_targets,
)
from deltatune.adapters.targeting import has_module
from deltatune.formats import adapterhub, kohya, native, peft, peft_prompt
from deltatune.formats.atomic import atomic_write

__all__ = ["save_adapter", "load_adapter", "read_adapter_files", "AdapterFileError", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory or file that cannot be read; the message names the file and the key."""


def _format_of(method_name: str):
    return peft if method_name in peft.METHODS else native


# -- writing -----------------------------------------------------------------------------------------
def _plain_module_names(model: nn.Module) -> list[str]:
    """Module names as they are in the base model (no adapter internals, no copies)."""
    names, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, DeltaLayer):
            skip.append(name + ".deltas")
        if isinstance(module, FullCopies):
            skip.append(name + ".copies")
        names.append(name)
    return names


def _target_list(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest target list PEFT resolves to exactly ``paths``: leaf names if that is exact."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    hit = {n for n in _plain_module_names(model) if n and matches_name(n, leaves)}
    return leaves if hit == set(paths) else sorted(paths)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under its file format's keys (contiguous, on the CPU)."""
    fmt = _format_of(type(adapter_record(model).configs[name]).method)
    parts = describe_adapter(model, name)
    if peft_prompt.carries(adapter_record(model).configs[name]):  # virtual tokens: PEFT's prompt-learning keys
        return peft_prompt.state_dict(parts)
    order = sorted(parts, key=lambda p: parts[p].method == FULL)  # the method's tensors first, then copies
    return {fmt.file_key(path, parts[path].method, parts[path].geometry, role): t.contiguous().cpu()
            for path in order for role, t in parts[path].tensors.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *, base_model: str | None = None,
                 task: str | None = None, revision: str | None = None, format: str = "peft",
                 component: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to directory ``path``; returns the directory.

    LoRA adapters are written in PEFT's format (PEFT loads them); other methods in deltatune's own.
    ``base_model`` (a hub id or a local directory; default: the model's ``name_or_path``, as PEFT
    records it), ``task`` ("causal-lm" or "classification"; default: from the model's class) and
    ``revision`` are recorded so that PEFT's ``AutoPeftModelFor*.from_pretrained(path)`` finds the base.
    ``format="kohya"`` writes the kohya / LyCORIS file ``path`` instead (LoRA, LoHa, LoKr of a Stable
    Diffusion ``component``: "unet", "text_encoder", "text_encoder_2"; ``metadata`` such as ``ss_*``
    recorded; other components already in the file kept; ``formats/kohya.py``); returns the file.
    ``format="adapterhub"`` writes a bottleneck adapter as AdapterHub's ``adapters`` library saves one
    (``adapter_config.json`` + ``adapter.safetensors``; ``formats/adapterhub.py``).
    """
    from safetensors.torch import save_file

    if format == "kohya":
        try:
            return kohya.save_for_model(model, path, name, component=component, metadata=metadata)
        except ValueError as e:
            raise AdapterFileError(str(e)) from None
    if format == "adapterhub":
        try:
            return adapterhub.write_adapterhub(model, path, name)
        except ValueError as e:
            raise AdapterFileError(str(e)) from None
    if format != "peft":
        raise ValueError(f"format {format!r}: expected 'peft' (PEFT's or deltatune's directory), 'kohya' or "
                         f"'adapterhub'")
    configs = adapter_record(model).configs
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(configs)})")
    cfg = configs[name]
    if peft_prompt.carries(cfg):
        base_model = base_model if base_model is not None else getattr(model, "name_or_path", None) or None
        file_cfg = peft_prompt.to_peft_config(model, cfg, describe_adapter(model, name), base_model,
                                              peft.task_type(task, type(model).__name__), revision)
    elif type(cfg).method in peft.METHODS:
        parts = describe_adapter(model, name)
        paths = [p for p, part in parts.items() if part.method != FULL]
        base_model = base_model if base_model is not None else getattr(model, "name_or_path", None) or None
        file_cfg = peft.to_peft_config(cfg, parts, _target_list(model, paths), base_model=base_model,
                                       task=peft.task_type(task, type(model).__name__), revision=revision)
    else:
        file_cfg = native.to_native_config(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, name)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(file_cfg, indent=2, sort_keys=True)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out


# -- reading -----------------------------------------------------------------------------------------
def read_adapter_files(path: str | os.PathLike):
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
        if native.METHOD_KEY in raw and "peft_type" not in raw:
            cfg = native.from_native_config(raw, source=str(config_path))
        elif raw.get("peft_type") in peft_prompt.PEFT_TYPES:
            cfg = peft_prompt.from_peft_config(raw, source=str(config_path))
        else:
            cfg = peft.from_peft_config(raw, source=str(config_path))
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


def _expected(model: nn.Module, cfg, fmt, config_path: Path) -> tuple[dict, dict]:
    """{file key: (module path, role, shape, settings)} of the method's tensors and of full copies."""
    method = method_for(cfg)
    try:  # targets=None: no layer of its own (a pattern without LoRA), only modules_to_save
        targets = [] if cfg.targets is None else select_targets(model, cfg, method.supports)
    except ValueError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    expected = {}
    for target in targets:
        module = model.get_submodule(target)
        geometry = geometry_for(module)
        base = module.base_module if isinstance(module, DeltaLayer) else module
        try:
            shapes = method.shapes(geometry, base, cfg, target)
        except ValueError as e:
            raise AdapterFileError(f"{config_path}: module {target!r}: {e}") from None
        settings = method.settings(cfg, target)
        for role, shape in shapes.items():
            expected[fmt.file_key(target, method.name, geometry.name, role)] = (target, role, tuple(shape), settings)
    return expected, _copies(model, cfg, fmt)


def _copies(model: nn.Module, cfg, fmt) -> dict:
    """{file key: (module path, key, shape, {})} of the config's modules_to_save copies."""
    copies = {}
    if cfg.modules_to_save:
        for n, m in model.named_modules():
            if n and matches_name(n, cfg.modules_to_save) and not isinstance(m, DeltaLayer):
                base = m.base_module if isinstance(m, FullCopies) else m
                for k, v in base.state_dict().items():
                    copies[fmt.file_key(n, FULL, "", k)] = (n, k, tuple(v.shape), {})
    return copies


def _model_expected(model: nn.Module, cfg, method, fmt, config_path: Path) -> dict:
    """{file key: (module path, role, shape, {})} of a model-level method's tensors (``model_shapes``:
    modules it creates itself, such as new decoder blocks)."""
    try:
        shapes = method.model_shapes(model, cfg)
    except ValueError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    return {fmt.file_key(path, method.name, "", role): (path, role, tuple(shape), {})
            for path, roles in shapes.items() for role, shape in roles.items()}


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True,
                 trainable: bool = False, *, component: str | None = None, format: str | None = None) -> nn.Module:
    """Load an adapter directory (PEFT-made or ours) from ``path`` as adapter ``name``.

    Everything is checked before the model is touched: every key must name a module the model has,
    with the shape the config and the module give; on any error the model is left as it was.
    With ``trainable=False`` the loaded parameters do not require grad. AdapterHub's bottleneck
    adapters (saved with safetensors) load too (``formats/adapterhub.py``). A ``.safetensors`` file
    (or ``format="kohya"``) is read as a kohya / LyCORIS file: the modules of ``component`` ("unet",
    "text_encoder", "text_encoder_2"; default: from the model's class) are applied, the others counted
    in a ``KohyaSkipped`` warning (``formats/kohya.py``). Returns ``model``.
    """
    if format == "kohya" or (format is None and Path(path).suffix == ".safetensors" and not Path(path).is_dir()):
        try:
            cfg, parts, _ = kohya.parts_for_model(model, path, component)
        except ValueError as e:
            raise AdapterFileError(str(e)) from None
        return _add_and_load(model, cfg, name, parts, activate, trainable)
    if adapterhub.is_adapterhub_dir(path):
        try:
            cfg, parts = adapterhub.read_adapterhub(model, path)
        except ValueError as e:
            raise AdapterFileError(str(e)) from None
        return _add_and_load(model, cfg, name, parts, activate, trainable)
    cfg, tensors, weights_path = read_adapter_files(path)
    config_path = Path(path) / CONFIG_NAME
    if peft_prompt.carries(cfg):
        if cfg.modules_to_save:  # PEFT adds its defaults ("classifier", "score") whether the model has them or not
            names = [n for n, _ in model.named_modules() if n]
            kept = [s for s in dict.fromkeys(cfg.modules_to_save) if any(n == s or n.endswith("." + s) for n in names)]
            cfg = cfg.replace(modules_to_save=kept or None)
        parts = _virtual_token_parts(model, cfg, tensors, weights_path, config_path)
        return _add_and_load(model, cfg, name, parts, activate, trainable)
    fmt = _format_of(type(cfg).method)
    method = method_for(cfg)
    if isinstance(method, ModelMethod) and not isinstance(method, Method):  # new blocks: shapes from the whole model
        expected, copies = _model_expected(model, cfg, method, fmt, config_path), _copies(model, cfg, fmt)
    else:
        expected, copies = _expected(model, cfg, fmt, config_path)
    for key, value in tensors.items():
        if key in expected or key in copies:
            target, _, shape, settings = expected.get(key) or copies[key]
            if tuple(value.shape) != shape:
                at = ", ".join(f"{k} {v}" for k, v in settings.items())
                kind = type(model.get_submodule(target)).__name__ if has_module(model, target) else "to be created"
                raise AdapterFileError(
                    f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, but module {target!r} "
                    f"({kind})" + (f" with {at}" if at else "")
                    + f" from {config_path.name} needs {shape}")
            continue
        split = fmt.split_key(key)
        if split is None:
            raise AdapterFileError(f"{weights_path}: key {key!r} is not a key of this adapter format")
        module_path, role = split
        if role is None:
            raise AdapterFileError(f"{weights_path}: key {key!r} is neither an adapter tensor nor part of a "
                                   f"modules_to_save module of this model")
        try:
            model.get_submodule(module_path)
            why = "is not among the modules the config's target_modules select"
        except AttributeError:
            why = "is not a module of this model"
        raise AdapterFileError(f"{weights_path}: key {key!r}: module {module_path!r} {why}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFileError(f"{weights_path}: no tensor for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                               f"({len(missing)} keys the config's target_modules call for)")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, (module_path, role, _, _) in {**expected, **copies}.items():
        if key in tensors:
            parts.setdefault(module_path, {})[role] = tensors[key]
    return _add_and_load(model, cfg, name, parts, activate, trainable)


def _add_and_load(model: nn.Module, cfg, name: str, parts: dict, activate: bool, trainable: bool) -> nn.Module:
    """Add adapter ``name`` and copy the checked ``{module path: {role: tensor}}`` into it."""
    add_adapter(model, cfg, name, activate=activate)
    try:
        load_description(model, name, parts)
    except BaseException:
        remove_adapter(model, name)
        raise
    if not trainable:
        for p in adapter_params(model, name):
            p.requires_grad_(False)
    return model


def _virtual_token_parts(model: nn.Module, cfg, tensors: dict, weights_path: Path, config_path: Path) -> dict:
    """A prompt-learning file's tensors checked against the model: ``prompt_embeddings`` with the shape
    the config gives on this model, the encoder's weights all or none, full copies of real modules."""
    from deltatune.adapters.virtual_tokens import ATTRIBUTE  # where the adapter's module sits on the model

    try:
        shapes = method_for(cfg).model_shapes(model, cfg)
    except ValueError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    own: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        split = peft_prompt.split_key(key)
        if split is None:
            raise AdapterFileError(f"{weights_path}: key {key!r} is not a key of a {cfg.method} adapter file")
        path, role = split
        if path:  # a modules_to_save copy
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise AdapterFileError(f"{weights_path}: key {key!r}: module {path!r} is not a module of this model") from None
            base = module.base_module if isinstance(module, FullCopies) else module
            if not cfg.modules_to_save or not matches_name(path, cfg.modules_to_save) or role not in base.state_dict():
                raise AdapterFileError(f"{weights_path}: key {key!r} is not part of a modules_to_save module of this model")
            parts.setdefault(path, {})[role] = value
            continue
        if role not in shapes:
            raise AdapterFileError(f"{weights_path}: key {key!r}: a {cfg.method} adapter has no tensor {role!r} "
                                   f"(it has {sorted(shapes)})")
        if tuple(value.shape) != tuple(shapes[role]):
            raise AdapterFileError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, but {cfg.method} with "
                                   f"{cfg.num_virtual_tokens} virtual tokens on {type(model).__name__} from "
                                   f"{config_path.name} needs {tuple(shapes[role])}")
        own[role] = value
    if peft_prompt.OUTPUT not in own:
        raise AdapterFileError(f"{weights_path}: no tensor {peft_prompt.OUTPUT!r} (the virtual tokens)")
    encoder = set(shapes) - {peft_prompt.OUTPUT}
    if set(own) - {peft_prompt.OUTPUT} and encoder - set(own):
        missing = sorted(peft_prompt.ENCODER_PREFIX + r for r in encoder - set(own))
        raise AdapterFileError(f"{weights_path}: the encoder's weights are incomplete: no {missing[:3]} (a file holds all "
                               f"of them or none)")
    parts[ATTRIBUTE] = own
    return parts
