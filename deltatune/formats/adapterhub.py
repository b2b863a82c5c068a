"""AdapterHub (``adapters`` library) bottleneck adapters saved with safetensors: read into
``BottleneckConfig``, and written back (``write_adapterhub``, ``save_adapter(..., format="adapterhub")``).

AdapterHub's ``model.save_adapter(dir, name, use_safetensors=True)`` writes ``adapter_config.json``
(``{"config": {BnConfig fields}, "name", "model_class", "model_type", "hidden_size", "version":
"adapters.1.x"}``) and ``adapter.safetensors`` with keys
``<block path>.adapters.<name>.adapter_down.0.{weight,bias}`` / ``.adapter_up.{weight,bias}``, where the
block is a post-norm sublayer output (``encoder.layer.0.attention.output``, ``...layer.0.output``).
Its pickle file (``pytorch_adapter.bin``) is never opened.

Of AdapterHub's bottleneck configs, the ones deltatune computes identically are read: ``double_seq_bn``
(Houlsby), ``seq_bn`` (Pfeiffer) and ``par_bn`` (parallel), with any reduction factor, non-linearity
(relu / gelu / swish / silu / tanh), float scaling, dropout and init; anything else (adapter layer norms,
gating, PHM layers, learned scaling, per-layer reduction factors, ``leave_out``, invertible adapters)
is refused naming the field. Decoder models are refused: AdapterHub's hooks there add the adapter on
the residual stream, which is not where deltatune's decoder bottlenecks sit.

Writing is the inverse through the same tables (``_ROLE``, ``_REQUIRED``, ``_PLACEMENT_FLAGS``): the
config fields the reader reads (AdapterHub fills the rest with its defaults), ``"version":
"adapters.<format version>+deltatune"`` (without a version AdapterHub renames "gelu" to "gelu_new"),
and the tensors under the model's own module paths, as AdapterHub's ``save_adapter`` names them.
Adapters AdapterHub cannot express are refused naming what: another method, layer norm copies
(``train_layer_norms``), ``modules_to_save``, chosen ``targets`` / ``exclude``, decoder sites.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.adapters import FULL, adapter_record, describe_adapter, geometry_for, method_for, select_targets
from deltatune.formats.atomic import atomic_write
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.bottleneck_block import ACTIVATIONS, is_post_norm_output

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "FORMAT_VERSION", "is_adapterhub_dir",
           "from_adapterhub_config", "read_adapterhub", "to_adapterhub_config", "adapterhub_state_dict",
           "write_adapterhub"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"
FORMAT_VERSION = "1.3.0"
"""The ``adapters`` release whose file layout ``write_adapterhub`` writes (tests/test_adapterhub_parity.py)."""

_KEY = re.compile(r"^(?P<block>.+)\.adapters\.(?P<name>[^.]+)\.(?P<part>adapter_down\.0|adapter_up)\.(?P<kind>weight|bias)$")
_ROLE = {("adapter_down.0", "weight"): "down_weight", ("adapter_down.0", "bias"): "down_bias",
         ("adapter_up", "weight"): "up_weight", ("adapter_up", "bias"): "up_bias"}
_PART = {role: part for part, role in _ROLE.items()}
# BnConfig fields that must have these values (what deltatune's bottleneck computes)
_REQUIRED = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "inv_adapter": None,
             "cross_adapter": False, "original_ln_after": True, "residual_before_ln": True}
# placement: the BnConfig flags of AdapterHub's double_seq_bn (Houlsby), seq_bn (Pfeiffer), par_bn (parallel);
# a parallel adapter reads the sublayer's input, so its original_ln_before is never read
_PLACEMENT_FLAGS = {
    "houlsby": {"mh_adapter": True, "output_adapter": True, "original_ln_before": False, "is_parallel": False},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "original_ln_before": True, "is_parallel": False},
    "parallel": {"mh_adapter": False, "output_adapter": True, "is_parallel": True},
}


def _raw_config(path) -> dict | None:
    try:
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def is_adapterhub_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an AdapterHub adapter: its ``adapter_config.json`` has AdapterHub's layout."""
    raw = _raw_config(path)
    if raw is None or "peft_type" in raw or "deltatune_method" in raw or not isinstance(raw.get("config"), dict):
        return False
    return str(raw.get("version", "")).startswith("adapters.") or "mh_adapter" in raw["config"]


