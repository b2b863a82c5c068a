"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): n trainable keys and values in front of every
attention layer's own, supplied through the model's cache (transformers' ``DynamicCache``), the
model frozen.

The prefix is PEFT's ``PrefixEncoder``: without ``projection`` a table (n, layers * 2 * kv_dim),
drawn N(0, 1); with it an embedding (n, kv_dim) through Linear(kv_dim, h) Tanh Linear(h, layers * 2 *
kv_dim), h = ``encoder_hidden_size`` (default kv_dim). kv_dim = kv_heads * head_dim: grouped-query
models get prefixes for their key/value heads (``deltatune.adapters.virtual_tokens.kv_layout``).
Each row of the table splits into (2 * layers, kv_heads, head_dim), keys at even and values at odd
places, as PEFT's. The attention mask is extended by n; position ids, where given, shift by n.

Files: ``prompt_embeddings`` holds the flat prefix (what PEFT loads); with ``projection`` deltatune
also writes the projection's weights (``deltatune_encoder.*``, keys PEFT ignores) so training resumes;
a file without them (PEFT-made) loads as a fixed table. Gradient checkpointing does not combine with
a prefix in the cache (recomputed layers would add it twice), as in PEFT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from deltatune.adapters.method import register_method
from deltatune.adapters.virtual_tokens import check_length, kv_layout, virtual_tokens

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "PREFIX_TUNING"]

OUTPUT = "prompt_embeddings"


@dataclass
class PrefixTuningConfig:
    """Settings of one prefix-tuning adapter."""

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20
    """Prefix length: keys/values added in front of every attention layer's own."""
    projection: bool = False
    """Produce the prefix by an MLP over n embeddings (Li & Liang's reparametrisation) instead of a free table."""
    encoder_hidden_size: int | None = None
    """Hidden width of the projection (default: the key/value width)."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"PrefixTuningConfig: num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"PrefixTuningConfig: encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")

    def replace(self, **changes) -> "PrefixTuningConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class PrefixEncoder(nn.Module):
    """PEFT's prefix encoder (same module names: ``embedding``, ``transform``); without ``transform`` the
    embedding is the flat prefix itself."""

    kind = "prefix"
    method = "prefix_tuning"

    def __init__(self, cfg: PrefixTuningConfig, layout: tuple[int, int, int]):
        super().__init__()
        layers, heads, head_dim = layout
        n, kv_dim = cfg.num_virtual_tokens, heads * head_dim
        self.num_virtual_tokens, self.kv_layout = n, layout
        if cfg.projection:
            h = cfg.encoder_hidden_size or kv_dim
            self.embedding = nn.Embedding(n, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, h), nn.Tanh(), nn.Linear(h, layers * 2 * kv_dim))
        else:
            self.embedding = nn.Embedding(n, layers * 2 * kv_dim)

    @property
    def table(self) -> bool:
        """Whether the prefix is a table (no projection, or loaded from a file without its weights)."""
        return not hasattr(self, "transform")

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return x if self.table else self.transform(x)  # (n, layers * 2 * kv_dim)

    def roles(self) -> dict[str, torch.Tensor]:
        if self.table:
            return {OUTPUT: self.embedding.weight}
        with torch.no_grad():
            output = self()
        return {OUTPUT: output, **dict(self.named_parameters())}

    def load_roles(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = {k: v for k, v in tensors.items() if k != OUTPUT}
        with torch.no_grad():
            if not weights:
                if not self.table:  # a projection's output only (a PEFT file): the prefix becomes that table
                    del self.transform
                    self.embedding = nn.Embedding(*tensors[OUTPUT].shape, device=self.embedding.weight.device)
                self.embedding.weight.copy_(tensors[OUTPUT])
                return
            own = dict(self.named_parameters())
            missing = sorted(set(own) - set(weights))
            if missing:
                raise ValueError(f"prefix_tuning: the projection's weights {missing} are missing (a file holds all or none)")
            for k, v in weights.items():
                own[k].copy_(v)


class PrefixTuningMethod:
    """Prefix tuning as a model-level method (``deltatune.adapters.ModelMethod``)."""

    name = "prefix_tuning"
    config = PrefixTuningConfig

    def model_shapes(self, model: nn.Module, cfg: PrefixTuningConfig) -> dict[str, tuple[int, ...]]:
        layout = kv_layout(model)
        with torch.device("meta"):
            encoder = PrefixEncoder(cfg, layout)
        shapes = {} if encoder.table else {k: tuple(p.shape) for k, p in encoder.named_parameters()}
        layers, heads, head_dim = layout
        return {OUTPUT: (cfg.num_virtual_tokens, layers * 2 * heads * head_dim), **shapes}

    def add_to(self, model: nn.Module, cfg: PrefixTuningConfig, name: str) -> None:
        check_length(model, cfg.num_virtual_tokens, self.name)
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            raise ValueError("prefix_tuning does not work with gradient checkpointing (recomputed layers would add "
                             "the prefix to the cache twice); switch it off first")
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(cfg, kv_layout(model)).to(device)
        virtual_tokens(model, create=True).add(name, encoder)


PREFIX_TUNING = register_method(PrefixTuningMethod())
