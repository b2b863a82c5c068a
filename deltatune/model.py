"""Model surgery: small verbs over ``named_modules()`` that change a model in place and return it.

``add_adapter`` / ``remove_adapter`` are exact inverses (module tree, state-dict keys and the
``requires_grad`` flags come back as they were); ``merge`` / ``unmerge`` are idempotent.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
import torch.nn as nn

from deltatune.config import LoraConfig
from deltatune.lora import LoraLayer, kind_for
from deltatune.saved import SavedCopies

__all__ = [
    "add_adapter", "remove_adapter", "set_active", "disabled", "merge", "unmerge", "adapter_params",
    "list_adapters", "combine", "select_targets", "lora_layers", "matches_name", "output_head", "set_module",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


# -- targeting ---------------------------------------------------------------------------------------
def matches_name(name: str, spec: list[str] | str) -> bool:
    """Whether module ``name`` matches ``spec`` by PEFT's rule: a string is a regex on the full name,
    a list holds name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def pattern_value(name: str, patterns: dict, default):
    """The value of the first pattern matching the tail of ``name`` (PEFT's ``rank_pattern`` rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except Exception:  # models that define it but have no head (encoders)
        return None


def select_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the modules ``cfg`` adapts, in ``named_modules()`` order.

    Raises ValueError if nothing matches, naming the targets, or if a matched module's type has no
    registered ``LayerKind``.
    """
    head = output_head(model)
    # under "all-linear", modules trained in full as copies (and everything inside them) are no targets
    fenced = [] if cfg.targets != "all-linear" else [
        n for n, m in model.named_modules()
        if isinstance(m, SavedCopies) or (n and cfg.modules_to_save and matches_name(n, cfg.modules_to_save))]
    names = []
    for name, module in model.named_modules():
        if not name or any(name == f or name.startswith(f + ".") for f in fenced):
            continue
        kind = module.kind if isinstance(module, LoraLayer) else kind_for(module)
        if cfg.targets == "all-linear":
            hit = kind is not None and kind.is_linear and module is not head and name != "lm_head"
        else:
            hit = matches_name(name, cfg.targets)
        if not hit or (cfg.exclude and matches_name(name, cfg.exclude)):
            continue
        if kind is None:
            raise ValueError(f"target {name!r} is a {type(module).__name__}, which LoRA cannot wrap "
                             f"(supported: Linear, Conv1d/2d/3d, Embedding, transformers Conv1D, registered kinds)")
        names.append(name)
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches targets={cfg.targets!r}"
                         + (f" (exclude={cfg.exclude!r})" if cfg.exclude else ""))
    if isinstance(cfg.targets, list):
        unmatched = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            warnings.warn(f"targets {unmatched} match no module of {type(model).__name__}", stacklevel=3)
    return names


# -- registry on the root module ---------------------------------------------------------------------
def _registry(model: nn.Module) -> dict:
    """Per-model bookkeeping: configs by adapter name and the base's original requires_grad flags."""
    reg = model.__dict__.get("_deltatune")
    if reg is None:
        reg = {"configs": {}, "requires_grad": None}
        model.__dict__["_deltatune"] = reg
    return reg


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on ``model``: {name: LoraConfig}."""
    return dict(_registry(model)["configs"])


def lora_layers(model: nn.Module):
    """(name, LoraLayer) pairs of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _saved_copies(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SavedCopies)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` of ``model`` stands."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- verbs -------------------------------------------------------------------------------------------
def add_adapter(model: nn.Module, cfg: LoraConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Add LoRA adapter ``name`` described by ``cfg`` to ``model`` in place and return ``model``.

    Freezes every base parameter; the adapter's parameters (and ``modules_to_save`` copies) train.
    With ``activate`` the new adapter becomes the only active one. Raises if ``name`` exists.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    reg = _registry(model)
    if name in reg["configs"]:
        raise ValueError(f"adapter {name!r} already exists on this model; remove_adapter() it first or pick another name")
    targets = select_targets(model, cfg)
    saved = []
    if cfg.modules_to_save:
        saved = [n for n, m in model.named_modules() if n and matches_name(n, cfg.modules_to_save)]
        missing = [s for s in cfg.modules_to_save if not any(n == s or n.endswith("." + s) for n in saved)]
        if missing:
            raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
        overlap = [t for t in targets if any(t == s or t.startswith(s + ".") for s in saved)]
        if overlap:
            raise ValueError(f"modules {overlap} are both LoRA targets and inside modules_to_save")
    if reg["requires_grad"] is None:
        reg["requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = {id(p) for p in adapter_params(model)}
    for p in model.parameters():
        if id(p) not in adapters:  # the base freezes; adapters already present keep their flags
            p.requires_grad_(False)

    dtype = _DTYPES[cfg.dtype]
    for target in targets:
        module = model.get_submodule(target)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module, kind_for(module))
            set_module(model, target, module)
        rank = int(pattern_value(target, cfg.rank_pattern, cfg.r))
        alpha = float(pattern_value(target, cfg.alpha_pattern, cfg.alpha))
        module.add(name, rank, alpha, cfg.dropout, cfg.use_rslora, cfg.init, dtype)
    for target in saved:
        module = model.get_submodule(target)
        if not isinstance(module, SavedCopies):
            module = SavedCopies(module)
            set_module(model, target, module)
        module.add(name)
    reg["configs"][name] = cfg
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
    reg = _registry(model)
    if name not in reg["configs"]:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(reg['configs'])})")
    for path, layer in lora_layers(model) + _saved_copies(model):
        if name in layer.adapter_names():
            layer.remove(name)
        if not layer.adapter_names():
            set_module(model, path, layer.restore())
    del reg["configs"][name]
    if not reg["configs"]:
        flags = reg["requires_grad"] or {}
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        del model.__dict__["_deltatune"]
    return model


def set_active(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` (one name, or a list whose outputs are summed) the active adapters."""
    names = [names] if isinstance(names, str) else list(names)
    known = _registry(model)["configs"]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown} on this model (have {sorted(known)})")
    for _, layer in lora_layers(model) + _saved_copies(model):
        layer.active = [n for n in names if n in layer.adapter_names()]
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Context in which ``model`` behaves as the base model (merged adapters are taken out meanwhile)."""
    layers = lora_layers(model) + _saved_copies(model)
    merged = {id(layer): list(getattr(layer, "merged", [])) for _, layer in layers}
    for _, layer in layers:
        for n in merged[id(layer)]:
            layer.unmerge(n)
        layer.enabled = False
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.enabled = True
            for n in merged[id(layer)]:
                layer.merge(n)


