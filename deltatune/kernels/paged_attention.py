"""Decode attention over a paged KV cache: one query token per sequence against its cached context.

The query of each sequence is its last position, so attention is causal by construction: it sees the
sequence's ``context_lens[b]`` cached positions (its own key included), or the last ``window`` of them
under a sliding window (transformers' rule: keys at positions > query position - window). Query heads
are grouped over the kv heads (``Hq`` a multiple of ``Hkv``; query head ``h`` reads kv head
``h // (Hq / Hkv)``, transformers' ``repeat_kv`` order).

Inputs (the layout of ``deltatune.serve.kv_cache``):

* ``q`` (B, Hq, D);
* ``key_cache``, ``value_cache`` (num_blocks, block_size, Hkv, D): token ``p`` of sequence ``b`` at
  ``[block_tables[b, p // block_size], p % block_size]``;
* ``block_tables`` (B, W) int32, padded with any valid block id past each sequence's blocks (never read: the
  kernel loads only positions below each length, the reference zeroes what it gathered past it);
* ``context_lens`` (B,) int32, each in 0 .. W * block_size (0: a padding row, whose output is zeros).

Only B and W are host values: the lengths and tables stay on the device, so the work has a static shape
per (B, W) bucket. ``paged_decode_attention`` runs the Triton kernels of
``deltatune.kernels.triton_paged_attention`` (flash-decoding) where ``kernels.backend`` says Triton
runs, else ``paged_decode_attention_reference`` (the blocks gathered, one masked SDPA call; any device,
the tests' oracle). Imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltatune.kernels import backend

__all__ = ["paged_decode_attention", "paged_decode_attention_reference"]


def _check(q, key_cache, value_cache, block_tables, context_lens, window) -> None:
    """Shapes, dtypes and devices the kernels rely on; a ValueError naming what is off."""
    where = (f"paged decode attention: q {tuple(q.shape)}, key_cache {tuple(key_cache.shape)}, "
             f"value_cache {tuple(value_cache.shape)}, block_tables {tuple(block_tables.shape)}, "
             f"context_lens {tuple(context_lens.shape)}")
    if q.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"{where}: expected q (B, Hq, D) and both caches (num_blocks, block_size, Hkv, D)")
    B, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    if key_cache.shape[3] != D or Hq % Hkv != 0:
        raise ValueError(f"{where}: the caches' head_dim must be q's ({D}) and Hq ({Hq}) a multiple of Hkv ({Hkv})")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"{where}: expected block_tables (B={B}, max_blocks) and context_lens (B={B},)")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"{where}: block_tables and context_lens must be int32, got {block_tables.dtype} and "
                         f"{context_lens.dtype}")
    if not (q.dtype == key_cache.dtype == value_cache.dtype):
        raise ValueError(f"{where}: q, key_cache and value_cache must share a dtype, got {q.dtype}, "
                         f"{key_cache.dtype}, {value_cache.dtype}")
    devices = {t.device for t in (q, key_cache, value_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"{where}: all inputs must be on one device, got {sorted(map(str, devices))}")
    if window is not None and window < 1:
        raise ValueError(f"paged decode attention: window must be >= 1 or None, got {window}")


def paged_decode_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                     window: int | None = None) -> torch.Tensor:
    """Decode attention in PyTorch: each sequence's blocks gathered in order (B, W * block_size, Hkv, D),
    the positions past its length (and before its window) masked, one SDPA call. Returns (B, Hq, D).

    The gather reads whole blocks, table padding included; keys and values at masked positions are zeroed
    before SDPA, so what they hold (a NaN too: a masked score is -inf, but 0 * NaN is NaN) never reaches the
    output, as in the Triton kernel, which does not load them."""
    keys = key_cache[block_tables.long()].flatten(1, 2)  # (B, C, Hkv, D), C = W * block_size
    values = value_cache[block_tables.long()].flatten(1, 2)
    lens = context_lens.long()[:, None]  # (B, 1)
    kpos = torch.arange(keys.shape[1], device=q.device)[None, :]  # (1, C)
    mask = kpos < lens
    if window is not None:
        mask &= kpos >= lens - window
    empty = lens == 0  # padding rows: one key seen (no NaN), output zeroed below
    mask |= empty & (kpos == 0)
    unread = ~mask[:, :, None, None]  # (B, C, 1, 1); the gathered tensors are copies: zero them in place
    keys.masked_fill_(unread, 0.0)
    values.masked_fill_(unread, 0.0)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0].masked_fill(empty[:, :, None], 0.0)  # (B, Hq, D)


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None = None, split_tokens: int | None = None) -> torch.Tensor:
    """Decode attention of one query token per sequence over the paged cache (shapes in the module
    docstring); ``scale`` multiplies the scores, ``window`` is the sliding window or None,
    ``split_tokens`` the context positions per fixed split of the Triton kernel (default: splits that follow
    each row's length, ``triton_paged_attention.launch_plan``).

    Runs the Triton kernels where ``kernels.backend.triton_enabled(q)``, else the PyTorch reference.
    Returns (B, Hq, D) in q's dtype.
    """
    _check(q, key_cache, value_cache, block_tables, context_lens, window)
    if split_tokens is not None and split_tokens < 1:
        raise ValueError(f"paged decode attention: split_tokens must be >= 1, got {split_tokens}")
    if backend.triton_enabled(q):
        kernels = backend.load("deltatune.kernels.triton_paged_attention")
        q = q if q.stride(-1) == 1 else q.contiguous()
        block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
        key_cache = key_cache if key_cache.stride(-1) == 1 else key_cache.contiguous()
        value_cache = value_cache if value_cache.stride(-1) == 1 else value_cache.contiguous()
        return kernels.paged_decode_attention(q, key_cache, value_cache, block_tables, context_lens,
                                              scale, window, split_tokens)
    return paged_decode_attention_reference(q, key_cache, value_cache, block_tables, context_lens, scale, window)
