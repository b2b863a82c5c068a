"""PEFT's names for LoHa (``peft_type`` "LOHA"): config keys and tensor keys by role.

Tensors: ``<path>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` (no ``.weight``), and
``hada_t1`` / ``hada_t2`` for the cores of the ``use_effective_conv2d`` form; per-module ranks and alphas
in ``rank_pattern`` / ``alpha_pattern`` keyed by full path, as for LoRA.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.methods.loha import LoHaConfig

METHOD = "loha"
PEFT_TYPE = "LOHA"
KEYS_READ = {"r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout", "use_effective_conv2d",
             "init_weights"}
_ROLE_KEYS = {role: "hada_" + role for role in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
SUFFIX_ROLES = {v: k for k, v in _ROLE_KEYS.items()}


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix (the same for every geometry)."""
    return _ROLE_KEYS


def to_config(cfg: LoHaConfig, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """LoHa's fields of ``adapter_config.json``."""
    settings = {p: part.settings for p, part in parts.items()}
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "rank_pattern": {p: s["rank"] for p, s in settings.items() if s["rank"] != cfg.r},
        "alpha_pattern": {p: s["alpha"] for p, s in settings.items() if s["alpha"] != cfg.alpha},
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "init_weights": cfg.init_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def from_config(raw: dict, source: str) -> LoHaConfig:
    """A ``LoHaConfig`` from PEFT's dict (``target_modules`` already a list or a regex)."""
    return LoHaConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("alpha", 8)),
        targets=raw["target_modules"],
        exclude=raw.get("exclude_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        rank_dropout=float(raw.get("rank_dropout", 0.0) or 0.0),
        module_dropout=float(raw.get("module_dropout", 0.0) or 0.0),
        use_effective_conv2d=bool(raw.get("use_effective_conv2d", False)),
        init_weights=bool(raw.get("init_weights", True)),
        modules_to_save=raw.get("modules_to_save"),
    )
