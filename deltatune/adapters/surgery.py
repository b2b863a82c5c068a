"""Model surgery: small verbs over ``named_modules()`` that change a model in place and return it.

``add_adapter`` / ``remove_adapter`` are exact inverses (module tree, state-dict keys and the
``requires_grad`` flags come back as they were); ``merge`` / ``unmerge`` are idempotent. They know
no method: the config's method (``method_for``) builds each layer's delta.

The one piece of per-model state is an ``AdapterRecord`` kept on the root module: the configs by
adapter name and the base's original ``requires_grad`` flags (what ``remove_adapter`` restores).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deltatune.adapters.full_copies import FullCopies
from deltatune.adapters.geometry import geometry_for
from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.method import ModelMethod, method_for
from deltatune.adapters.protocol import AdapterModule, adapter_modules
from deltatune.adapters.targeting import matches_name, select_targets, set_module

__all__ = [
    "add_adapter", "remove_adapter", "set_active", "disabled", "merge", "unmerge", "adapter_params",
    "list_adapters", "delta_layers", "adapter_record", "AdapterRecord",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}
_RECORD = "_deltatune_adapters"


@dataclass
class AdapterRecord:
    """Per-model bookkeeping: the configs by adapter name, and the requires_grad flags before the first."""

    configs: dict = field(default_factory=dict)
    requires_grad: dict[str, bool] | None = None


def adapter_record(model: nn.Module, create: bool = False) -> AdapterRecord:
    """The model's ``AdapterRecord`` (an empty one, not stored, if it has none and ``create`` is False)."""
    record = model.__dict__.get(_RECORD)
    if record is None:
        record = AdapterRecord()
        if create:
            model.__dict__[_RECORD] = record
    return record


def list_adapters(model: nn.Module) -> dict:
    """The adapters on ``model``: {name: config}."""
    return dict(adapter_record(model).configs)


def delta_layers(model: nn.Module) -> list[tuple[str, DeltaLayer]]:
    """(path, DeltaLayer) pairs of ``model``."""
    return [(n, m) for n, m in adapter_modules(model) if isinstance(m, DeltaLayer)]


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in adapter_record(model).configs:
        raise ValueError(f"adapter {name!r} already exists on this model; remove_adapter() it first or pick another name")


def _full_copy_targets(model: nn.Module, cfg, targets: list[str]) -> list[str]:
    if not cfg.modules_to_save:
        return []
    saved = [n for n, m in model.named_modules() if n and matches_name(n, cfg.modules_to_save)]
    missing = [s for s in cfg.modules_to_save if not any(n == s or n.endswith("." + s) for n in saved)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap} are both adapter targets and inside modules_to_save")
    return saved


