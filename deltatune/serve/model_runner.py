"""One forward of a Llama-family decoder over the flattened tokens of a step, with paged attention.

A step mixes prefill chunks and decode tokens of many sequences; all their tokens go through the
model as one ``x`` of shape (T, hidden). Every projection is then called on 2-D (T, in) inputs, so
per-token adapters work through ``routed(model, rows)`` (one adapter name or None per token):
``deltatune.adapters.routed`` or an adapter pool's faster ``pool.routed``. The model's own modules
and weights are reused (embedding, q/k/v/o and MLP projections, RMSNorms, the rotary module with the
config's rope scaling, the head); only attention is ours: new keys and values go into the paged
cache, then each sequence's queries attend to its cached context, with grouped-query heads and the
sliding window where the config has one. Decode rows (one query token per sequence) attend in
``deltatune.kernels.paged_attention`` (a Triton flash-decoding kernel on a GPU, a gather + SDPA
reference elsewhere) over device tensors of a static shape: the lengths (B,) and the block tables
(B, W) with W rounded up to a power of two, so a step's decode attention is two launches whose shapes
depend on (B, W) only. Prefill chunks keep the PyTorch path: the blocks gathered per sequence, padded,
and one SDPA call, causal with the sequence's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltatune.kernels.paged_attention import paged_decode_attention
from deltatune.serve.kv_cache import PagedKVCache

__all__ = ["SUPPORTED", "UnsupportedModelError", "Chunk", "ModelRunner"]

SUPPORTED = ("llama", "qwen2", "mistral")
"""config.model_type of the decoders the runner knows (SmolLM2 is a Llama)."""


class UnsupportedModelError(ValueError):
    """The model is not a Llama-family decoder the runner can drive."""


@dataclass
class Chunk:
    """Tokens of one sequence computed in a step: ``token_ids`` at positions ``start ..``."""

    seq_id: int
    token_ids: list[int]
    start: int
    adapter: str | None = None
    want_logits: bool = True
    """Return the logits of the last token (the sequence's next token is sampled from them)."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def blocks_bucket(width: int) -> int:
    """The block-table width decode attention runs at for tables of at most ``width`` blocks: the next
    power of two, so the launch shapes take few distinct values (decode CUDA graphs use one width for all:
    ``serve.decode_graphs``)."""
    return 1 << max(0, width - 1).bit_length()


class _Decode:
    """The decode rows of a step (one query token each): their rows in the step's tokens (S,), their
    context lengths (S,) and their block tables (S, W bucket), int32 on the device in one copy."""

    def __init__(self, chunks: list[Chunk], offsets: list[int], cache: PagedKVCache, device: torch.device):
        S = len(chunks)
        tables = [cache.tables[c.seq_id] for c in chunks]
        width = blocks_bucket(max(map(len, tables)))
        lens = [c.start + 1 for c in chunks]  # the query's own key included
        padded = [b for t in tables for b in t + [0] * (width - len(t))]  # block 0: never read past a length
        flat = torch.tensor(offsets + lens + padded, dtype=torch.int32)
        if device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        self.tokens, self.lens, self.tables = flat[:S], flat[S:2 * S], flat[2 * S:].view(S, width)


class _Group:
    """Prefill chunks whose attention runs as one padded SDPA call: queries (S, Q), contexts (S, C)."""

    def __init__(self, chunks: list[Chunk], offsets: list[int], cache: PagedKVCache, device: torch.device):
        q_len = max(len(c.token_ids) for c in chunks)
        index = torch.zeros(len(chunks), q_len, dtype=torch.long)
        valid = torch.zeros(len(chunks), q_len, dtype=torch.bool)
        qpos = torch.zeros(len(chunks), q_len, dtype=torch.long)
        for s, (c, off) in enumerate(zip(chunks, offsets)):
            n = len(c.token_ids)
            index[s, :n] = torch.arange(off, off + n)
            valid[s, :n] = True
            qpos[s, :n] = torch.arange(c.start, c.start + n)
        self.tables = cache.block_table_tensor([c.seq_id for c in chunks], device)
        self.index, self.valid, self.qpos = index.to(device), valid.to(device), qpos.to(device)
        self.tokens = self.index[self.valid]  # rows of the step's tokens, in the order valid[] picks them
        self.context = cache.block_size * self.tables.shape[1]  # C: the padded context length
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        """(S, 1, Q, C) keys each query may see: its own sequence up to itself (and within ``window``)."""
        if window not in self._masks:
            kpos = torch.arange(self.context, device=self.qpos.device)
            m = kpos[None, None, :] <= self.qpos[:, :, None]
            if window is not None:
                m &= kpos[None, None, :] > self.qpos[:, :, None] - window
            m |= (~self.valid[:, :, None]) & (kpos == 0)  # padded queries see one key: no NaN rows
            self._masks[window] = m[:, None]
        return self._masks[window]


class ModelRunner:
    """Runs ``model`` (a transformers Llama / Qwen2 / Mistral causal LM) on flattened tokens.

    ``routed(model, rows)`` is the context that routes each token to its adapter.
    Raises UnsupportedModelError for another architecture.
    """

    def __init__(self, model: torch.nn.Module, routed):
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise UnsupportedModelError(
                f"the serving engine runs Llama-family decoders ({', '.join(SUPPORTED)}); "
                f"{type(model).__name__} has model_type {kind!r}")
        body = getattr(model, "model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, n)]
        attn = body.layers[0].self_attn if not missing and len(body.layers) else None
        missing += [f"layers[0].self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
                    if attn is not None and not hasattr(attn, n)]
        if missing or model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(model).__name__} ({kind}) lacks {missing or ['an output head']}; "
                                        f"the engine needs a transformers causal LM of that family")
        if getattr(attn, "q_norm", None) is not None:
            raise UnsupportedModelError(f"{type(model).__name__} normalizes queries and keys (q_norm); unsupported")
        self.model, self.config, self.body, self.routed = model, config, body, routed
        self.head = model.get_output_embeddings()
        self.num_layers = len(body.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = attn.head_dim
        self.windows = [self._window(i) for i in range(self.num_layers)]
        self.virtual = None  # the engine's prompt-method adapters (``serve.virtual_prompts``), once it has one

    def _window(self, i: int) -> int | None:
        """Layer ``i``'s sliding window (transformers' rule: keys with position > query - window)."""
        window = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        if types is not None and types[i] != "sliding_attention":
            return None
        return window

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def new_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        """An empty paged cache for this model, in its dtype and on its device."""
        return PagedKVCache(self.num_layers, self.num_kv_heads, self.head_dim, num_blocks, block_size,
                            dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def forward(self, chunks: list[Chunk], cache: PagedKVCache) -> torch.Tensor:
        """Compute ``chunks`` (their blocks reserved in ``cache``), store their keys and values, and
        return the logits (R, vocab), float32, of the last token of each chunk that wants them."""
        device = self.device
        flat = [t for c in chunks for t in c.token_ids]
        ids = torch.tensor(flat, dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks]).to(device)
        rows = [c.adapter for c in chunks for _ in c.token_ids]
        slots = torch.tensor([s for c in chunks for s in cache.slots(c.seq_id, c.start, len(c.token_ids))],
                             dtype=torch.long, device=device)  # one host-to-device copy for the step
        offsets, at = [], 0
        for c in chunks:
            offsets.append(at)
            at += len(c.token_ids)
        # decode rows (one query) attend in the paged decode kernel, prefill chunks in one padded SDPA call
        one = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        many = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        decode = _Decode([chunks[i] for i in one], [offsets[i] for i in one], cache, device) if one else None
        prefill = _Group([chunks[i] for i in many], [offsets[i] for i in many], cache, device) if many else None
        virtual = self.virtual is not None and max(flat, default=0) >= self.virtual.vocab_size
        with self.routed(self.model, rows):
            h = self.hidden(ids, positions, slots, decode, prefill, cache, virtual=virtual)
        last = [offsets[i] + len(c.token_ids) - 1 for i, c in enumerate(chunks) if c.want_logits]
        if not last:
            return torch.empty(0, self.head.weight.shape[0], device=device)
        with self.routed(self.model, [rows[j] for j in last]):
            return self.head(h[torch.tensor(last, device=device)]).float()

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, decode, prefill,
               cache: PagedKVCache, virtual: bool = False) -> torch.Tensor:
        """The final hidden states (T, hidden) of the step's tokens ``ids`` at ``positions``, their keys and
        values written to ``slots``; called inside the step's ``routed`` context. ``decode`` (rows, lengths
        and tables of one-token rows) and ``prefill`` (a ``_Group``) say how each token attends. ``virtual``:
        some ids are a prompt-method adapter's virtual tokens (``self.virtual``)."""
        prefix_ids = ids if virtual and self.virtual.has_prefix else None
        h = self.virtual.embed(ids, self.body.embed_tokens) if virtual else self.body.embed_tokens(ids)  # (T, hidden)
        cos, sin = self.body.rotary_emb(h, positions[None])  # (1, T, head_dim)
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        for i, layer in enumerate(self.body.layers):
            x = layer.input_layernorm(h)
            h = h + self._attention(i, layer.self_attn, x, cos, sin, slots, decode, prefill, cache, prefix_ids)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.body.norm(h)

    def _attention(self, i: int, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                   decode: _Decode | None, prefill: _Group | None, cache: PagedKVCache,
                   prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``i``'s self-attention of the step's tokens ``x`` (T, hidden) over the paged cache; a prefix
        adapter's keys and values replace those computed at its virtual ids (``prefix_ids``: the step's ids)."""
        T, d = x.shape[0], self.head_dim
        q = attn.q_proj(x).view(T, self.num_heads, d)
        k = attn.k_proj(x).view(T, self.num_kv_heads, d)
        v = attn.v_proj(x).view(T, self.num_kv_heads, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if prefix_ids is not None:
            k, v = self.virtual.prefix_kv(i, prefix_ids, k, v)
        cache.write(i, slots, k, v)
        out = torch.empty_like(q)
        if decode is not None:
            out[decode.tokens] = paged_decode_attention(  # (S, heads, d)
                q.index_select(0, decode.tokens), cache.keys[i], cache.values[i], decode.tables, decode.lens,
                attn.scaling, self.windows[i])
        if prefill is not None:
            g = prefill
            keys, values = cache.gather(i, g.tables)  # (S, C, kvh, d)
            o = F.scaled_dot_product_attention(
                q[g.index].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),  # (S, heads, Q, d)
                attn_mask=g.mask(self.windows[i]), scale=attn.scaling, enable_gqa=True)
            out[g.tokens] = o.transpose(1, 2)[g.valid]  # (valid tokens, heads, d)
        return attn.o_proj(out.view(T, self.num_heads * d))
