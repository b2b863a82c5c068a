"""What a method is to the core, and the one table of methods by name and by config type.

A method (``deltatune/methods/<name>.py``) is a strategy object with a flat config dataclass. The
core asks it for the delta to put on one layer and for the shapes its tensors must have there (so a
file can be checked before the model is touched); it never looks inside a delta beyond the
interface ``DeltaLayer`` documents. Methods register here with ``register_method`` (one line in
``deltatune/methods/__init__.py``, or in a test for a toy method).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from deltatune.adapters.geometry import Geometry

__all__ = ["Method", "ModelMethod", "register_method", "method_named", "method_for", "method_names"]


@runtime_checkable
class Method(Protocol):
    """An adapter method acting on layer weights (LoRA, DoRA, LoHa, ...)."""

    #: the name used by ``--method`` and in files ("lora")
    name: str
    #: its flat config dataclass; a config carries ``targets``, ``exclude`` and ``modules_to_save``
    config: type

    def supports(self, geometry: Geometry) -> bool:
        """Whether the method can wrap layers of ``geometry``."""

    def make_delta(self, layer: nn.Module, cfg, path: str, dtype: torch.dtype | None) -> nn.Module:
        """A freshly initialised delta for ``layer`` (a ``DeltaLayer``) at module ``path``."""

    def shapes(self, geometry: Geometry, base: nn.Module, cfg, path: str) -> dict[str, tuple[int, ...]]:
        """The shape of each role's tensor that ``make_delta`` would create for ``base`` at ``path``."""

    def settings(self, cfg, path: str) -> dict:
        """Module ``path``'s own settings under ``cfg`` ({"rank": 8, ...}; may be empty)."""


@runtime_checkable
class ModelMethod(Protocol):
    """An adapter method acting on the model as a whole rather than per layer (prompt tuning, prefixes):
    it adds one module of its own to the model (an ``AdapterModule``, e.g. ``VirtualTokens``), so
    targeting, deltas and per-layer shapes do not apply."""

    name: str
    config: type

    def add_to(self, model: nn.Module, cfg, name: str) -> None:
        """Add adapter ``name`` to ``model`` (its module created or extended), freshly initialised."""

    def model_shapes(self, model: nn.Module, cfg) -> dict[str, tuple[int, ...]]:
        """The shape of each role's tensor that ``add_to`` would create on ``model``."""


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known by its name and its config type; returns it. Re-registering replaces."""
    if not isinstance(method, (Method, ModelMethod)):
        raise TypeError(f"{method!r} implements neither deltatune.adapters.Method nor ModelMethod")
    _BY_NAME[method.name] = method
    _BY_CONFIG[method.config] = method
    return method


def method_named(name: str) -> Method:
    """The method registered as ``name``; KeyError listing the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no adapter method named {name!r} (known: {sorted(_BY_NAME)})") from None


def method_for(cfg) -> Method:
    """The method whose config ``cfg`` is; TypeError for anything else."""
    try:
        return _BY_CONFIG[type(cfg)]
    except KeyError:
        raise TypeError(f"{type(cfg).__name__} is not the config of a registered adapter method "
                        f"(known: {sorted(m.config.__name__ for m in _BY_CONFIG.values())})") from None


def method_names() -> list[str]:
    """Names of the registered methods."""
    return list(_BY_NAME)