def add_adapter(model: nn.Module, cfg, name: str = "default", activate: bool = True) -> nn.Module:
    """Add adapter ``name`` described by ``cfg`` (any registered method's config) to ``model`` in place.

    Freezes every base parameter; the adapter's parameters (and ``modules_to_save`` copies) train.
    With ``activate`` the new adapter becomes the only active one. Raises if ``name`` exists, if no
    module matches the config's targets, or if the method cannot wrap a matched module. Returns ``model``.
    """
    _check_name(model, name)
    method = method_for(cfg)
    model_level = isinstance(method, ModelMethod)  # prompt / prefix methods add one module, not per-layer deltas
    targets = [] if model_level else select_targets(model, cfg, method.supports)
    saved = _full_copy_targets(model, cfg, targets)
    if model_level:  # first: a bad config raises before anything of the model changes
        method.add_to(model, cfg, name)
    record = adapter_record(model, create=True)
    if record.requires_grad is None:
        record.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = {id(p) for p in adapter_params(model)}
    for p in model.parameters():
        if id(p) not in adapters:  # the base freezes; adapters already present keep their flags
            p.requires_grad_(False)

    dtype = _DTYPES[getattr(cfg, "dtype", "float32")]
    for target in targets:
        module = model.get_submodule(target)
        if not isinstance(module, AdapterModule):
            geometry = geometry_for(module)  # a module-level geometry brings its own wrapper (a bottleneck block)
            module = (getattr(geometry, "wrapper", None) or DeltaLayer)(module, geometry)
            set_module(model, target, module)
        module.add(name, method.make_delta(module, cfg, target, dtype))
    for target in saved:
        module = model.get_submodule(target)
        if not isinstance(module, FullCopies):
            module = FullCopies(module)
            set_module(model, target, module)
        module.add(name)
    record.configs[name] = cfg
    for p in adapter_params(model, name):
        p.requires_grad_(True)
    if activate:
        set_active(model, name)
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` (unmerging it first); the exact inverse of ``add_adapter``.

    When the last adapter goes, the original modules return to the tree and every parameter's
    ``requires_grad`` flag is restored.
    """
    record = adapter_record(model)
    if name not in record.configs:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(record.configs)})")
    for path, module in list(adapter_modules(model)):
        if not _in_tree(model, path, module):  # left with an outer module's restore (new blocks' LoRA layers)
            continue
        if name in module.adapter_names():
            module.remove(name)
        if not module.adapter_names():
            original = module.restore()
            if original is None:  # a module of the adapter's own (virtual tokens): nothing to put back
                parent, _, attr = path.rpartition(".")
                delattr(model.get_submodule(parent) if parent else model, attr)
            else:
                set_module(model, path, original)
    del record.configs[name]
    if not record.configs:
        flags = record.requires_grad or {}
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        del model.__dict__[_RECORD]
    return model


def _in_tree(model: nn.Module, path: str, module: nn.Module) -> bool:
    """Whether ``module`` still stands at ``path`` of ``model``."""
    try:
        return model.get_submodule(path) is module
    except AttributeError:
        return False


def set_active(model: nn.Module, names: str | list[str] | dict[str, float]) -> nn.Module:
    """Make ``names`` (one name, or a list whose outputs are summed) the active adapters.

    A dict ``{name: weight}`` also scales each adapter's effect (several style files at chosen strengths);
    ``merge`` folds an adapter in at its weight then (deltas with ``additive = True``, whose ΔW does not
    depend on W: LoRA, LoHa, LoKr) and ``unmerge`` takes out what the merge put in. Weights apply to weight deltas; an adapter with full copies or
    virtual tokens takes weight 1 only.
    """
    weights = dict(names) if isinstance(names, dict) else {}
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_record(model).configs
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown} on this model (have {sorted(known)})")
    scaled = {n: float(w) for n, w in weights.items() if float(w) != 1.0}
    for path, module in adapter_modules(model):
        if not isinstance(module, DeltaLayer) and set(scaled) & set(module.adapter_names()):
            raise ValueError(f"adapter(s) {sorted(set(scaled) & set(module.adapter_names()))} at {path!r} "
                             f"({type(module).__name__}) cannot take a weight other than 1")
    for _, module in adapter_modules(model):
        held = module.adapter_names()
        module.active = [n for n in names if n in held]
        if isinstance(module, DeltaLayer):
            module.weights = {n: w for n, w in scaled.items() if n in held}
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Context in which ``model`` behaves as the base model (merged adapters are taken out meanwhile)."""
    modules = [m for _, m in adapter_modules(model)]
    merged = {id(m): list(m.merged) for m in modules}
    for m in modules:
        for n in merged[id(m)]:
            m.unmerge(n)
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True
            for n in merged[id(m)]:
                m.merge(n)


def _names(names) -> list[str] | None:
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


def _check_mergeable(model: nn.Module, names: list[str] | None) -> None:
    """Raise before anything changes if one of ``names`` (default: the active adapters) is of a method
    whose ``mergeable`` is False (a bottleneck adapter is non-linear in its input)."""
    configs = adapter_record(model).configs
    wanted = names if names is not None else {n for _, m in adapter_modules(model) for n in m.active}
    for n in sorted(wanted):
        method = method_for(configs[n]) if n in configs else None
        if method is not None and not getattr(method, "mergeable", True):
            raise ValueError(f"adapter {n!r} is a {method.name} adapter: its output is not linear in the base "
                             f"weights, so it cannot be merged into them (keep it unmerged)")


def merge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Fold the given adapters (default: the active ones) into the base weights. Idempotent. Raises
    ValueError for an adapter that cannot fold (virtual tokens), before anything is merged."""
    names = _names(names)
    _check_mergeable(model, names)
    for _, module in adapter_modules(model):
        if not isinstance(module, DeltaLayer):  # full copies: a no-op; virtual tokens: a clear refusal
            for n in (module.active if names is None else names):
                if n in module.adapter_names():
                    module.merge(n)
    for _, layer in delta_layers(model):
        for n in (layer.active if names is None else names):
            if n in layer.deltas:
                layer.merge(n)
    return model


def unmerge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Take merged adapters (default: all merged) back out of the base weights. Idempotent."""
    names = _names(names)
    for _, layer in delta_layers(model):
        for n in list(layer.merged if names is None else names):
            layer.unmerge(n)
    return model


def adapter_params(model: nn.Module, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters of ``model``: of adapter ``name`` (default all), of ``role`` (e.g. LoRA's
    "B", for LoRA+'s learning rate) if given."""
    params = []
    for _, module in adapter_modules(model):
        params += module.adapter_parameters(name, role)
    return params
