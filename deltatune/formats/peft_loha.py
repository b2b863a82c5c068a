"""PEFT's names for LoHa (``peft_type`` "LOHA"): config keys and tensor keys by role.

Tensors: ``<path>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` (no ``.weight``), and
``hada_t1`` / ``hada_t2`` for the cores of the ``use_effective_conv2d`` form; per-module ranks and alphas
in ``rank_pattern`` / ``alpha_pattern`` keyed by full path, as for LoRA.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.formats import peft_lycoris
from deltatune.methods.loha import LoHaConfig

METHOD = "loha"
PEFT_TYPE = "LOHA"
KEYS_READ = peft_lycoris.KEYS_READ
_ROLE_KEYS, SUFFIX_ROLES = peft_lycoris.role_keys("hada_", ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix (the same for every geometry)."""
    return _ROLE_KEYS


def to_config(cfg: LoHaConfig, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """LoHa's fields of ``adapter_config.json``."""
    return peft_lycoris.to_config(cfg, parts)


def from_config(raw: dict, source: str) -> LoHaConfig:
    """A ``LoHaConfig`` from PEFT's dict (``target_modules`` already a list or a regex)."""
    return LoHaConfig(**peft_lycoris.config_fields(raw), init_weights=bool(raw.get("init_weights", True)))
