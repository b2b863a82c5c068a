"""Hugging Face PEFT's adapter files for LoRA: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT: ``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight`` (embeddings:
``lora_embedding_A`` / ``lora_embedding_B``, no ``.weight``), and ``base_model.model.<path>.<param>``
for ``modules_to_save`` copies. This file is the only place that knows PEFT's names: the config's
keys (``lora_alpha``, ``init_lora_weights``, ...) and the tensors' keys by role.
"""

from __future__ import annotations

import warnings

from deltatune.adapters.description import FULL, ModulePart
from deltatune.methods.lora import LoraConfig

__all__ = ["PREFIX", "METHODS", "TASK_TYPES", "task_type", "to_peft_config", "from_peft_config", "file_key",
           "split_key"]

PREFIX = "base_model.model."
METHODS = ("lora",)
"""The methods PEFT's format carries here (others are written in deltatune's own format)."""

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
"""deltatune's task names -> PEFT's ``task_type``, which picks the class ``AutoPeftModel*`` builds."""
_CLASS_SUFFIXES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                   "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                   "ForConditionalGeneration": "SEQ_2_SEQ_LM"}

_ROLE_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight"}
_EMBEDDING_ROLE_KEYS = {"A": "lora_embedding_A", "B": "lora_embedding_B"}
_SUFFIX_ROLES = {**{v: k for k, v in _ROLE_KEYS.items()}, **{v: k for k, v in _EMBEDDING_ROLE_KEYS.items()}}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "random": False}
_INIT_FROM_PEFT = {True: "kaiming", "gaussian": "gaussian", "pissa": "pissa", False: "random"}


def file_key(path: str, method: str, geometry: str, role: str) -> str:
    """The file key of ``role``'s tensor of module ``path`` (a full copy's role is its own state-dict key)."""
    if method == FULL:
        return f"{PREFIX}{path}.{role}"
    names = _EMBEDDING_ROLE_KEYS if geometry == "embedding" else _ROLE_KEYS
    return f"{PREFIX}{path}.{names[role]}"


def split_key(key: str) -> tuple[str, str | None] | None:
    """(module path, role) of a LoRA key; (path and parameter, None) of any other key under the
    prefix (a full copy's, resolved against the model); None if the key lacks PEFT's prefix."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for suffix, role in _SUFFIX_ROLES.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], role
    return rest, None


def task_type(task: str | None = None, model_class: str | None = None) -> str | None:
    """PEFT's ``task_type`` for deltatune's ``task`` ("causal-lm", "classification"; PEFT's own names
    pass through), else for a transformers class name such as ``LlamaForCausalLM``; None if neither says."""
    if task is not None:
        if task in TASK_TYPES.values() or task in ("TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"):
            return task
        if task not in TASK_TYPES:
            raise ValueError(f"task {task!r}: expected one of {sorted(TASK_TYPES)} or PEFT's task_type names")
        return TASK_TYPES[task]
    for suffix, name in _CLASS_SUFFIXES.items():
        if model_class and model_class.endswith(suffix):
            return name
    return None


def to_peft_config(cfg: LoraConfig, parts: dict[str, ModulePart], target_modules: list[str] | str,
                   base_model: str | None = None, task: str | None = None, revision: str | None = None) -> dict:
    """The ``adapter_config.json`` dict PEFT reads for an adapter described by ``parts``.

    Each module's actual rank and alpha are written where they differ from the global ones, keyed by
    its full path: exact whatever patterns (or ``combine()``) produced them. ``base_model`` (what
    ``AutoModel*.from_pretrained`` takes), ``task`` (PEFT's ``task_type``, e.g. "CAUSAL_LM") and
    ``revision`` let ``AutoPeftModelForCausalLM.from_pretrained(dir)`` load the base by itself.
    """
    lora = {p: part.settings for p, part in parts.items() if part.method == "lora"}
    saved = sorted({p.rsplit(".", 1)[-1] for p, part in parts.items() if part.method == FULL})
    return {
        "peft_type": "LORA",
        "task_type": task,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "exclude_modules": None,  # the target list is already exact
        "rank_pattern": {p: s["rank"] for p, s in lora.items() if s["rank"] != cfg.r},
        "alpha_pattern": {p: s["alpha"] for p, s in lora.items() if s["alpha"] != cfg.alpha},
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": _INIT_TO_PEFT[cfg.init],
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "layers_to_transform": None,
        "layers_pattern": None,
        "library": "deltatune",
    }


def from_peft_config(raw: dict, source: str = "adapter_config.json") -> LoraConfig:
    """A ``LoraConfig`` from PEFT's dict; unknown keys warn, unsupported settings raise naming ``source``."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type is {raw.get('peft_type')!r}; deltatune reads LORA adapters")
    for key, bad in (("use_dora", True), ("lora_bias", True)):
        if raw.get(key) == bad:
            raise ValueError(f"{source}: {key}={bad} is not supported by deltatune yet")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
    for key in ("layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices"):
        if raw.get(key):
            raise ValueError(f"{source}: {key} is not supported by deltatune yet")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        init = "pissa"
    if init not in _INIT_FROM_PEFT:
        raise ValueError(f"{source}: init_lora_weights={init!r} is not supported")
    targets = raw.get("target_modules")
    if targets is None:
        raise ValueError(f"{source}: target_modules is missing")
    unknown = sorted(set(raw) - _KEYS_READ - _KEYS_IGNORED)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config keys {unknown}", stacklevel=3)
    return LoraConfig(
        r=int(raw.get("r", 8)),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
        targets=list(targets) if isinstance(targets, (list, tuple, set)) else targets,
        exclude=raw.get("exclude_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        use_rslora=bool(raw.get("use_rslora", False)),
        init=_INIT_FROM_PEFT[init],
        modules_to_save=raw.get("modules_to_save"),
    )


_KEYS_READ = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "init_lora_weights", "modules_to_save", "bias", "use_dora", "lora_bias",
    "layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices",
}
# Keys PEFT writes that carry no meaning for the adapter's arithmetic.
_KEYS_IGNORED = {
    "task_type", "fan_in_fan_out", "inference_mode", "base_model_name_or_path", "revision", "layers_pattern",
    "auto_mapping", "peft_version", "library", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "runtime_config", "qalora_group_size", "use_qalora", "alora_invocation_tokens",
    "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora",
    "velora_config",
}
