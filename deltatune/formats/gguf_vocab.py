"""A tokenizer as GGUF metadata (``tokenizer.ggml.*``), which llama.cpp and transformers' GGUF loader
read back: the tokens in id order, their types, the BPE merges, the special token ids, the chat template.

Two sources: a Hugging Face fast tokenizer (its ``tokenizer.json``: byte-level BPE is GGUF's "gpt2"
model, sentencepiece-style BPE with byte fallback its "llama" model), or the ``tokenizer.*`` fields of
another GGUF file, copied as they are (a model trained from a GGUF base keeps its exact vocabulary).
Key names and token types are the ``gguf`` package's (``gguf.Keys.Tokenizer``, ``gguf.TokenType``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

__all__ = ["add_vocab", "copy_vocab", "VocabError"]


class VocabError(ValueError):
    """A tokenizer that cannot be written as GGUF metadata; the message says why."""


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level pre-tokenizer, which picks the regex text
    is split with before BPE: the one transformers' GGUF loader maps back to the same Split regex, else
    "gpt-2" for plain byte-level, "smollm" for single digits + byte-level (SmolLM/StarCoder)."""
    parts = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    types = [p.get("type") for p in parts]
    for p in parts:
        regex = (p.get("pattern") or {}).get("Regex") if p.get("type") == "Split" else None
        if regex:
            try:  # the reader's own table: whatever name it maps back to this regex
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:
                break
            names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
            if names:
                return names[0]
    if types == ["ByteLevel"]:
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    warnings.warn(f"GGUF export: no llama.cpp pre-tokenizer name for {types}; writing 'default'", stacklevel=3)
    return "default"


def add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """Add ``tokenizer``'s vocabulary to GGUF ``writer``, padded with unused tokens to ``vocab_size`` rows
    (the embedding's). Raises ``VocabError`` for tokenizers other than BPE."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs one")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabError(f"a {model.get('type')} tokenizer cannot be written to GGUF here (BPE only)")
    byte_level = any(p.get("type") == "ByteLevel" for p in
                     [spec.get("decoder") or {}, *((spec.get("decoder") or {}).get("decoders") or [])])
    if not byte_level and not model.get("byte_fallback"):
        raise VocabError("a BPE tokenizer that is neither byte-level nor byte-fallback (sentencepiece) cannot be "
                         "written to GGUF here")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    vocab.update({content: t["id"] for content, t in added.items()})
    if max(vocab.values()) >= vocab_size:
        raise VocabError(f"the tokenizer has token id {max(vocab.values())}, but the model's embedding has "
                         f"only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if token in added:
            types[index] = gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED
        elif token == model.get("unk_token"):
            types[index] = gguf.TokenType.UNKNOWN
        elif not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[index] = gguf.TokenType.BYTE
        else:
            types[index] = gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-float(i) for i in range(vocab_size)])  # merge priority: earlier ids first
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None:
            add(int(index))
    for name, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)):
        value = getattr(tokenizer, name, None)
        if isinstance(value, bool):
            add(value)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def copy_vocab(writer, source: str | Path) -> None:
    """Add the ``tokenizer.*`` fields of GGUF file ``source`` to ``writer`` exactly as they are there."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    found = False
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        found = True
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    if not found:
        raise VocabError(f"{source}: holds no tokenizer.* fields to copy")