def _names(model, names):
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


def merge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Fold the given adapters (default: the active ones) into the base weights. Idempotent."""
    names = _names(model, names)
    for _, layer in lora_layers(model):
        for n in (layer.active if names is None else names):
            if n in layer.slots:
                layer.merge(n)
    return model


def unmerge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Take merged adapters (default: all merged) back out of the base weights. Idempotent."""
    names = _names(model, names)
    for _, layer in lora_layers(model):
        for n in list(layer.merged if names is None else names):
            layer.unmerge(n)
    return model


def adapter_params(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters of ``model`` (of adapter ``name``, or of all adapters)."""
    params = []
    for _, layer in lora_layers(model) + _saved_copies(model):
        params += layer.adapter_parameters(name)
    return params


def combine(model: nn.Module, weights: dict[str, float], name: str, rank: int | None = None) -> dict[str, float]:
    """Add adapter ``name`` equal to ``sum_i w_i * adapter_i`` and return a per-layer error report.

    Without ``rank`` the sum is exact: A's are stacked and B's concatenated with ``w_i * scale_i``
    folded in (rank = sum of ranks, scale 1). With ``rank`` each layer's summed delta is truncated to
    its top-``rank`` singular directions; the report maps each layer to its relative Frobenius error
    ``||dW - dW_rank|| / ||dW||`` (0.0 when exact).
    """
    reg = _registry(model)
    missing = [n for n in weights if n not in reg["configs"]]
    if missing:
        raise KeyError(f"combine: no adapter named {missing} (have {sorted(reg['configs'])})")
    if name in reg["configs"]:
        raise ValueError(f"adapter {name!r} already exists on this model")
    if any(reg["configs"][n].modules_to_save for n in weights):
        raise ValueError("combine: adapters with modules_to_save cannot be combined (full copies have no low-rank sum)")
    report, built = {}, {}
    for path, layer in lora_layers(model):
        parts = [(n, w) for n, w in weights.items() if n in layer.slots]
        if not parts:
            continue
        A = torch.cat([layer.lora_A[n].detach().float() for n, _ in parts], dim=0)
        B = torch.cat([w * layer.slots[n].scale * layer.lora_B[n].detach().float() for n, w in parts], dim=1)
        err = 0.0
        if rank is not None and rank < A.shape[0]:
            A, B, err = _truncate(A, B, rank)
        built[path] = (A, B)
        report[path] = err
    first = reg["configs"][next(iter(weights))]
    ranks = {p: a.shape[0] for p, (a, _) in built.items()}
    cfg = LoraConfig(
        r=max(ranks.values()), alpha=float(max(ranks.values())), targets=sorted(built), init="kaiming",
        rank_pattern={p: r for p, r in ranks.items()}, alpha_pattern={p: float(r) for p, r in ranks.items()},
        dtype=first.dtype,
    )
    for path, (A, B) in built.items():
        layer = model.get_submodule(path)
        layer.add(name, A.shape[0], float(A.shape[0]), 0.0, False, "kaiming", layer.lora_A[next(iter(layer.slots))].dtype)
        with torch.no_grad():
            layer.lora_A[name].copy_(A)
            layer.lora_B[name].copy_(B)
    reg["configs"][name] = cfg
    return report


def _truncate(A: torch.Tensor, B: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of ``B @ A`` (shapes kept per layer kind) and the relative error."""
    a_shape, b_shape = A.shape, B.shape
    M = B.flatten(1) @ A.flatten(1)  # (out, in...) in the delta's own 2-D form
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    B2 = (U[:, :rank] * root).reshape(b_shape[0], rank, *b_shape[2:])
    A2 = (root[:, None] * Vh[:rank]).reshape(rank, *a_shape[1:])
    total = S.square().sum()
    err = float((S[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return A2, B2, err
