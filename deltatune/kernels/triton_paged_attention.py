"""Decode attention over the paged KV cache in Triton: one query token per sequence, split over the context.

Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"): the context of each
sequence is cut into splits of ``split_tokens`` positions; one program per (sequence, kv head, split)
runs the online softmax (Milakov & Gimelshein 2018) of that kv head's whole query group over its split,
reading keys and values token by token through the block table, and leaves an unnormalized output with
its running max and sum; a second kernel combines the splits of each (sequence, query head). With one
split the first kernel writes the normalized output itself (one launch).

The grid is (B, kv heads, splits), fixed by B and the block-table width alone: each program reads its
sequence's length from device memory and loops only over the positions it holds (a split past the
length, or before the sliding window, runs no iteration), so nothing on the host depends on the lengths
(the launches can be captured in a CUDA graph).

How long a split is (``launch_plan``): by default each row's own span (its length, from the window's
start) is cut into ``splits`` parts of at least ``MIN_SPLIT_TOKENS`` positions, on the device. So the
work follows the real lengths, not the table's width: decode graphs run every step at one width (8192
positions at the 1B bench's max_model_len), where splits of width / splits positions put a whole 600-token
context in one program (10 tiles in a row instead of 3 splits of 4 at B=16). An explicit
``split_tokens`` cuts fixed splits from position 0 (what the tests force); ``DELTATUNE_PAGED_SPLITS=width``
restores the fixed splits sized from the width by default (for A/B runs).

Cache layout (``deltatune.serve.kv_cache``): keys and values (num_blocks, block_size, kv heads, head_dim),
token ``p`` of a sequence in block ``table[p // block_size]`` at slot ``p % block_size``. Products in the
inputs' dtype with fp32 accumulation; fp32 inputs (and the interpreter, whose dot misreads 16-bit floats)
multiply exactly in fp32 ("ieee"). Imports triton: load it only through ``deltatune.kernels.backend.load``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from deltatune.kernels.backend import interpreted
from deltatune.kernels.triton_bits import dot as _dot

__all__ = ["launch_plan", "paged_decode_attention", "split_tokens_for", "splits_for"]

BLOCK_N = 64
"""Context positions per loop iteration (the keys and values of one tile: (BLOCK_N, head_dim))."""
TARGET_PROGRAMS = 512
"""Programs that keep a large GPU busy (about 4 per SM of an H200's 132): fewer (sequences x kv heads) split more."""
MIN_SPLIT_TOKENS = 256
"""A split's positions at least: shorter ones cost more in partial outputs and the combine than they save."""
MAX_SPLITS = 64
"""Splits at most (the combine holds all of a head's splits at once)."""


def splits_for(batch: int, kv_heads: int, max_ctx: int) -> int:
    """Splits per (sequence, kv head) for ``batch`` sequences of at most ``max_ctx`` positions: enough for
    ``TARGET_PROGRAMS`` programs, none shorter than ``MIN_SPLIT_TOKENS`` at ``max_ctx``, at most ``MAX_SPLITS``."""
    splits = min(triton.cdiv(TARGET_PROGRAMS, max(1, batch * kv_heads)), triton.cdiv(max_ctx, MIN_SPLIT_TOKENS),
                 MAX_SPLITS)
    return max(1, splits)


def split_tokens_for(batch: int, kv_heads: int, max_ctx: int) -> int:
    """Context positions per fixed split (``splits_for``'s splits over ``max_ctx``, whole tiles): host values
    only, so one (batch, block-table width) always launches the same grid."""
    return triton.cdiv(triton.cdiv(max_ctx, splits_for(batch, kv_heads, max_ctx)), BLOCK_N) * BLOCK_N


def launch_plan(batch: int, kv_heads: int, max_ctx: int, split_tokens: int | None = None) -> tuple[int, int, bool]:
    """(splits, split_tokens, balanced) of a launch. Balanced (the default): ``splits_for`` splits, each row's
    span cut on the device into that many parts of at least ``split_tokens = MIN_SPLIT_TOKENS`` positions.
    Fixed (``split_tokens`` given, or ``DELTATUNE_PAGED_SPLITS=width``): splits of ``split_tokens`` (default
    ``split_tokens_for``) positions from 0, as many as ``max_ctx`` needs. Raises ValueError on a bad mode."""
    mode = os.environ.get("DELTATUNE_PAGED_SPLITS", "length")
    if mode not in ("length", "width"):
        raise ValueError(f"DELTATUNE_PAGED_SPLITS must be 'length' (splits follow each row's length) or 'width' "
                         f"(fixed splits sized from the table's width), got {mode!r}")
    if split_tokens is None and mode == "length":
        return splits_for(batch, kv_heads, max_ctx), MIN_SPLIT_TOKENS, True
    split_tokens = split_tokens or split_tokens_for(batch, kv_heads, max_ctx)
    return max(1, triton.cdiv(max_ctx, split_tokens)), split_tokens, False


@triton.jit
def _decode_split(Q, stride_qb, stride_qh, K, V, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                  TABLES, stride_tb, LENS, stride_lb, ACC, M, L, OUT, stride_ob, stride_oh,
                  scale_log2, window, max_ctx, split_tokens, num_splits, num_heads, GROUP, HEAD_DIM,
                  BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  ONE_SPLIT: tl.constexpr, BALANCED: tl.constexpr, IEEE: tl.constexpr):
    """One (sequence, kv head, split): the query group's softmax-weighted values over the split's positions.

    BALANCED: the row's span (from the window's start, rounded down to a tile) in ``num_splits`` parts of at
    least ``split_tokens`` positions, whole tiles; else splits of ``split_tokens`` from position 0.
    ONE_SPLIT: OUT[b, h] = the normalized output. Else ACC[b, h, split] (unnormalized, fp32), M (running max,
    log2 units) and L (sum of exp2(score - max)) for ``_combine``.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.minimum(tl.load(LENS + b.to(tl.int64) * stride_lb), max_ctx)  # never past the block table's width
    lo = tl.maximum(ctx - window, 0)  # the sliding window: positions > query position - window
    if BALANCED:
        first = (lo // BLOCK_N) * BLOCK_N
        size = tl.maximum(tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N, split_tokens)
    else:
        first = 0
        size = split_tokens
    start = tl.maximum(first + split * size, lo)
    end = tl.minimum(first + split * size + size, ctx)

    g = tl.arange(0, BLOCK_G)
    gmask = g < GROUP
    heads = kvh * GROUP + g  # (BG,) the query heads sharing this kv head (transformers' repeat_kv order)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # (BG, BD)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    table = TABLES + b.to(tl.int64) * stride_tb
    for t0 in range(start, end, BLOCK_N):  # every tile holds at least one position: m stays finite
        pos = t0 + tl.arange(0, BLOCK_N)  # (BN,)
        pmask = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=pmask, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kmask = pmask[:, None] & dmask[None, :]
        k = tl.load(K + block[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=kmask, other=0.0)  # (BN, BD)
        s = _dot(q, tl.trans(k), IEEE) * scale_log2  # (BG, BN) scores in log2 units
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=kmask, other=0.0)  # (BN, BD)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new

    omask = gmask[:, None] & dmask[None, :]
    if ONE_SPLIT:
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # a length-0 row (padding) gets zeros
        tl.store(OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=omask)
    else:
        row = (b.to(tl.int64) * num_heads + heads) * num_splits + split  # (BG,) into (B, Hq, S)
        tl.store(M + row, m, mask=gmask)
        tl.store(L + row, l_sum, mask=gmask)
        tl.store(ACC + row[:, None] * HEAD_DIM + d[None, :], acc, mask=omask)


@triton.jit
def _combine(ACC, M, L, OUT, stride_ob, stride_oh, num_heads, num_splits, HEAD_DIM,
             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, h] = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over the splits of one (sequence, head)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    smask = s < num_splits
    row = (b.to(tl.int64) * num_heads + h) * num_splits + s  # (BS,)
    m = tl.load(M + row, mask=smask, other=float("-inf"))
    l_sum = tl.load(L + row, mask=smask, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no position at all (a padding row): weights 0, output 0
    w = tl.exp2(m - top)  # (BS,) an empty split (m = -inf) weighs 0
    total = tl.sum(l_sum * w, axis=0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    acc = tl.load(ACC + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # (BD,)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None, split_tokens: int | None = None) -> torch.Tensor:
    """Launch the kernels (arguments checked by ``deltatune.kernels.paged_attention``); returns (B, Hq, D).

    q (B, Hq, D) with a contiguous last dimension; caches (num_blocks, block_size, Hkv, D), contiguous
    last dimension; block_tables (B, W) int32, contiguous last dimension; context_lens (B,) int32;
    ``split_tokens`` >= 1 context positions per fixed split (default: balanced splits, ``launch_plan``).
    context_lens may be a strided view (read in place, no copy: decode graphs keep it beside the tables).
    """
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = key_cache.shape
    group = Hq // Hkv
    max_ctx = block_tables.shape[1] * block_size
    num_splits, split_tokens, balanced = launch_plan(B, Hkv, max_ctx, split_tokens)
    out = torch.empty_like(q)
    if B == 0:
        return out
    ieee = q.dtype == torch.float32 or interpreted()
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    block_d = max(16, triton.next_power_of_2(D))
    window = window if window is not None else 1 << 30
    one = num_splits == 1
    if one:
        acc = m = l_sum = out  # unused
    else:
        acc = torch.empty(B, Hq, num_splits, D, device=q.device, dtype=torch.float32)
        m = torch.empty(B, Hq, num_splits, device=q.device, dtype=torch.float32)
        l_sum = torch.empty_like(m)
    _decode_split[(B, Hkv, num_splits)](
        q, q.stride(0), q.stride(1), key_cache, value_cache, key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables, block_tables.stride(0), context_lens, context_lens.stride(0), acc, m, l_sum, out,
        out.stride(0), out.stride(1), scale * math.log2(math.e), window, max_ctx, split_tokens, num_splits, Hq,
        group, D, BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, ONE_SPLIT=one,
        BALANCED=balanced, IEEE=ieee, num_warps=4)
    if not one:
        _combine[(B, Hq)](acc, m, l_sum, out, out.stride(0), out.stride(1), Hq, num_splits, D,
                          BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4)
    return out
