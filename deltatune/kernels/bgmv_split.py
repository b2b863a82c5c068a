"""The gathered (per-token) mixed LoRA in two phases, for decode steps replayed from CUDA graphs.

``y[t] += scale_s · B_s round(A_s x[t])``, ``s = slots[t // rows_per_slot]`` (-1: none), as the one-launch
``_bgmv`` of ``kernels.sgmv`` computes it, split into two launches through an fp32 buffer ``h``
(SPLIT, T, R):

* **shrink**, grid (T, SPLIT): program (t, p) reads token t's slot and rank and writes the partial product
  of A_s[:, K range p] and x[t, K range p] (K_TILES blocks of BLOCK_K from p · K_TILES · BLOCK_K) into
  ``h[p, t]``. No atomics: each partial has one writer.
* **expand**, grid (T, output runs): a program sums token t's SPLIT partials in fp32 in split order, rounds
  the sum to B's dtype (the rounding an unfused ``B(A x)`` in B's dtype has) and adds ``scale · B_s h`` to
  N_TILES blocks of BLOCK_N outputs.

Why two launches: the one-launch kernel recomputes a token's shrink in every program of the token (up to
8 on an H200 for a 2048 -> 8192 projection: A_s, 256 KB at rank 64, read 8 times), and a wide-input
projection (8192 -> 2048) gets one program a token, each streaming 1.25 MB alone (64 programs on 132
multiprocessors). That design saves launches, which cost ~20 us of host time each in eager decode; inside
a CUDA graph a launch costs next to nothing, so the graphed step takes the two phases (``Bgmv(...)(...,
phases=2)``, chosen by ``serve.pool_call.decode_phases``).

Same numbers as the one-launch kernel: ``_bgmv`` is built from the same helpers below (``shrink_block``
summed per K range from zero, the ranges summed from zero in the same order, ``expand_block``; one flat
loop over K there, so the compiler pipelines its loads as before), so the rounded ``h`` and every output
are the same bits for the same SPLIT, whatever the token count; ``decode_split`` depends on K alone for that
reason (a graph of a bucket of 64 rows and an eager step of 50 rows split alike). Compiled, this holds as
long as the compiler lays out the shared reductions alike in both kernels (the same shapes and warps);
the interpreter checks the arithmetic order bit for bit (tests/test_bgmv.py). Imports triton: load it only
through ``deltatune.kernels.backend.load`` (``kernels.sgmv`` does).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bgmv_expand", "bgmv_shrink", "bgmv_shrink_group", "decode_split", "expand_block", "shrink_block",
           "shrink_into", "shrink_part", "slot_rank"]

MAX_SPLIT = 16
"""The most K ranges a decode shrink is cut into (powers of two up to it bound the variants compiled)."""


def decode_split(k_blocks: int) -> int:
    """How many K ranges the gathered shrink of a layer with ``k_blocks`` blocks of BLOCK_K in its input is cut
    into: the largest power of two up to ``MAX_SPLIT`` leaving every range at least 2 blocks (1 below 4 blocks).
    Of K alone, not of the token count, so eager and graphed steps of any row count split alike (same bits).
    At 64 decode rows and rank 64 (BLOCK_K 128) on an H200: K 2048 -> 8 ranges (512 shrink programs, ~4 a
    multiprocessor), K 8192 -> 16 (1024)."""
    if k_blocks < 1:
        raise ValueError(f"decode_split: k_blocks must be at least 1, got {k_blocks}")
    split = 1
    while split * 2 <= MAX_SPLIT and k_blocks >= 4 * split:
        split *= 2
    return split


@triton.jit
def slot_rank(SLOTS, RANKS, t, ROWS_PER_SLOT, R: tl.constexpr, HAS_RANKS: tl.constexpr):
    """Token ``t``'s slot (clamped to 0 for loads) and its rank on this layer: 0 for slot -1 or a slot absent here
    (every load and store of the token is then masked off)."""
    slot = tl.load(SLOTS + t // ROWS_PER_SLOT)
    s = tl.maximum(slot, 0).to(tl.int64)
    if HAS_RANKS:
        rank = tl.load(RANKS + s)
    else:
        rank = R
    rank = tl.where(slot >= 0, rank, 0)
    return s, rank


@triton.jit
def shrink_block(X, A, t, s, rank, k, R: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr):
    """sum_k A[s, r, k] x[t, k] over one block of ``k`` (BLOCK_K,) (masked at K), for r < ``rank``: (BLOCK_R,) fp32.
    x is rounded to A's dtype first, as an unfused ``A x`` in A's dtype reads it."""
    k_end = tl.where(rank > 0, K, 0)  # bounds, not a scalar "and" into the masks (the interpreter's masks are bool)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank  # a padded rank is neither read nor multiplied
    kmask = k < k_end
    x = tl.load(X + t * K + k, mask=kmask, other=0.0).to(A.dtype.element_ty).to(tl.float32)  # (BK,)
    a = tl.load(A + s * (R * K) + r[:, None] * K + k[None, :], mask=rmask[:, None] & kmask[None, :],
                other=0.0).to(tl.float32)  # (BR, BK)
    return tl.sum(a * x[None, :], axis=1)


@triton.jit
def shrink_part(X, A, t, s, rank, k0, R: tl.constexpr, K: tl.constexpr, K_TILES: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K range's partial shrink: ``shrink_block`` over K_TILES blocks of BLOCK_K from ``k0``, summed in order
    from zero: (BLOCK_R,) fp32."""
    part = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, K_TILES):  # constexpr trip count (the interpreter needs one)
        part += shrink_block(X, A, t, s, rank, k0 + i * BLOCK_K + tl.arange(0, BLOCK_K), R, K, BLOCK_R)
    return part