def from_adapterhub_config(raw: dict, source: str = CONFIG_NAME) -> BottleneckConfig:
    """The ``BottleneckConfig`` of an AdapterHub ``adapter_config.json``; ValueError naming ``source`` and
    the field where deltatune would compute something else."""
    c = raw.get("config") or {}
    if c.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise ValueError(f"{source}: an AdapterHub {c['architecture']!r} adapter; only bottleneck adapters are read")
    for key, want in _REQUIRED.items():
        if key in c and c[key] != want:
            raise ValueError(f"{source}: config.{key} = {c[key]!r} is not supported (deltatune reads AdapterHub's "
                             f"double_seq_bn, seq_bn and par_bn bottlenecks, which have {key} = {want!r})")
    if c.get("leave_out"):
        raise ValueError(f"{source}: config.leave_out = {c['leave_out']!r} is not supported")
    if c.get("stochastic_depth"):
        raise ValueError(f"{source}: config.stochastic_depth = {c['stochastic_depth']!r} is not supported")
    flags = {k: bool(c.get(k)) for k in ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel")}
    placement = next((p for p, want in _PLACEMENT_FLAGS.items() if all(flags[k] == v for k, v in want.items())), None)
    if placement is None:
        raise ValueError(f"{source}: {', '.join(f'{k}={v}' for k, v in flags.items())} is none of double_seq_bn "
                         f"(Houlsby), seq_bn (Pfeiffer) or par_bn (parallel)")
    factor = c.get("reduction_factor")
    if isinstance(factor, dict):
        if set(factor) != {"default"}:
            raise ValueError(f"{source}: per-layer config.reduction_factor {factor!r} is not supported")
        factor = factor["default"]
    scaling = c.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"{source}: config.scaling = {scaling!r} is not supported (a number only)")
    activation = str(c.get("non_linearity", "relu")).lower()
    if activation not in ACTIVATIONS:
        raise ValueError(f"{source}: config.non_linearity = {activation!r} is not supported "
                         f"(known: {sorted(ACTIVATIONS)})")
    try:
        return BottleneckConfig(placement=placement, reduction_factor=float(factor), activation=activation,
                                scaling=float(scaling), dropout=float(c.get("dropout", 0.0)),
                                init=c.get("init_weights", "bert"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _match(block: str, targets: list[str]) -> list[str]:
    """Our target paths that are AdapterHub's ``block`` up to a leading prefix on either side (the
    model's base-model prefix, "bert.")."""
    return [t for t in targets if t == block or t.endswith("." + block) or block.endswith("." + t)]


def read_adapterhub(model: nn.Module, path: str | os.PathLike) -> tuple[BottleneckConfig, dict]:
    """Read and check an AdapterHub adapter directory against ``model``: ``(config, {module path: {role:
    tensor}})``. Every key and shape is checked; ValueError naming the file and the key otherwise."""
    from safetensors.torch import load_file

    root = Path(path)
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    cfg = from_adapterhub_config(_raw_config(root) or {}, source=str(config_path))
    if not weights_path.is_file():
        if (root / PICKLE_NAME).exists():
            raise ValueError(f"{root / PICKLE_NAME}: pickle files are never loaded (they can run code); save the "
                             f"adapter with AdapterHub's save_adapter(..., use_safetensors=True)")
        raise ValueError(f"{weights_path}: missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{weights_path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    method = method_for(cfg)
    try:
        targets = select_targets(model, cfg, method.supports)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    names, parts = set(), {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{weights_path}: key {key!r} is not an AdapterHub bottleneck tensor "
                             f"(<block>.adapters.<name>.adapter_down.0 / adapter_up .weight / .bias)")
        names.add(m["name"])
        hits = _match(m["block"], targets)
        if len(hits) != 1:
            raise ValueError(f"{weights_path}: key {key!r}: block {m['block']!r} is "
                             + ("none of the " + cfg.placement + " sites of " + type(model).__name__ if not hits
                                else f"ambiguous ({hits})"))
        target = hits[0]
        module = model.get_submodule(target)
        base = getattr(module, "_base", (module,))[0]
        if not is_post_norm_output(base):
            raise ValueError(f"{weights_path}: key {key!r}: module {target!r} ({type(base).__name__}) is not a "
                             f"post-norm block; AdapterHub's decoder bottlenecks sit on the residual stream, "
                             f"which deltatune does not reproduce")
        role = _ROLE[(m["part"], m["kind"])]
        shape = method.shapes(geometry_for(module), module, cfg, target)[role]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, but module {target!r} "
                             f"with reduction_factor {cfg.reduction_factor} from {config_path.name} needs {tuple(shape)}")
        parts.setdefault(target, {})[role] = value
    if len(names) > 1:
        raise ValueError(f"{weights_path}: tensors of several adapters {sorted(names)}; expected one")
    missing = [f"{t}/{r}" for t in targets for r in ("down_weight", "down_bias", "up_weight", "up_bias")
               if r not in parts.get(t, {})]
    if missing:
        raise ValueError(f"{weights_path}: no tensor for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         f"({len(missing)} that {cfg.placement} adapters on {type(model).__name__} need)")
    return cfg, parts


# -- writing -----------------------------------------------------------------------------------------
def to_adapterhub_config(cfg: BottleneckConfig, name: str, model: nn.Module) -> dict:
    """The AdapterHub ``adapter_config.json`` of adapter ``name`` (``cfg``) on ``model``; ValueError naming
    the setting AdapterHub's bottleneck configs cannot express. ``from_adapterhub_config`` reads it back."""
    if not isinstance(cfg, BottleneckConfig):
        raise ValueError(f"adapter {name!r} is a {type(cfg).method} adapter; AdapterHub's format is written for "
                         f"bottleneck adapters only")
    unsupported = [("train_layer_norms", cfg.train_layer_norms, "AdapterHub's bottlenecks have no copy of the "
                    "block's LayerNorm"),
                   ("modules_to_save", cfg.modules_to_save, "AdapterHub saves heads apart, not with the adapter"),
                   ("targets", cfg.targets != "auto" and cfg.targets, "AdapterHub puts its bottlenecks at fixed sites"),
                   ("exclude", cfg.exclude, "AdapterHub puts its bottlenecks at fixed sites")]
    for field, value, why in unsupported:
        if value:
            raise ValueError(f"adapter {name!r}: {field}={getattr(cfg, field)!r} cannot be written in AdapterHub's "
                             f"format ({why})")
    factor = cfg.reduction_factor
    config = {**_REQUIRED, "original_ln_before": False, **_PLACEMENT_FLAGS[cfg.placement],
              "reduction_factor": int(factor) if float(factor).is_integer() else float(factor),
              "non_linearity": cfg.activation, "scaling": float(cfg.scaling), "dropout": float(cfg.dropout),
              "init_weights": cfg.init, "leave_out": [], "stochastic_depth": 0.0}
    model_config = getattr(model, "config", None)
    return {"config": config, "name": name, "model_class": type(model).__name__,
            "model_type": getattr(model_config, "model_type", None),
            "hidden_size": getattr(model_config, "hidden_size", None), "model_name": "",
            "version": f"adapters.{FORMAT_VERSION}+deltatune"}


def adapterhub_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under AdapterHub's keys (``<block path>.adapters.<name>.adapter_down.0.weight``
    ...; contiguous, on the CPU); ValueError naming the module where a tensor has no AdapterHub key."""
    tensors = {}
    for path, part in describe_adapter(model, name).items():
        if part.method == FULL:
            raise ValueError(f"adapter {name!r}: module {path!r} is a full copy (modules_to_save), which AdapterHub's "
                             f"adapter files do not hold")
        module = model.get_submodule(path)
        if not is_post_norm_output(getattr(module, "_base", (module,))[0]):
            raise ValueError(f"adapter {name!r}: module {path!r} ({type(module).__name__}) is not a post-norm block; "
                             f"AdapterHub's decoder bottlenecks sit on the residual stream, which deltatune does not "
                             f"reproduce, so it is not written in their format")
        for role, t in part.tensors.items():
            if role not in _PART:
                raise ValueError(f"adapter {name!r}: module {path!r}: tensor {role!r} has no AdapterHub key "
                                 f"(they hold {sorted(_PART)})")
            layer, kind = _PART[role]
            tensors[f"{path}.adapters.{name}.{layer}.{kind}"] = t.contiguous().cpu()
    return tensors


def write_adapterhub(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` as an AdapterHub directory (``adapter_config.json`` +
    ``adapter.safetensors``) that ``adapters``' ``load_adapter(path)`` loads; returns the directory.
    Everything is checked before anything is written (ValueError naming what AdapterHub cannot hold)."""
    from safetensors.torch import save_file

    configs = adapter_record(model).configs
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(configs)})")
    raw = to_adapterhub_config(configs[name], name, model)
    tensors = adapterhub_state_dict(model, name)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(raw, indent=2, sort_keys=True)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out
