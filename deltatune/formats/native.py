"""deltatune's own adapter files, for methods PEFT's format does not carry (and toy methods in tests).

Same two files as PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``, so tools that list
adapter directories still find them). The config is ``{"deltatune_method": name, "config": {field:
value}}`` with the method's config dataclass fields; tensor keys are ``<module path>/<role>`` (module
paths never hold "/"), full copies' roles being their own state-dict keys.
"""

from __future__ import annotations

import dataclasses

from deltatune.adapters.method import method_named

__all__ = ["METHOD_KEY", "to_native_config", "from_native_config", "file_key", "split_key"]

METHOD_KEY = "deltatune_method"


def file_key(path: str, method: str, geometry: str, role: str) -> str:
    """The file key of ``role``'s tensor of module ``path``."""
    return f"{path}/{role}"


def split_key(key: str) -> tuple[str, str] | None:
    """(module path, role) of a file key, or None if it is not of this format."""
    path, sep, role = key.partition("/")
    return (path, role) if sep and role else None


def to_native_config(cfg) -> dict:
    """The ``adapter_config.json`` dict for ``cfg`` (a registered method's config)."""
    return {METHOD_KEY: type(cfg).method, "config": dataclasses.asdict(cfg), "library": "deltatune"}


def from_native_config(raw: dict, source: str = "adapter_config.json"):
    """The method config an ``adapter_config.json`` of this format describes; ValueError naming ``source``."""
    try:
        method = method_named(raw[METHOD_KEY])
    except KeyError as e:
        raise ValueError(f"{source}: {e.args[0]}") from None
    fields = raw.get("config")
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: 'config' must be an object with the fields of {method.config.__name__}")
    known = {f.name for f in dataclasses.fields(method.config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: {method.config.__name__} has no fields {unknown}")
    try:
        return method.config(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
