"""PEFT's names for IA³ (``peft_type`` "IA3"): config keys and the tensor key of the scaling vector.

Tensors: ``<path>.ia3_l``, (out, 1) for output scaling and (1, in) for a feed-forward target, as
deltatune's role ``l``. Config: ``feedforward_modules`` (a subset of ``target_modules``), and
``init_ia3_weights``.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.methods.ia3 import IA3Config

METHOD = "ia3"
PEFT_TYPE = "IA3"
KEYS_READ = {"feedforward_modules", "init_ia3_weights", "fan_in_fan_out"}
SUFFIX_ROLES = {"ia3_l": "l"}


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix (the same for every geometry)."""
    return {"l": "ia3_l"}


def to_config(cfg: IA3Config, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """IA³'s fields of ``adapter_config.json``. PEFT wants ``feedforward_modules`` within
    ``target_modules``, so the feed-forward targets are named in the same form: leaf names where
    ``target_modules`` lists leaf names (raising ValueError where a leaf name is feed-forward at one
    path only), full paths otherwise."""
    feedforward = sorted(p for p, part in parts.items() if part.settings.get("feedforward"))
    if isinstance(target_modules, list) and set(target_modules) != set(parts):  # leaf names
        leaves = {p.rsplit(".", 1)[-1] for p in feedforward}
        mixed = sorted(p for p in parts if p not in feedforward and p.rsplit(".", 1)[-1] in leaves)
        if mixed:
            raise ValueError(f"IA³ adapter: {mixed} share a name with feed-forward targets but scale their output; "
                             f"PEFT's format cannot say that (save it with a config whose feedforward names differ)")
        feedforward = sorted(leaves)
    return {"feedforward_modules": feedforward, "init_ia3_weights": cfg.init_weights, "fan_in_fan_out": False}


def from_config(raw: dict, source: str) -> IA3Config:
    """An ``IA3Config`` from PEFT's dict (``target_modules`` already a list or a regex)."""
    feedforward = raw.get("feedforward_modules")
    if isinstance(feedforward, (list, tuple, set)):
        feedforward = list(feedforward)
    targets = raw["target_modules"]
    if isinstance(feedforward, list) and isinstance(targets, list):
        outside = [f for f in feedforward if not any(f == t or f.endswith("." + t) for t in targets)]
        if outside:
            raise ValueError(f"{source}: feedforward_modules {outside} are not among target_modules {targets}")
    return IA3Config(targets=targets, feedforward=feedforward or None, exclude=raw.get("exclude_modules"),
                     modules_to_save=raw.get("modules_to_save"), init_weights=bool(raw.get("init_ia3_weights", True)))
