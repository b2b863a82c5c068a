"""Writing a plain (merged) model as one GGUF file for llama.cpp / Ollama, with the ``gguf`` package's
``GGUFWriter``: f16, bf16 or q8_0 weights (norms stay f32, as llama.cpp's converter keeps them), the
architecture's metadata and the tokenizer.

Llama-family models only (``model_type == "llama"``: Llama 2/3-style, SmolLM, TinyLlama, ...) with the
default RoPE; anything else is a clear error. Names and keys come from the ``gguf`` package: tensor
names from its llama name map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``), metadata
through the writer's ``add_*`` methods. llama.cpp stores q and k with each head's rotary halves
interleaved; transformers' GGUF loader undoes that (``LlamaTensorProcessor``), so this does it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deltatune.formats.atomic import atomic_write

__all__ = ["write_gguf", "GGUF_DTYPES", "GGUFExportError"]

GGUF_DTYPES = ("f16", "bf16", "q8_0")
"""Weight types of the exported file (2-D weights; 1-D norms are always f32)."""


class GGUFExportError(ValueError):
    """A model that cannot be written as GGUF; the message says why."""


def _config_value(config, name: str):
    value = getattr(config, name, None)
    if value is None:
        raise GGUFExportError(f"the model's config has no {name}; cannot write GGUF metadata")
    return value


def _rope_theta(config) -> float:
    """RoPE base frequency; refuses scaled RoPE (llama3/linear/yarn), which needs more than this writes."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise GGUFExportError(f"RoPE type {kind!r} is not supported by the GGUF export yet (only the default RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("the model's config has no rope_theta; cannot write GGUF metadata")
    return float(theta)


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (heads * head_dim, in) from transformers' layout (each head: first half, second half of
    the rotary pairs) to llama.cpp's (pairs adjacent): (heads, 2, head_dim/2, in) -> (heads, head_dim/2, 2, in)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _encode(tensor: torch.Tensor, dtype: str):
    """(numpy data, raw GGML type or None) of one tensor in the file's type."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1:
        return data, None  # norms: f32
    if dtype == "f16":
        return data.astype("float16"), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype("float16"), None  # Q8_0 blocks are 32 values of a row: llama.cpp's fallback too
    return gguf.quants.quantize(data, kind), kind


def write_gguf(path: str | os.PathLike, config, state: dict[str, torch.Tensor], tokenizer=None,
               dtype: str = "f16", vocab_from: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """Write a Llama-family model as GGUF file ``path``: ``config`` (its transformers config), ``state``
    (its state dict, adapters merged), the tokenizer's vocabulary (``tokenizer``, or the ``tokenizer.*``
    fields of GGUF file ``vocab_from``, copied), weights in ``dtype`` ("f16", "bf16", "q8_0").
    Returns the path. Raises ``GGUFExportError`` for other architectures or unsupported settings."""
    import gguf

    from deltatune.formats.gguf_vocab import add_vocab, copy_vocab

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"--dtype {dtype!r}: choose one of {list(GGUF_DTYPES)}")
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise GGUFExportError(f"GGUF export supports Llama-family models (model_type 'llama'); this one is "
                              f"{model_type!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"{flag}=True is not supported by the GGUF export yet")
    if tokenizer is None and vocab_from is None:
        raise GGUFExportError("a GGUF file carries its tokenizer: give the model's tokenizer")
    layers, heads = int(_config_value(config, "num_hidden_layers")), int(_config_value(config, "num_attention_heads"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(_config_value(config, "hidden_size"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    vocab_size = int(_config_value(config, "vocab_size"))
    tied = bool(getattr(config, "tie_word_embeddings", False))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    tensors = []
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue  # GGUF ties by leaving output.weight out; transformers sets tie_word_embeddings from that
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"tensor {key!r} has no name in GGUF's llama layout")
        if gguf_name.endswith("attn_q.weight"):
            value = _interleave_rotary(value, heads)
        elif gguf_name.endswith("attn_k.weight"):
            value = _interleave_rotary(value, kv_heads)
        tensors.append((gguf_name, value))
    if not tied and "lm_head.weight" not in state:
        raise GGUFExportError("the state has no lm_head.weight and the config does not tie it to the embedding")

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    path = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type("model")
        writer.add_name(name or path.stem)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(int(_config_value(config, "intermediate_size")))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(_config_value(config, "rms_norm_eps")))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if vocab_from is not None:
            copy_vocab(writer, vocab_from)
        else:
            add_vocab(writer, tokenizer, vocab_size)
        for gguf_name, value in tensors:
            data, raw = _encode(value, dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)  # quantized bytes: the writer derives the shape
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path