@triton.jit
def expand_block(B, Y, t, s, rank, h, scale, n, R: tl.constexpr, N_OUT: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[t, n] += scale * sum_r B[s, n, r] h[r] for the outputs ``n`` (BLOCK_N,), r < ``rank``; ``h`` (BLOCK_R,) fp32
    holding values already rounded to B's dtype."""
    n_end = tl.where(rank > 0, N_OUT, 0)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    nmask = n < n_end
    b = tl.load(B + s * (N_OUT * R) + n[:, None] * R + r[None, :], mask=nmask[:, None] & rmask[None, :],
                other=0.0).to(tl.float32)  # (BN, BR)
    d = tl.sum(b * h[None, :], axis=1) * scale
    out = Y + t * N_OUT + n
    y = tl.load(out, mask=nmask, other=0.0)
    tl.store(out, (y.to(tl.float32) + d).to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def shrink_into(X, A, RANKS, SLOTS, H, t, p, ROWS_PER_SLOT, T, R: tl.constexpr, K: tl.constexpr,
                HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    """h[p, t, r] = the partial shrink of token t over K range p (``shrink_part``), r < its rank. Nothing is
    written for a token without an adapter here (the expand reads nothing of it either)."""
    s, rank = slot_rank(SLOTS, RANKS, t, ROWS_PER_SLOT, R, HAS_RANKS)
    part = shrink_part(X, A, t, s, rank, p * (K_TILES * BLOCK_K), R, K, K_TILES, BLOCK_R, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    tl.store(H + (p * T + t) * R + r, part, mask=r < rank)


@triton.jit
def bgmv_shrink(X, A, RANKS, SLOTS, H, ROWS_PER_SLOT, T, R: tl.constexpr, K: tl.constexpr, HAS_RANKS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    """``shrink_into`` for program (t, p)."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    shrink_into(X, A, RANKS, SLOTS, H, t, p, ROWS_PER_SLOT, T, R, K, HAS_RANKS, BLOCK_R, BLOCK_K, K_TILES)


@triton.jit
def bgmv_shrink_group(X, A0, A1, A2, RANKS0, RANKS1, RANKS2, SLOTS, H0, H1, H2, ROWS_PER_SLOT, T, R: tl.constexpr,
                      K: tl.constexpr, HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_TILES: tl.constexpr):
    """The shrinks of up to three layers that read the same input (q, k and v; gate and up) in one launch:
    program (t, p, g) is ``bgmv_shrink``'s (t, p) for layer g (A_g, its ranks, its partials H_g), with the same
    constants, so the same bits as three launches. Unused layers' arguments repeat the last one's."""
    t = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2)
    if g == 0:
        shrink_into(X, A0, RANKS0, SLOTS, H0, t, p, ROWS_PER_SLOT, T, R, K, HAS_RANKS, BLOCK_R, BLOCK_K, K_TILES)
    elif g == 1:
        shrink_into(X, A1, RANKS1, SLOTS, H1, t, p, ROWS_PER_SLOT, T, R, K, HAS_RANKS, BLOCK_R, BLOCK_K, K_TILES)
    else:
        shrink_into(X, A2, RANKS2, SLOTS, H2, t, p, ROWS_PER_SLOT, T, R, K, HAS_RANKS, BLOCK_R, BLOCK_K, K_TILES)


@triton.jit
def bgmv_expand(H, B, SCALES, RANKS, Y, SLOTS, ROWS_PER_SLOT, T, R: tl.constexpr, N_OUT: tl.constexpr,
                HAS_RANKS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                N_TILES: tl.constexpr):
    """y[t, n] += scale_s * sum_r B[s, n, r] h[r], h = round(sum_p h[p, t]) (the SPLIT partials summed in fp32 in
    split order, then rounded to B's dtype), for N_TILES blocks of BLOCK_N outputs: program (t, run)."""
    t = tl.program_id(0).to(tl.int64)
    s, rank = slot_rank(SLOTS, RANKS, t, ROWS_PER_SLOT, R, HAS_RANKS)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    h = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for p in range(0, SPLIT):  # constexpr: a fixed order, from zero, the one-launch kernel's
        h += tl.load(H + (p * T + t) * R + r, mask=rmask, other=0.0)
    h = h.to(B.dtype.element_ty).to(tl.float32)  # the rounding of h an unfused B(A x) in B's dtype has
    scale = tl.load(SCALES + s)
    for j in range(0, N_TILES):  # h loaded (its partials summed) once for N_TILES output blocks
        n = (tl.program_id(1) * N_TILES + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        expand_block(B, Y, t, s, rank, h, scale, n, R, N_OUT, BLOCK_R)
