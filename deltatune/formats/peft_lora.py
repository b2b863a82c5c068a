"""PEFT's names for LoRA (``peft_type`` "LORA"): config keys and tensor keys by role.

Tensors: ``<path>.lora_A.weight`` / ``lora_B.weight``, embeddings ``lora_embedding_A`` /
``lora_embedding_B`` (no ``.weight``); with ``use_dora`` DoRA's magnitude ``lora_magnitude_vector`` (no
``.weight`` either; shape (out,), conv (1, out, 1, ...)). Each module's actual rank and alpha are written
into ``rank_pattern``/``alpha_pattern`` where they differ from the global ones, keyed by its full path:
exact whatever patterns (or ``combine()``) produced them.
"""

from __future__ import annotations

from deltatune.adapters.description import ModulePart
from deltatune.methods.lora import LoraConfig

METHOD = "lora"
PEFT_TYPE = "LORA"
KEYS_READ = {"r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
             "bias", "use_dora", "lora_bias"}

_ROLE_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_EMBEDDING_ROLE_KEYS = {"A": "lora_embedding_A", "B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"}
SUFFIX_ROLES = {**{v: k for k, v in _ROLE_KEYS.items()}, **{v: k for k, v in _EMBEDDING_ROLE_KEYS.items()}}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "random": False}
_INIT_FROM_PEFT = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", False: "random"}


def role_keys(geometry: str) -> dict[str, str]:
    """Role -> key suffix for a layer of ``geometry``."""
    return _EMBEDDING_ROLE_KEYS if geometry == "embedding" else _ROLE_KEYS


def to_config(cfg: LoraConfig, parts: dict[str, ModulePart], target_modules: list[str] | str) -> dict:
    """LoRA's fields of ``adapter_config.json`` for an adapter whose LoRA modules are ``parts``."""
    settings = {p: part.settings for p, part in parts.items()}
    return {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "rank_pattern": {p: s["rank"] for p, s in settings.items() if s["rank"] != cfg.r},
        "alpha_pattern": {p: s["alpha"] for p, s in settings.items() if s["alpha"] != cfg.alpha},
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": _INIT_TO_PEFT[cfg.init],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": cfg.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def from_config(raw: dict, source: str) -> LoraConfig:
    """A ``LoraConfig`` from PEFT's dict (``target_modules`` already a list or a regex); unsupported
    settings raise naming ``source``."""
    if raw.get("lora_bias"):
        raise ValueError(f"{source}: lora_bias=True is not supported by deltatune yet")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        init = "pissa"
    if init not in _INIT_FROM_PEFT:
        raise ValueError(f"{source}: init_lora_weights={init!r} is not supported")
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
        targets=raw["target_modules"],
        exclude=raw.get("exclude_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        use_rslora=bool(raw.get("use_rslora", False)),
        init=_INIT_FROM_PEFT[init],
        modules_to_save=raw.get("modules_to_save"),
        use_dora=bool(raw.get("use_dora", False)),
    )
