"""PEFT's names for LoKr (``peft_type`` "LOKR"): config keys and tensor keys by role.

Tensors: ``<path>.lokr_w1`` (or ``lokr_w1_a`` / ``lokr_w1_b``) and ``lokr_w2`` (or ``lokr_w2_a`` /
``lokr_w2_b``, with ``lokr_t2`` in the ``use_effective_conv2d`` form), no ``.weight``; per-module ranks
and alphas in ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.methods.lokr import LoKrConfig

METHOD = "lokr"
PEFT_TYPE = "LOKR"
KEYS_READ = {"r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout", "use_effective_conv2d",
             "decompose_both", "decompose_factor", "rank_dropout_scale", "init_weights"}
_ROLE_KEYS = {role: "lokr_" + role for role in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
SUFFIX_ROLES = {v: k for k, v in _ROLE_KEYS.items()}


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix (the same for every geometry)."""
    return _ROLE_KEYS


def to_config(cfg: LoKrConfig, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """LoKr's fields of ``adapter_config.json``."""
    settings = {p: part.settings for p, part in parts.items()}
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "rank_pattern": {p: s["rank"] for p, s in settings.items() if s["rank"] != cfg.r},
        "alpha_pattern": {p: s["alpha"] for p, s in settings.items() if s["alpha"] != cfg.alpha},
        "rank_dropout": cfg.rank_dropout,
        "rank_dropout_scale": cfg.rank_dropout_scale,
        "module_dropout": cfg.module_dropout,
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "init_weights": cfg.init_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def from_config(raw: dict, source: str) -> LoKrConfig:
    """A ``LoKrConfig`` from PEFT's dict (``target_modules`` already a list or a regex)."""
    return LoKrConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("alpha", 8)),
        targets=raw["target_modules"],
        exclude=raw.get("exclude_modules"),
        decompose_both=bool(raw.get("decompose_both", False)),
        decompose_factor=int(raw.get("decompose_factor", -1)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        rank_dropout=float(raw.get("rank_dropout", 0.0) or 0.0),
        rank_dropout_scale=bool(raw.get("rank_dropout_scale", False)),
        module_dropout=float(raw.get("module_dropout", 0.0) or 0.0),
        use_effective_conv2d=bool(raw.get("use_effective_conv2d", False)),
        init_weights=raw.get("init_weights", True),
        modules_to_save=raw.get("modules_to_save"),
    )
