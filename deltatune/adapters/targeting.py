"""Which modules an adapter config selects: PEFT's rules (name suffixes, a full-name regex, or
"all-linear"), ``exclude``, per-module patterns, and the output head that "all-linear" leaves out."""

from __future__ import annotations

import re
import warnings

import torch.nn as nn

from deltatune.adapters.full_copies import FullCopies
from deltatune.adapters.geometry import geometry_for

__all__ = ["matches_name", "pattern_value", "output_head", "select_targets", "set_module", "has_module"]


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


def select_targets(model: nn.Module, cfg, supports=None) -> list[str]:
    """Names of the modules ``cfg`` (any config with ``targets``/``exclude``/``modules_to_save``) selects,
    in ``named_modules()`` order.

    ``supports(geometry) -> bool`` tells whether the method can wrap a geometry. A config with a
    ``find_targets(model)`` method (bottleneck adapters) gives its own target spec from the model's
    structure. Raises ValueError if nothing matches, naming the targets, or if a matched module has no
    registered geometry (or one the method does not support).
    """
    find = getattr(cfg, "find_targets", None)
    spec = find(model) if find is not None else cfg.targets
    head = output_head(model)
    # under "all-linear", modules trained in full as copies (and everything inside them) are no targets
    fenced = [] if spec != "all-linear" else [
        n for n, m in model.named_modules()
        if isinstance(m, FullCopies) or (n and cfg.modules_to_save and matches_name(n, cfg.modules_to_save))]
    names = []
    for name, module in model.named_modules():
        if not name or any(name == f or name.startswith(f + ".") for f in fenced):
            continue
        geometry = geometry_for(module)
        if spec == "all-linear":
            hit = geometry is not None and geometry.is_linear and module is not head and name != "lm_head"
        else:
            hit = matches_name(name, spec)
        if not hit or (cfg.exclude and matches_name(name, cfg.exclude)):
            continue
        method = getattr(type(cfg), "method", type(cfg).__name__)
        if geometry is None:
            raise ValueError(f"target {name!r} is a {type(module).__name__}, which {method} cannot wrap "
                             f"(supported: Linear, Conv1d/2d/3d, Embedding, transformers Conv1D, registered geometries)")
        if supports is not None and not supports(geometry):
            raise ValueError(f"target {name!r} is a {type(module).__name__} ({geometry.name} geometry), which "
                             f"{method} cannot wrap")
        names.append(name)
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches targets={spec!r}"
                         + (f" (exclude={cfg.exclude!r})" if cfg.exclude else ""))
    if isinstance(spec, list):
        unmatched = [t for t in spec if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            warnings.warn(f"targets {unmatched} match no module of {type(model).__name__}", stacklevel=3)
    return names


def has_module(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has a submodule ``name``."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` of ``model`` stands."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
