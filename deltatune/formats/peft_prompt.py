"""PEFT's names for its prompt-learning methods (``peft_type`` "PROMPT_TUNING", "P_TUNING",
"PREFIX_TUNING"): ``adapter_config.json`` keys and the tensor keys.

PEFT stores one tensor, ``prompt_embeddings``: the virtual tokens themselves, (n, hidden) for prompts
and (n, layers * 2 * kv_dim) for prefixes (for P-tuning and a projected prefix, the encoder's output).
deltatune also writes the encoder's own weights of P-tuning and of a projected prefix under
``deltatune_encoder.<parameter>`` (PEFT ignores keys it does not know), so training resumes from a
saved adapter; a file without them loads as a fixed table. ``modules_to_save`` copies are
``base_model.<path>.<parameter>`` (a prompt-learning PeftModel holds the base model directly). The
config's geometry fields (``token_dim``, ``num_layers``, ``num_attention_heads``) are what PEFT derives
from the model (for prefixes of grouped-query models: the key/value width and heads).
"""

from __future__ import annotations

from deltatune.adapters.description import FULL, ModulePart
from deltatune.adapters.virtual_tokens import kv_layout, token_dim
from deltatune.methods.p_tuning import PTuningConfig
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_tuning import PromptTuningConfig

__all__ = ["PEFT_TYPES", "METHODS", "OUTPUT", "ENCODER_PREFIX", "carries", "to_peft_config", "from_peft_config",
           "file_key", "split_key", "state_dict"]

PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
"""PEFT's ``peft_type`` -> deltatune's method name."""
METHODS = tuple(PEFT_TYPES.values())
OUTPUT = "prompt_embeddings"
ENCODER_PREFIX = "deltatune_encoder."
COPY_PREFIX = "base_model."
_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
_COMMON = {"peft_type", "task_type", "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
           "num_attention_heads", "num_layers", "modules_to_save", "base_model_name_or_path", "revision", "auto_mapping",
           "peft_version", "library"}
KEYS_READ = {
    "prompt_tuning": {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "p_tuning": {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"},
    "prefix_tuning": {"prefix_projection", "encoder_hidden_size", "init_weights"},
}


def carries(cfg) -> bool:
    """Whether ``cfg`` is the config of a method this file maps."""
    return type(cfg).method in METHODS


def file_key(path: str, method: str, role: str) -> str:
    """The file key of a role: ``prompt_embeddings``, an encoder weight, or a full copy's parameter at ``path``."""
    if method == FULL:
        return f"{COPY_PREFIX}{path}.{role}"
    return role if role == OUTPUT else ENCODER_PREFIX + role


def split_key(key: str) -> tuple[str, str] | None:
    """("", role) of the adapter's keys, (path, parameter) of a full copy's; None for any other key."""
    if key == OUTPUT:
        return "", OUTPUT
    if key.startswith(ENCODER_PREFIX):
        return "", key[len(ENCODER_PREFIX):]
    if key.startswith(COPY_PREFIX):
        path, _, param = key[len(COPY_PREFIX):].rpartition(".")
        return (path, param) if path else None
    return None


def state_dict(parts: dict[str, ModulePart]) -> dict:
    """The file's tensors for an adapter described by ``parts`` (its virtual tokens and full copies)."""
    out = {}
    for path, part in parts.items():
        for role, t in part.tensors.items():
            out[file_key(path, part.method, role)] = t.contiguous().cpu()
    return out


def _geometry(model, cfg) -> dict:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, heads, head_dim = kv_layout(model)
    if type(cfg).method == "prefix_tuning":
        return {"token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers}
    attention_heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head") if hasattr(config, k)), heads)
    return {"token_dim": token_dim(model), "num_attention_heads": attention_heads, "num_layers": layers}


def to_peft_config(model, cfg, parts: dict[str, ModulePart], base_model: str | None, task: str | None,
                   revision: str | None) -> dict:
    """The ``adapter_config.json`` dict PEFT reads for ``cfg`` on ``model``."""
    method = type(cfg).method
    saved = sorted({p.rsplit(".", 1)[-1] for p, part in parts.items() if part.method == FULL})
    out = {"peft_type": next(k for k, v in PEFT_TYPES.items() if v == method), "task_type": task,
           "inference_mode": True, "num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1,
           "modules_to_save": saved or None, "base_model_name_or_path": base_model, "revision": revision,
           "library": "deltatune", **_geometry(model, cfg)}
    if method == "prompt_tuning":
        tokenizer = cfg.tokenizer or base_model
        init = cfg.init if cfg.init != "text" or tokenizer else "random"  # PEFT refuses TEXT without a tokenizer
        out.update(prompt_tuning_init=_INITS[init], prompt_tuning_init_text=cfg.init_text if init == "text" else None,
                   tokenizer_name_or_path=tokenizer if init == "text" else None, tokenizer_kwargs=None)
    elif method == "p_tuning":
        out.update(encoder_reparameterization_type=cfg.encoder.upper(), encoder_hidden_size=cfg.encoder_hidden_size,
                   encoder_num_layers=cfg.encoder_num_layers, encoder_dropout=cfg.encoder_dropout)
    else:
        hidden = cfg.encoder_hidden_size or out["token_dim"]
        out.update(prefix_projection=cfg.projection, encoder_hidden_size=hidden, init_weights=None)
    return out


def from_peft_config(raw: dict, source: str = "adapter_config.json"):
    """Our config for PEFT's dict of a prompt-learning method; ValueError naming ``source``."""
    method = PEFT_TYPES[raw["peft_type"]]
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(f"{source}: num_transformer_submodules={raw['num_transformer_submodules']} (an encoder-decoder "
                         f"prompt); deltatune's {method} supports decoder-only and encoder-only models")
    n = raw.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{source}: num_virtual_tokens must be a positive integer, got {n!r}")
    unknown = sorted(set(raw) - _COMMON - KEYS_READ[method])
    if unknown:
        import warnings

        warnings.warn(f"{source}: ignoring unknown config keys {unknown}", stacklevel=3)
    saved = raw.get("modules_to_save")
    saved = list(saved) if saved else None
    try:
        if method == "prompt_tuning":
            init = {v: k for k, v in _INITS.items()}.get(str(raw.get("prompt_tuning_init", "RANDOM")))
            if init is None:
                raise ValueError(f"prompt_tuning_init {raw.get('prompt_tuning_init')!r} is not one of {sorted(_INITS.values())}")
            return PromptTuningConfig(num_virtual_tokens=n, init=init, init_text=raw.get("prompt_tuning_init_text"),
                                      tokenizer=raw.get("tokenizer_name_or_path"), modules_to_save=saved)
        if method == "p_tuning":
            encoder = str(raw.get("encoder_reparameterization_type", "MLP")).lower()
            return PTuningConfig(num_virtual_tokens=n, encoder=encoder,
                                 encoder_hidden_size=raw.get("encoder_hidden_size") or raw.get("token_dim") or 128,
                                 encoder_num_layers=raw.get("encoder_num_layers", 2),
                                 encoder_dropout=float(raw.get("encoder_dropout", 0.0)), modules_to_save=saved)
        return PrefixTuningConfig(num_virtual_tokens=n, projection=bool(raw.get("prefix_projection", False)),
                                  encoder_hidden_size=raw.get("encoder_hidden_size"), modules_to_save=saved)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
