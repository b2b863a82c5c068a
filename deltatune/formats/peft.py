"""Hugging Face PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<method's key for the role>`` and
``base_model.model.<path>.<param>`` for ``modules_to_save`` copies. This file holds what all of PEFT's
methods share (the prefix, ``task_type``, the base model fields, keys that carry no arithmetic) and
the table of methods PEFT's format carries here; each method's own names (config keys, tensor keys by
role) live in its ``peft_<method>.py``, which gives ``METHOD``, ``PEFT_TYPE``, ``KEYS_READ``,
``role_keys(geometry)``, ``to_config(cfg, parts, target_modules)`` and ``from_config(raw, source)``. A method PEFT
has is one such file and one line in ``MAPPINGS``.
"""

from __future__ import annotations

import warnings

from deltatune.adapters.description import FULL, ModulePart
from deltatune.formats import peft_ia3, peft_loha, peft_lokr, peft_lora

__all__ = ["PREFIX", "METHODS", "TASK_TYPES", "task_type", "to_peft_config", "from_peft_config", "file_key",
           "split_key"]

PREFIX = "base_model.model."
MAPPINGS = {m.METHOD: m for m in (peft_lora, peft_ia3, peft_loha, peft_lokr)}
"""deltatune method name -> the module mapping it to PEFT's names (one line per method)."""
METHODS = tuple(MAPPINGS)
"""The methods PEFT's format carries here (others are written in deltatune's own format)."""

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
"""deltatune's task names -> PEFT's ``task_type``, which picks the class ``AutoPeftModel*`` builds."""
_CLASS_SUFFIXES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                   "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                   "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def file_key(path: str, method: str, geometry: str, role: str) -> str:
    """The file key of ``role``'s tensor of module ``path`` (a full copy's role is its own state-dict key)."""
    if method == FULL:
        return f"{PREFIX}{path}.{role}"
    return f"{PREFIX}{path}.{MAPPINGS[method].role_keys(geometry)[role]}"


def split_key(key: str) -> tuple[str, str | None] | None:
    """(module path, role) of a key of any method here; (path and parameter, None) of any other key under
    the prefix (a full copy's, resolved against the model); None if the key lacks PEFT's prefix."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for mapping in MAPPINGS.values():
        for suffix, role in mapping.SUFFIX_ROLES.items():
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


def to_peft_config(cfg, parts: dict[str, ModulePart], target_modules: list[str] | str,
                   base_model: str | None = None, task: str | None = None, revision: str | None = None) -> dict:
    """The ``adapter_config.json`` dict PEFT reads for an adapter described by ``parts``.

    ``base_model`` (what ``AutoModel*.from_pretrained`` takes), ``task`` (PEFT's ``task_type``, e.g.
    "CAUSAL_LM") and ``revision`` let ``AutoPeftModelForCausalLM.from_pretrained(dir)`` load the base
    by itself; the method's own fields come from its mapping.
    """
    mapping = MAPPINGS[type(cfg).method]
    saved = sorted({p.rsplit(".", 1)[-1] for p, part in parts.items() if part.method == FULL})
    return {
        "peft_type": mapping.PEFT_TYPE,
        "task_type": task,
        "target_modules": target_modules,
        "exclude_modules": None,  # the target list is already exact
        "modules_to_save": saved or None,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "library": "deltatune",
        **mapping.to_config(cfg, {p: part for p, part in parts.items() if part.method == mapping.METHOD},
                            target_modules),
    }


def from_peft_config(raw: dict, source: str = "adapter_config.json"):
    """The method config PEFT's dict describes; unknown keys warn, unsupported settings raise naming ``source``."""
    peft_type = raw.get("peft_type", "LORA")
    mapping = next((m for m in MAPPINGS.values() if m.PEFT_TYPE == peft_type), None)
    if mapping is None:
        raise ValueError(f"{source}: peft_type is {peft_type!r}; deltatune reads "
                         f"{', '.join(m.PEFT_TYPE for m in MAPPINGS.values())} adapters")
    for key in ("layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices"):
        if raw.get(key):
            raise ValueError(f"{source}: {key} is not supported by deltatune yet")
    if raw.get("target_modules") is None:
        raise ValueError(f"{source}: target_modules is missing")
    unknown = sorted(set(raw) - _KEYS_COMMON - mapping.KEYS_READ - _KEYS_IGNORED)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown config keys {unknown}", stacklevel=3)
    targets = raw["target_modules"]  # deltatune's ``targets``: a list of suffixes, or a regex string
    return mapping.from_config({**raw, "target_modules": list(targets) if isinstance(targets, (list, tuple, set))
                                else targets}, source)


_KEYS_COMMON = {
    "peft_type", "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layer_replication",
    "target_parameters", "trainable_token_indices",
}
# Keys PEFT writes that carry no meaning for the adapter's arithmetic.
_KEYS_IGNORED = {
    "task_type", "fan_in_fan_out", "inference_mode", "base_model_name_or_path", "revision", "layers_pattern",
    "auto_mapping", "peft_version", "library", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "runtime_config", "qalora_group_size", "use_qalora", "alora_invocation_tokens",
    "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config", "use_bdlora",
    "velora_config",
}
