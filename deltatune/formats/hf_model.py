"""A plain Hugging Face model directory: ``config.json``, ``model.safetensors``, ``generation_config.json``
and the tokenizer's files, which ``AutoModelFor*.from_pretrained(dir)`` loads.

Written here rather than by transformers' ``save_pretrained``, which refuses any model loaded from a
GGUF file ("quantized with gguf and is not serializable"): transformers dequantizes a GGUF's weights
at load time but keeps the file's ``quantization_config`` on the config. The weights are plain
tensors, so this writes them as they are, with the config minus that marker. Every file is written
to a temporary name and renamed; tensors that share storage (tied embeddings) are written once when
the config ties them, so transformers ties them again on load.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.formats.atomic import atomic_write

__all__ = ["save_model_dir", "save_tokenizer", "plain_config", "model_bytes", "ModelDirError", "WEIGHTS_NAME",
           "QUANT_KEYS"]

WEIGHTS_NAME = "model.safetensors"
QUANT_KEYS = ("quantization_config", "_pre_quantization_dtype")
"""Config attributes that mark a model as quantized for transformers; a dequantized model drops them."""


class ModelDirError(ValueError):
    """A model that cannot be written as a plain model directory; the message says why."""


def plain_config(model: nn.Module, dtype: torch.dtype | None = None):
    """A copy of ``model.config`` without the quantization markers, naming the model's class and
    ``dtype`` (default: the dtype of its first floating-point parameter)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ModelDirError(f"{type(model).__name__} has no Hugging Face config; a model directory needs one "
                            f"(save a plain torch module with torch.save(model.state_dict()) instead)")
    config = copy.deepcopy(config)
    for key in QUANT_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    config.architectures = [type(model).__name__]
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config.dtype = dtype
    return config


def _unique_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with keys transformers re-ties on load dropped, when they alias their source; any other
    tensors sharing storage are cloned (safetensors refuses shared storage)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {}) if getattr(text, "tie_word_embeddings", False) \
        else {}
    out, seen = {}, {}
    for key, tensor in state.items():
        source = tied.get(key)
        if source in state and state[source].data_ptr() == tensor.data_ptr():
            continue
        ptr = (tensor.device, tensor.untyped_storage().data_ptr())
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.setdefault(ptr, key)
    return out


def model_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes the tensors of ``state`` take on disk (floating-point ones as ``dtype`` if given)."""
    total = 0
    for t in state.values():
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        total += t.numel() * size
    return total


def save_model_dir(model: nn.Module, target: str | os.PathLike, tokenizer=None,
                   state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (a transformers model, or its ``state`` dict given separately) as a plain model
    directory ``target``, with ``tokenizer``'s files if given; floating-point tensors are cast to
    ``dtype`` if given. Returns the directory."""
    from safetensors.torch import save_file

    config = plain_config(model, dtype)
    state = model.state_dict() if state is None else state
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in _unique_state(model, state).items()}
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = config.to_json_string(use_diff=True)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        gen_text = generation.to_json_string(use_diff=True)
        atomic_write(out / "generation_config.json", lambda tmp: Path(tmp).write_text(gen_text))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def save_tokenizer(tokenizer, target: Path) -> list[Path]:
    """Write ``tokenizer``'s files into ``target``, each renamed into place from a scratch directory
    beside it (so no half-written tokenizer file is ever left). Returns the files written."""
    scratch = Path(tempfile.mkdtemp(dir=target, prefix=".tokenizer."))
    written = []
    try:
        tokenizer.save_pretrained(scratch)
        for f in sorted(scratch.iterdir()):
            if f.is_file():
                os.replace(f, target / f.name)
                written.append(target / f.name)
    finally:
        for f in scratch.iterdir():
            f.unlink()
        scratch.rmdir()
    return written

