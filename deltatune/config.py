"""``LoraConfig`` and its mapping to and from PEFT's ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

__all__ = ["LoraConfig"]

INIT_METHODS = ("kaiming", "gaussian", "pissa", "random")


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    Targets are chosen by ``targets``: a list of module-name suffixes (``["q_proj", "v_proj"]``),
    a regular expression matched against the full module name, or ``"all-linear"`` (every linear
    layer except the output head). ``exclude`` takes the same forms. ``rank_pattern`` and
    ``alpha_pattern`` map a name pattern (regex on the name's tail, as in PEFT) to a rank or alpha
    that overrides ``r``/``alpha`` for the modules it matches.
    """

    r: int = 8
    """Rank of the update (A is r x in, B is out x r)."""
    alpha: float = 8.0
    """Scaling numerator: scale = alpha / r (or alpha / sqrt(r) with ``use_rslora``)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input (training only)."""
    targets: list[str] | str = "all-linear"
    """Module-name suffixes, a full-name regex, or "all-linear"."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name pattern: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name pattern: alpha}."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023): scale = alpha / sqrt(r)."""
    init: str = "kaiming"
    """A's initialisation: "kaiming" (uniform), "gaussian", "pissa" (top-r SVD of W), or "random" (B too; tests)."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""
    dtype: str | None = "float32"
    """Adapter parameter dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"LoraConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"LoraConfig.dtype must be float32, bfloat16, float16 or None, got {self.dtype!r}")

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # -- PEFT's adapter_config.json -----------------------------------------------------------------
    def to_peft(self, target_modules: list[str] | str | None = None) -> dict:
        """The ``adapter_config.json`` dict PEFT reads; ``target_modules`` overrides ``targets``."""
        init = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "random": False}[self.init]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules if target_modules is not None else self.targets,
            "exclude_modules": self.exclude,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": init,
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "library": "deltatune",
        }

    @classmethod
    def from_peft(cls, cfg: dict, source: str = "adapter_config.json") -> "LoraConfig":
        """Build a config from PEFT's dict; unknown keys warn, unsupported settings raise naming ``source``."""
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {cfg.get('peft_type')!r}; deltatune reads LORA adapters")
        for key, bad in (("use_dora", True), ("lora_bias", True)):
            if cfg.get(key) == bad:
                raise ValueError(f"{source}: {key}={bad} is not supported by deltatune yet")
        if cfg.get("bias", "none") != "none":
            raise ValueError(f"{source}: bias={cfg['bias']!r} is not supported (only 'none')")
        for key in ("layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices"):
            if cfg.get(key):
                raise ValueError(f"{source}: {key} is not supported by deltatune yet")
        init = cfg.get("init_lora_weights", True)
        init_map = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", False: "random"}
        if isinstance(init, str) and init.startswith("pissa"):
            init = "pissa"
        if init not in init_map:
            raise ValueError(f"{source}: init_lora_weights={init!r} is not supported")
        targets = cfg.get("target_modules")
        if targets is None:
            raise ValueError(f"{source}: target_modules is missing")
        unknown = sorted(set(cfg) - _PEFT_KEYS_READ - _PEFT_KEYS_IGNORED)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {unknown}", stacklevel=3)
        return cls(
            r=int(cfg.get("r", 8)),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
            targets=list(targets) if isinstance(targets, (list, tuple, set)) else targets,
            exclude=cfg.get("exclude_modules"),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            use_rslora=bool(cfg.get("use_rslora", False)),
            init=init_map[init],
            modules_to_save=cfg.get("modules_to_save"),
        )


_PEFT_KEYS_READ = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "init_lora_weights", "modules_to_save", "bias", "use_dora", "lora_bias",
    "layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices",
}
# Keys PEFT writes that carry no meaning for the adapter's arithmetic.
_PEFT_KEYS_IGNORED = {
    "task_type", "fan_in_fan_out", "inference_mode", "base_model_name_or_path", "revision", "layers_pattern",
    "auto_mapping", "peft_version", "library", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "runtime_config", "qalora_group_size", "use_qalora", "alora_invocation_tokens",
    "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora",
    "velora_config",
}
