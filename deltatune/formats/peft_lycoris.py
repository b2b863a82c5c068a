"""What PEFT's LoHa and LoKr files share (``formats/peft_loha.py``, ``formats/peft_lokr.py``): tensor keys
``<path>.<prefix><role>`` with no ``.weight``, and the config keys of PEFT's ``LycorisConfig`` (rank,
alpha, their per-module patterns keyed by full path, the two dropouts, the CP conv form)."""

from __future__ import annotations

from deltatune.adapters.description import ModulePart

__all__ = ["KEYS_READ", "role_keys", "to_config", "config_fields"]

KEYS_READ = {"r", "alpha", "rank_pattern", "alpha_pattern", "rank_dropout", "module_dropout", "use_effective_conv2d",
             "init_weights"}
"""The ``adapter_config.json`` keys both methods read."""


def role_keys(prefix: str, roles: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """({role: key suffix}, {key suffix: role}) for tensor keys ``<path>.<prefix><role>`` ("hada_", "lokr_")."""
    keys = {role: prefix + role for role in roles}
    return keys, {v: k for k, v in keys.items()}


def to_config(cfg, parts: dict[str, ModulePart]) -> dict:
    """The shared fields of ``adapter_config.json`` for ``cfg`` (a LoHa or LoKr config) and its modules'
    settings (ranks and alphas that differ from ``r`` / ``alpha`` go to the patterns)."""
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


def config_fields(raw: dict) -> dict:
    """The shared config fields (keyword arguments of ``LoHaConfig`` / ``LoKrConfig``) from PEFT's dict
    (``target_modules`` already a list or a regex); ``init_weights`` is each method's own."""
    return dict(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("alpha", 8)),
        targets=raw["target_modules"],
        exclude=raw.get("exclude_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        rank_dropout=float(raw.get("rank_dropout", 0.0) or 0.0),
        module_dropout=float(raw.get("module_dropout", 0.0) or 0.0),
        use_effective_conv2d=bool(raw.get("use_effective_conv2d", False)),
        modules_to_save=raw.get("modules_to_save"),
    )
