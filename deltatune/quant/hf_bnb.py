"""Load a model that transformers saved in bitsandbytes 4-bit into ``QuantLinear`` layers, without
bitsandbytes.

transformers writes each ``Linear4bit`` as the keys of bitsandbytes' ``QuantState.as_dict(packed=True)``
under the weight's name::

    <name>.weight                                   uint8 (ceil(n/2), 1)  packed codes (or a wider
                                                    quant_storage dtype viewed as bytes)
    <name>.weight.absmax                            fp32 (blocks,), or uint8 with double quant
    <name>.weight.quant_map                         fp32 (16,)  the NF4/FP4 table
    <name>.weight.nested_absmax                     fp32 (ceil(blocks/256),)       [double quant]
    <name>.weight.nested_quant_map                  fp32 (256,) the dynamic 8-bit code  [double quant]
    <name>.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8: JSON {quant_type, blocksize, dtype, shape,
                                                    nested_blocksize, nested_dtype, nested_offset}

These map one to one onto ``QuantizedTensor``; all other keys (norms, embeddings, the head) load as
ordinary tensors. Files are read with safetensors only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.quant.codes import NESTED_BLOCKSIZE, code_table, dynamic_map
from deltatune.quant.nf4 import QuantizedTensor
from deltatune.quant.qlinear import QuantLinear

__all__ = ["read_safetensors", "quant_state_from_keys", "quantized_prefixes", "load_bnb_4bit", "from_pretrained_bnb"]

_STATE_KEY = ".quant_state.bitsandbytes__"


def read_safetensors(source: str | Path | dict) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, of every such file in a directory, or ``source`` if a dict."""
    if isinstance(source, dict):
        return source
    from safetensors.torch import load_file

    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def quantized_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the quantized weights in ``state`` (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
    return sorted(k.split(_STATE_KEY)[0] for k in state if _STATE_KEY in k)


def quant_state_from_keys(state: dict[str, torch.Tensor], prefix: str) -> QuantizedTensor:
    """The ``QuantizedTensor`` stored under ``prefix`` (a weight's name) in a bitsandbytes state dict.

    Raises ValueError if the stored code tables are not bitsandbytes' NF4/FP4 and dynamic 8-bit ones
    (those are the only ones bitsandbytes writes) or the nested blocksize is not 256.
    """
    keys = [k for k in state if k.startswith(prefix + _STATE_KEY)]
    if len(keys) != 1:
        raise ValueError(f"{prefix}: expected one '{_STATE_KEY}<type>' key, found {keys}")
    meta = json.loads(bytes(state[keys[0]].tolist()).decode("utf-8"))
    kind = meta["quant_type"]
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"{prefix}: quant_type {kind!r} is not nf4/fp4")
    packed = state[prefix]
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP-friendly bf16, say)
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    quant_map = state[f"{prefix}.quant_map"].float()
    if not torch.equal(quant_map.cpu(), code_table(kind)):
        raise ValueError(f"{prefix}: quant_map differs from bitsandbytes' {kind} table")
    shape = torch.Size(meta["shape"])
    q = QuantizedTensor(packed, state[f"{prefix}.absmax"], shape, getattr(torch, meta["dtype"]), kind, int(meta["blocksize"]))
    if f"{prefix}.nested_absmax" in state:
        if int(meta["nested_blocksize"]) != NESTED_BLOCKSIZE:
            raise ValueError(f"{prefix}: nested_blocksize {meta['nested_blocksize']} (only {NESTED_BLOCKSIZE} is supported)")
        if not torch.equal(state[f"{prefix}.nested_quant_map"].float().cpu(), dynamic_map()):
            raise ValueError(f"{prefix}: nested_quant_map differs from bitsandbytes' dynamic 8-bit code")
        q.nested_absmax = state[f"{prefix}.nested_absmax"].float()
        q.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
    elif q.absmax.dtype == torch.uint8:
        raise ValueError(f"{prefix}: uint8 absmax without nested_absmax")
    if packed.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"{prefix}: {packed.numel()} packed bytes for shape {tuple(shape)}")
    return q


def load_bnb_4bit(model: nn.Module, source: str | Path | dict, compute_dtype: torch.dtype | None = torch.bfloat16,
                  strict: bool = True) -> nn.Module:
    """Load a bitsandbytes 4-bit checkpoint into ``model`` in place; returns ``model``.

    ``model`` is the unquantized architecture (real or on the meta device). Each ``nn.Linear`` whose
    weight is quantized in ``source`` becomes a ``QuantLinear`` computing in ``compute_dtype``; every
    other tensor is loaded as is (``assign``, so meta tensors materialise). With ``strict`` a missing
    or unexpected key raises.
    """
    state = dict(read_safetensors(source))
    loaded = set()
    for prefix in quantized_prefixes(state):
        name = prefix.removesuffix(".weight")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{prefix}: the model has no module {name!r}") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{prefix}: {name!r} is a {type(linear).__name__}, not nn.Linear")
        q = quant_state_from_keys(state, prefix)
        if tuple(q.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{prefix}: stored shape {tuple(q.shape)} != model's {tuple(linear.weight.shape)}")
        for key in [k for k in state if k == prefix or k.startswith(prefix + ".")]:
            del state[key]
        bias = state.pop(f"{name}.bias", None)
        quant = QuantLinear(q, bias, compute_dtype or q.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quant)
        loaded.add(name)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in loaded]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys a checkpoint may omit because the model ties them (the output head to the embeddings)."""
    keys = set()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        head = getattr(model, "get_output_embeddings", lambda: None)()
        for name, module in model.named_modules():
            if module is head and head is not None:
                keys.add(f"{name}.weight")
    return keys


def from_pretrained_bnb(path: str | Path, compute_dtype: torch.dtype = torch.bfloat16, device: str | None = None) -> nn.Module:
    """A transformers causal LM built from ``path``'s config.json and loaded from its bitsandbytes 4-bit
    safetensors into ``QuantLinear`` layers (transformers needed, bitsandbytes not).

    The architecture is built for real on ``device`` (default CPU) rather than on the meta device,
    so that buffers computed at construction (rotary frequencies) exist; its random linear weights
    are dropped as the quantized layers replace them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    load_bnb_4bit(model, path, compute_dtype)
    return model.to(device or "cpu").eval()
