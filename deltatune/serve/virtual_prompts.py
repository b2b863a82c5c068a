"""Prompt-method adapters in the serving engine: prompt tuning, P-tuning and prefix tuning as virtual token ids.

These adapters change a request's input, not the weights (``deltatune.adapters.virtual_tokens``). The
engine serves them by giving each adapter's n virtual tokens ids past the vocabulary, prepended to the
prompt of every request that names it; the rest of the engine (paged KV cache, chunked prefill,
positions, continuous batching, decode graphs) sees ordinary tokens. The model runner then:

* for a prompt (prompt tuning, P-tuning): embeds a virtual id as the adapter's learned embedding
  (``embed``) instead of a row of the embedding table;
* for a prefix (prefix tuning): stores the adapter's learned keys and values of every layer at the
  virtual positions (``prefix_kv``, after the rotary embedding: PEFT's past key values are used as they
  are) in place of what the layer computed there; nothing reads the hidden states of those positions.

Positions follow PEFT: a prompt's virtual tokens take positions 0..n-1 and the input counts on from n
(the model counts over prompt + input); a prefix shifts the input's positions by n. The tables are
computed once when the adapter is added (a P-tuning encoder runs then), so a request costs nothing beyond
its n extra tokens. An id range is never reused: a running request's ids stay valid while other adapters
come and go.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["VirtualPrompts", "PROMPT_METHODS"]

PROMPT_METHODS = {"PROMPT_TUNING": "prompt tuning", "P_TUNING": "P-tuning", "PREFIX_TUNING": "prefix tuning"}
"""PEFT's ``peft_type`` of the adapters served as virtual tokens."""


class VirtualPrompts:
    """The virtual tokens of the prompt-method adapters an engine serves, by adapter name.

    Args:
        vocab_size: the model's vocabulary (virtual ids start there).
        hidden_size: the width of a prompt's embeddings.
        num_layers, num_kv_heads, head_dim: the key/value layout of a prefix.
        device, dtype: where the tables live (the model's).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.layout = (num_layers, num_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.ranges: dict[str, tuple[int, int]] = {}  # name -> (first id, n)
        self.kinds: dict[str, str] = {}  # name -> "prompt" | "prefix"
        self.next_id = vocab_size
        self.prompts: torch.Tensor | None = None  # (ids handed out, hidden): prompt embeddings by id - vocab
        self.keys: torch.Tensor | None = None  # (layers, ids handed out, kv heads, head_dim): prefix keys
        self.values: torch.Tensor | None = None
        self.is_prefix: torch.Tensor | None = None  # (ids handed out,) bool: a prefix's ids

    def __contains__(self, name: str) -> bool:
        return name in self.ranges

    def add(self, name: str, encoder: nn.Module) -> None:
        """Hold the virtual tokens of ``encoder`` (a ``VirtualTokens`` encoder: ``kind``, ``num_virtual_tokens``,
        ``forward()``, for a prefix ``kv_layout``) as adapter ``name``."""
        if name in self.ranges:
            raise ValueError(f"virtual tokens named {name!r} are already added")
        n = encoder.num_virtual_tokens
        with torch.no_grad():
            table = encoder().to(device=self.device, dtype=self.dtype)  # (n, hidden) or (n, 2 * layers * kv)
        layers, heads, head_dim = self.layout
        zeros = dict(device=self.device, dtype=self.dtype)
        if encoder.kind == "prompt":
            if table.shape != (n, self.hidden_size):
                raise ValueError(f"prompt adapter {name!r}: embeddings of shape {tuple(table.shape)}, the model's "
                                 f"are {self.hidden_size} wide")
            keys = torch.zeros(layers, n, heads, head_dim, **zeros)  # ordinary tokens: nothing to store
            rows, values = table, keys
        elif encoder.kind == "prefix":
            if tuple(encoder.kv_layout) != self.layout:
                raise ValueError(f"prefix adapter {name!r}: keys/values laid out as {tuple(encoder.kv_layout)} "
                                 f"(layers, kv heads, head dim), the model as {self.layout}")
            kv = table.reshape(n, 2 * layers, heads, head_dim).permute(1, 0, 2, 3)  # PEFT: (n, 2 * layers, ...)
            rows, keys, values = torch.zeros(n, self.hidden_size, **zeros), kv[0::2], kv[1::2]  # layer i: key, value
        else:
            raise ValueError(f"adapter {name!r}: virtual tokens of kind {encoder.kind!r} are not served")
        prefix = torch.full((n,), encoder.kind == "prefix", dtype=torch.bool, device=self.device)
        grow = lambda old, new, dim=0: new.contiguous() if old is None else torch.cat([old, new], dim)  # noqa: E731
        self.prompts, self.is_prefix = grow(self.prompts, rows), grow(self.is_prefix, prefix)
        self.keys, self.values = grow(self.keys, keys, 1), grow(self.values, values, 1)
        self.ranges[name] = (self.next_id, n)
        self.kinds[name] = encoder.kind
        self.next_id += n

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (its ids are not handed out again)."""
        del self.ranges[name], self.kinds[name]

    def ids(self, name: str) -> list[int]:
        """The virtual ids a request of adapter ``name`` starts with."""
        first, n = self.ranges[name]
        return list(range(first, first + n))

    @property
    def has_prefix(self) -> bool:
        return "prefix" in self.kinds.values()

    def embed(self, ids: torch.Tensor, embed_tokens: nn.Module) -> torch.Tensor:
        """Embeddings (T, hidden) of ``ids``: the embedding table's rows, and a prompt's learned embedding at
        its virtual ids (a prefix's virtual positions get zeros: their hidden states are never read)."""
        virtual = ids >= self.vocab_size
        h = embed_tokens(ids.masked_fill(virtual, 0))
        if self.prompts is None:
            return h
        table = self.prompts[(ids - self.vocab_size).clamp(min=0, max=self.prompts.shape[0] - 1)]
        return torch.where(virtual[:, None], table.to(h.dtype), h)

    def prefix_kv(self, layer: int, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Layer ``layer``'s keys and values (T, kv heads, head_dim) with a prefix's learned ones at its virtual
        ids (a prompt's virtual tokens are ordinary tokens here: their keys and values stay as computed)."""
        index = (ids - self.vocab_size).clamp(min=0, max=self.keys.shape[1] - 1)
        prefix = (ids >= self.vocab_size) & self.is_prefix[index]
        k = torch.where(prefix[:, None, None], self.keys[layer, index].to(k.dtype), k)
        v = torch.where(prefix[:, None, None], self.values[layer, index].to(v.dtype), v)
        return k, v
