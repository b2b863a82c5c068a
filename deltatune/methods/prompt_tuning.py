"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): n trainable embeddings prepended to every input,
the model frozen.

The table is (n, hidden), initialised as PEFT's ``PromptEmbedding`` does: "random" draws N(0, 1)
(``nn.Embedding``'s init), "vocab" copies the embeddings of n token ids drawn uniformly from the
vocabulary (PEFT's SAMPLE_VOCAB), "text" copies the embeddings of ``init_text``'s tokens, cut or
repeated to n (PEFT's TEXT; the tokenizer is ``tokenizer`` or the model's ``name_or_path``). The
virtual tokens enter through ``deltatune.adapters.VirtualTokens`` (a per-row input: the attention mask
and labels are extended, position ids count over prompt + input, as in PEFT). Files are PEFT's
(``prompt_embeddings``; ``formats/peft_prompt.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from deltatune.adapters.method import register_method
from deltatune.adapters.virtual_tokens import check_length, token_dim, virtual_tokens

__all__ = ["PromptTuningConfig", "PromptEmbedding", "PROMPT_TUNING", "TableEncoder", "init_token_ids"]

INITS = ("random", "text", "vocab")


@dataclass
class PromptTuningConfig:
    """Settings of one prompt-tuning adapter."""

    method: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 20
    """Trainable tokens prepended to every input."""
    init: Literal["random", "text", "vocab"] = "random"
    """Initial embeddings: "random" N(0, 1), "vocab" those of random vocabulary tokens, "text" those of init_text's tokens."""
    init_text: str | None = None
    """The text whose token embeddings start the prompt (init="text"), cut or repeated to num_virtual_tokens."""
    tokenizer: str | None = None
    """Tokenizer (directory or hub id) for init="text"; default: the model's name_or_path."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"PromptTuningConfig: init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("PromptTuningConfig: init='text' needs init_text (the text whose embeddings start the prompt)")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"PromptTuningConfig: num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")

    def replace(self, **changes) -> "PromptTuningConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class TableEncoder(nn.Module):
    """A table of n virtual tokens, (n, width): a prompt (width = hidden) or a flat prefix (PEFT's layout)."""

    def __init__(self, table: torch.Tensor, kind: str, method: str, kv_layout: tuple[int, int, int] | None = None):
        super().__init__()
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)  # PEFT's module name
        with torch.no_grad():
            self.embedding.weight.copy_(table)
        self.kind, self.method, self.kv_layout = kind, method, kv_layout
        self.num_virtual_tokens = table.shape[0]

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (n, width)

    def roles(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def load_roles(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(tensors["prompt_embeddings"])


PromptEmbedding = TableEncoder
"""Prompt tuning's encoder: the table itself (PEFT's ``PromptEmbedding``)."""


def init_token_ids(model: nn.Module, cfg: PromptTuningConfig, n: int) -> torch.Tensor | None:
    """The token ids whose embeddings start the prompt (None for init="random"), as PEFT draws them."""
    weight = model.get_input_embeddings().weight
    if cfg.init == "vocab":
        return torch.randint(0, weight.shape[0], (n,), dtype=torch.long)
    if cfg.init != "text":
        return None
    source = cfg.tokenizer or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("prompt tuning: init='text' needs a tokenizer; set PromptTuningConfig(tokenizer=<directory "
                         "or hub id>) (the model records no name_or_path)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"prompt tuning: init='text' cannot load the tokenizer {source!r} ({type(e).__name__}: {e}); "
                         f"set PromptTuningConfig(tokenizer=<directory or hub id>)") from None
    ids = tokenizer(cfg.init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt tuning: init_text {cfg.init_text!r} gives no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # cut or repeat to n, as PEFT does
    if max(ids) >= weight.shape[0]:
        raise ValueError(f"prompt tuning: tokenizer {source!r} gives token id {max(ids)}, beyond the model's "
                         f"vocabulary of {weight.shape[0]}")
    return torch.tensor(ids, dtype=torch.long)


class PromptTuningMethod:
    """Prompt tuning as a model-level method (``deltatune.adapters.ModelMethod``)."""

    name = "prompt_tuning"
    config = PromptTuningConfig

    def model_shapes(self, model: nn.Module, cfg: PromptTuningConfig) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": (cfg.num_virtual_tokens, token_dim(model))}

    def add_to(self, model: nn.Module, cfg: PromptTuningConfig, name: str) -> None:
        n = cfg.num_virtual_tokens
        check_length(model, n, self.name)
        embeddings = model.get_input_embeddings()
        table = nn.Embedding(n, token_dim(model)).weight.detach()  # N(0, 1); drawn first, as PEFT does
        ids = init_token_ids(model, cfg, n)
        if ids is not None:
            with torch.no_grad():
                table = embeddings(ids.to(embeddings.weight.device)).detach().float()
        table = table.to(device=embeddings.weight.device, dtype=torch.float32)
        virtual_tokens(model, create=True).add(name, TableEncoder(table, "prompt", self.name))


PROMPT_TUNING = register_method(PromptTuningMethod())
