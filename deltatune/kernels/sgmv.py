"""Mixed-adapter LoRA kernels: each token its own adapter slot, ``y[t] += scale_s · B_s (A_s x[t])``.

Two shapes of work, both in two passes through an fp32 buffer ``h`` (N, R) (position ``p`` of ``order``
holds token ``order[p]``'s ``A_s x``):

* **SGMV** (segmented, Punica's "shrink" and "expand", Chen et al. 2023, arXiv:2310.18547): tokens sorted
  by slot, cut into tiles of at most BLOCK_M tokens of one slot; a tile multiplies its tokens by its
  slot's A (a (BLOCK_M, BLOCK_K) x (BLOCK_K, R) tensor-core product, K looped) and then ``h`` by B,
  added into ``y`` tile by tile. For prefill: long segments, each slot's weights read once a tile.
* **BGMV** (gathered, per token): one program per (token, block of R) for the shrink and per (token,
  block of out features) for the expand, the slot read per token; no padding of a tile with other
  tokens' rows. For decode: one token per sequence, many distinct adapters.

Slots are rank-padded (zeros beyond an adapter's rank), so R is one number per layer. Tokens with no
adapter are not in ``order``: the kernels never touch them. Operands in A's / B's dtype with fp32
accumulation; fp32 operands (and the interpreter, whose dot misreads 16-bit floats) multiply exactly
in fp32 ("ieee"). Imports triton: load it only through ``deltatune.kernels.backend.load``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltatune.kernels.backend import interpreted

__all__ = ["sgmv", "bgmv"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation (exact fp32 products with ``IEEE``)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _sgmv_shrink(X, stride_x, A, stride_as, stride_ar, H, ORDER, TILES, R, K,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                 IEEE: tl.constexpr):
    """h[pos, r] = sum_k x[order[pos], k] A[slot, r, k] for one tile's positions and one block of r."""
    tile = tl.program_id(0)
    start = tl.load(TILES + tile * 3)
    end = tl.load(TILES + tile * 3 + 1)
    slot = tl.load(TILES + tile * 3 + 2).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)  # (BM,) positions in order
    pmask = pos < end
    rows = tl.load(ORDER + pos, mask=pmask, other=0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    rmask = r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(0, K_TILES):  # constexpr trip count (the interpreter cannot loop over run-time bounds)
        k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(A + slot * stride_as + r[None, :] * stride_ar + k[:, None],
                    mask=kmask[:, None] & rmask[None, :], other=0.0)  # (BK, BR): A[slot]^T
        acc += _dot(x.to(a.dtype), a, IEEE)
    tl.store(H + pos[:, None] * R + r[None, :], acc, mask=pmask[:, None] & rmask[None, :])


@triton.jit
def _sgmv_expand(H, B, stride_bs, stride_bn, SCALES, Y, stride_y, ORDER, TILES, R, N_OUT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """y[order[pos], n] += scale[slot] * sum_r h[pos, r] B[slot, n, r] for one tile and one block of n."""
    tile = tl.program_id(0)
    start = tl.load(TILES + tile * 3)
    end = tl.load(TILES + tile * 3 + 1)
    slot = tl.load(TILES + tile * 3 + 2).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)
    pmask = pos < end
    rows = tl.load(ORDER + pos, mask=pmask, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    nmask = n < N_OUT
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    h = tl.load(H + pos[:, None] * R + r[None, :], mask=pmask[:, None] & rmask[None, :], other=0.0)  # (BM, BR)
    b = tl.load(B + slot * stride_bs + n[None, :] * stride_bn + r[:, None],
                mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BR, BN): B[slot]^T
    acc = _dot(h.to(b.dtype), b, IEEE) * tl.load(SCALES + slot)
    out = Y + rows[:, None] * stride_y + n[None, :]
    omask = pmask[:, None] & nmask[None, :]
    y = tl.load(out, mask=omask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(Y.dtype.element_ty), mask=omask)


@triton.jit
def _bgmv_shrink(X, stride_x, A, stride_as, stride_ar, H, ORDER, POS_SLOTS, R, K,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    """h[pos, r] = sum_k x[order[pos], k] A[slot(pos), r, k]: one token, one block of r, no tensor cores."""
    pos = tl.program_id(0)
    row = tl.load(ORDER + pos).to(tl.int64)
    slot = tl.load(POS_SLOTS + pos).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, K_TILES):
        k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(X + row * stride_x + k, mask=kmask, other=0.0).to(A.dtype.element_ty).to(tl.float32)  # (BK,)
        a = tl.load(A + slot * stride_as + r[:, None] * stride_ar + k[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)  # (BR, BK)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(H + pos * R + r, acc, mask=rmask)


@triton.jit
def _bgmv_expand(H, B, stride_bs, stride_bn, SCALES, Y, stride_y, ORDER, POS_SLOTS, R, N_OUT,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[order[pos], n] += scale * sum_r h[pos, r] B[slot(pos), n, r]: one token, one block of n."""
    pos = tl.program_id(0)
    row = tl.load(ORDER + pos).to(tl.int64)
    slot = tl.load(POS_SLOTS + pos).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N_OUT
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    h = tl.load(H + pos * R + r, mask=rmask, other=0.0)  # (BR,) fp32
    b = tl.load(B + slot * stride_bs + n[:, None] * stride_bn + r[None, :], mask=nmask[:, None] & rmask[None, :],
                other=0.0)  # (BN, BR)
    h = h.to(b.dtype).to(tl.float32)  # the rounding of h an unfused B(A x) in B's dtype has
    acc = tl.sum(b.to(tl.float32) * h[None, :], axis=1) * tl.load(SCALES + slot)
    out = Y + row * stride_y + n
    y = tl.load(out, mask=nmask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(Y.dtype.element_ty), mask=nmask)


def _check(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor):
    """Contiguous last dimensions and matching shapes: (x, y, A, B, scales) ready for the kernels."""
    S, R, K = A.shape
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != K or B.shape[0] != S or B.shape[2] != R or y.shape[1] != B.shape[1]:
        raise ValueError(f"mixed LoRA shapes: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(A.shape)} (S, R, in), "
                         f"B {tuple(B.shape)} (S, out, R)")
    if not y.is_contiguous():
        raise ValueError("mixed LoRA kernels add into y in place: y must be contiguous")
    x = x if x.stride(-1) == 1 else x.contiguous()
    A = A if A.stride(-1) == 1 else A.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    return x, y, A, B, scales.float().contiguous()


def sgmv(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
         order: torch.Tensor, tiles: torch.Tensor, block_m: int) -> torch.Tensor:
    """Segmented mixed LoRA: ``y[order[p]] += scale_s · B_s A_s x[order[p]]`` for every tile's positions.

    x (T, in); y (T, out), updated in place; A (S, R, in); B (S, out, R); scales (S,); order (N,) int32
    token indices sorted by slot; tiles (num_tiles, 3) int32 (start, end, slot), at most ``block_m``
    positions each. Returns ``y``.
    """
    x, y, A, B, scales = _check(x, y, A, B, scales)
    S, R, K = A.shape
    N, n_tiles = order.numel(), tiles.shape[0]
    if N == 0 or n_tiles == 0:
        return y
    ieee = A.dtype == torch.float32 or interpreted()
    h = torch.empty(N, R, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(R))
    block_k = 64 if block_r <= 64 else 32
    _sgmv_shrink[(n_tiles, 1)](x, x.stride(0), A, A.stride(0), A.stride(1), h, order, tiles, R, K,
                               BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, K_TILES=triton.cdiv(K, block_k),
                               IEEE=ieee, num_warps=8 if block_m >= 128 else 4)
    n_out = B.shape[1]
    block_n = 64 if block_m >= 64 else 128
    _sgmv_expand[(n_tiles, triton.cdiv(n_out, block_n))](h, B, B.stride(0), B.stride(1), scales, y, y.stride(0),
                                                         order, tiles, R, n_out, BLOCK_M=block_m, BLOCK_N=block_n,
                                                         BLOCK_R=block_r, IEEE=ieee,
                                                         num_warps=8 if block_m >= 128 else 4)
    return y


def bgmv(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
         order: torch.Tensor, pos_slots: torch.Tensor) -> torch.Tensor:
    """Gathered mixed LoRA, token by token: ``y[order[p]] += scale_s · B_s A_s x[order[p]]`` with
    ``s = pos_slots[p]``. Shapes as ``sgmv``; returns ``y`` (updated in place)."""
    x, y, A, B, scales = _check(x, y, A, B, scales)
    S, R, K = A.shape
    N = order.numel()
    if N == 0:
        return y
    h = torch.empty(N, R, device=x.device, dtype=torch.float32)
    block_r = 16
    block_k = 128
    _bgmv_shrink[(N, triton.cdiv(R, block_r))](x, x.stride(0), A, A.stride(0), A.stride(1), h, order, pos_slots, R, K,
                                               BLOCK_R=block_r, BLOCK_K=block_k, K_TILES=triton.cdiv(K, block_k),
                                               num_warps=4)
    n_out = B.shape[1]
    block_n = 128
    _bgmv_expand[(N, triton.cdiv(n_out, block_n))](h, B, B.stride(0), B.stride(1), scales, y, y.stride(0), order,
                                                   pos_slots, R, n_out, BLOCK_N=block_n,
                                                   BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=4)
    return y
