"""PEFT's names for LoKr (``peft_type`` "LOKR"): config keys and tensor keys by role.

Tensors: ``<path>.lokr_w1`` (or ``lokr_w1_a`` / ``lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a`` /
``lokr_w2_b``, with ``lokr_t2`` in the ``use_effective_conv2d`` form), no ``.weight``; per-module ranks
and alphas in ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.formats import peft_lycoris
from deltatune.methods.lokr import LoKrConfig

METHOD = "lokr"
PEFT_TYPE = "LOKR"
KEYS_READ = peft_lycoris.KEYS_READ | {"decompose_both", "decompose_factor", "rank_dropout_scale"}
_ROLE_KEYS, SUFFIX_ROLES = peft_lycoris.role_keys("lokr_", ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"))


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix (the same for every geometry)."""
    return _ROLE_KEYS


def to_config(cfg: LoKrConfig, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """LoKr's fields of ``adapter_config.json``."""
    return {**peft_lycoris.to_config(cfg, parts), "rank_dropout_scale": cfg.rank_dropout_scale,
            "decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor}


def from_config(raw: dict, source: str) -> LoKrConfig:
    """A ``LoKrConfig`` from PEFT's dict (``target_modules`` already a list or a regex)."""
    return LoKrConfig(
        **peft_lycoris.config_fields(raw),
        decompose_both=bool(raw.get("decompose_both", False)),
        decompose_factor=int(raw.get("decompose_factor", -1)),
        rank_dropout_scale=bool(raw.get("rank_dropout_scale", False)),
        init_weights=raw.get("init_weights", True),
    )
