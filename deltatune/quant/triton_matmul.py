"""Fused NF4/FP4 dequantize-matmul in Triton: ``y = x @ dequantize(q).T`` without the dense weight.

For decoding and small batches the matmul reads each weight once for a handful of tokens, so
dequantize-then-cuBLAS is dominated by writing the dense bf16 copy (2 bytes per weight) and reading
it back (2 more), against 0.5 byte per weight for the packed codes. This kernel reads the packed codes
(bitsandbytes' layout, high nibble first, see ``nf4.py``) tile by tile, scales them in registers and
feeds the tensor cores; the dense weight is never written.

A program owns a ``(BLOCK_M, BLOCK_N)`` tile of ``y`` and walks its share of K in ``BLOCK_K`` steps:
``BLOCK_K / 2`` bytes per weight row are split into high and low nibbles, interleaved back to
element order, looked up in the 16-entry code table, multiplied by their block's absmax (rebuilt
in-kernel from the 8-bit codes under double quantization, as ``QuantizedTensor.scales``) and rounded
to x's dtype: the same weight values ``dequantize`` produces, then an fp32-accumulated ``tl.dot``.
With ``SPLIT_K > 1`` several programs share a tile's K range and add into an fp32 buffer, which keeps
the GPU busy when ``M`` and ``N`` give few tiles. ``quant_matmul`` picks this kernel or
dequantize-then-cuBLAS per shape. ``import triton`` happens on the first call.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Config", "fused_quant_matmul", "quant_matmul", "use_fused", "supported"]


class Config(NamedTuple):
    """Tile shape and launch options of one fused launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                            M, N, K, stride_xm, stride_xk, stride_om, tiles_per_split: tl.constexpr,
                            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PAIRED: tl.constexpr,
                            GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) rows of x and y
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W, columns of y
        mask_m = rm < M
        mask_n = rn < N
        row_start = rn.to(tl.int64) * K  # (BN,) flat index of each weight row's first element
        # GROUPED: K % BLOCKSIZE == 0 and the tile covers whole absmax blocks (or lies inside one),
        # so each weight row of the tile needs GROUPS scales instead of one per element.
        GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # constexpr trip count: Triton 3.6's interpreter cannot loop over run-time bounds
        for i in range(0, tiles_per_split):
            k0 = (pid_k * tiles_per_split + i) * BLOCK_K
            rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            if PAIRED:  # K even: a row starts on a byte, so load BK/2 bytes and split the nibbles
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BK/2,) byte column within the row
                byte = tl.load(packed_ptr + (row_start[:, None] // 2 + rb[None, :]),
                               mask=mask_n[:, None] & (rb[None, :] < K // 2), other=0).to(tl.int32)
                nibble = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K))  # element order
            else:  # odd K: element by element (a row may start in the middle of a byte)
                idx = row_start[:, None] + rk[None, :]
                byte = tl.load(packed_ptr + idx // 2, mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
                nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
            value = tl.load(code_ptr + nibble)  # (BN, BK) fp32 code values
            if GROUPED:
                rg = tl.arange(0, GROUPS)
                block = (row_start[:, None] + k0) // BLOCKSIZE + rg[None, :]  # (BN, GROUPS)
                smask = mask_n[:, None] & (k0 + rg[None, :] * BLOCKSIZE < K)
            else:
                block = (row_start[:, None] + rk[None, :]) // BLOCKSIZE  # (BN, BK)
                smask = mask_n[:, None] & mask_k[None, :]
            if NESTED:  # absmax = dynamic[code8] * nested_absmax[block // 256] + offset
                qabs = tl.load(absmax_ptr + block, mask=smask, other=0).to(tl.int32)
                scale = tl.load(code8_ptr + qabs) * tl.load(nested_ptr + block // 256, mask=smask, other=0.0)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block, mask=smask, other=0.0)
            if GROUPED:
                w = tl.reshape(value, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * scale[:, :, None]
                w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            else:
                w = value * scale
            w = w.to(x.dtype)  # the weight values dequantize(q, x.dtype) holds
            if UPCAST:  # the interpreter's dot reads bf16 operands as raw bits: multiply in fp32 there
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w))  # (BM, BK) @ (BK, BN), fp32 accumulation
        out = out_ptr + rm[:, None] * stride_om + rn[None, :]
        omask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:  # out is the fp32 buffer the splits add into
            tl.atomic_add(out, acc, mask=omask)

    return quant_matmul_kernel


def supported(x: torch.Tensor, q) -> bool:
    """Whether ``fused_quant_matmul(x, q)`` applies: 2-D x in bf16/fp16, a 2-D NF4/FP4 weight of x's width."""
    return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and getattr(q, "kind", None) in ("nf4", "fp4")
            and len(q.shape) == 2 and q.shape[1] == x.shape[1] and x.device == q.device)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(M: int, N: int, K: int, device: torch.device) -> Config:
    """Tile shape for an (M, K) x (N, K)^T product: the fastest of the H100 sweep in
    bench/bench_quant_matmul.py (docs/benchmarks.md, 2026-11-23) for each M bucket."""
    if M <= 4:
        bm, bn, bk, warps, stages = 16, 32, 256, 4, 3
    elif M <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
    return Config(bm, bn, bk, auto_split(M, N, K, bm, bn, bk, device), warps, stages)


def auto_split(M: int, N: int, K: int, block_m: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Split K in powers of two until the tiles fill about two waves of the GPU (>= 4 K steps per split)."""
    tiles = _cdiv(M, block_m) * _cdiv(N, block_n)
    split = 1
    while tiles * split * 2 <= 2 * _sm_count(device) and _cdiv(K, block_k) >= 8 * split:
        split *= 2
    return split


def fused_quant_matmul(x: torch.Tensor, q, config: Config | None = None) -> torch.Tensor:
    """``x @ dequantize(q, x.dtype).T`` in one kernel reading the packed 4-bit codes.

    Args:
        x: (M, K) bf16/fp16 activations (any strides).
        q: a ``QuantizedTensor`` (nf4/fp4, any power-of-two blocksize, with or without double
            quantization) of shape (N, K).
        config: tile shape; default ``default_config(M, N, K)``.
    Returns:
        (M, N) in x's dtype, accumulated in fp32.
    """
    from deltatune.quant.nf4 import code_table, dynamic_map

    if not supported(x, q):
        raise ValueError(f"fused_quant_matmul needs 2-D bf16/fp16 x (M, K) and an nf4/fp4 weight (N, K) on its "
                         f"device; got x {tuple(x.shape)} {x.dtype}, weight {tuple(q.shape)} {getattr(q, 'kind', None)}")
    M, K = x.shape
    N = q.shape[0]
    cfg = config or default_config(M, N, K, x.device)
    bs = q.blocksize
    code = code_table(q.kind, q.device)
    if q.double_quant:
        nested, offset, code8 = q.nested_absmax, q.offset.reshape(1).float(), dynamic_map(q.device)
    else:  # unused pointers; any fp32 tensor on the device
        nested = offset = code8 = code
    k_tiles = _cdiv(K, cfg.block_k)
    tiles_per_split = _cdiv(k_tiles, cfg.split_k)
    split = _cdiv(k_tiles, tiles_per_split)  # no empty splits
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if split == 1 else \
        torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grouped = K % bs == 0 and (cfg.block_k % bs == 0 or bs % cfg.block_k == 0)
    grid = (_cdiv(M, cfg.block_m), _cdiv(N, cfg.block_n), split)
    _kernel()[grid](x, q.packed, q.absmax, nested, offset, code, code8, out, M, N, K, x.stride(0), x.stride(1),
                    out.stride(0), tiles_per_split, BLOCKSIZE=bs, NESTED=q.double_quant, PAIRED=K % 2 == 0,
                    GROUPED=grouped, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, UPCAST=_interpreted(),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if split == 1 else out.to(x.dtype)


# Crossover, measured on the H100 (bench/bench_quant_matmul.py, docs/benchmarks.md 2026-11-23): this
# kernel lost to dequantize-then-cuBLAS at every measured shape (4096x4096, 14336x4096, 4096x14336;
# M = 1..4096), by 1.6x at best (4096x4096, M=8: 122 us vs 76 us) and 3-4x at M=1 on the 8B MLP
# weights, so the dispatcher never picks it. Raise FUSED_MAX_M only with a faster kernel and a new
# measurement.
FUSED_MAX_M = 0


def use_fused(M: int, N: int, K: int) -> bool:
    """The crossover rule: fused while the token count ``M`` is at most ``FUSED_MAX_M`` (currently never)."""
    return M <= FUSED_MAX_M


def quant_matmul(x: torch.Tensor, q) -> torch.Tensor:
    """``F.linear(x, q.dequantize(x.dtype))`` for 2-D ``x``, by the fused kernel where it is faster.

    The fused kernel runs on CUDA for bf16/fp16 and NF4/FP4 weights when ``use_fused`` says so;
    everything else (CPU, int8, fp32, large M) dequantizes and calls cuBLAS.
    """
    if x.is_cuda and supported(x, q) and x.shape[0] > 0 and use_fused(x.shape[0], q.shape[0], x.shape[1]):
        from deltatune.quant import triton_dequant

        if triton_dequant.available():
            return fused_quant_matmul(x, q)
    return F.linear(x, q.dequantize(x.dtype))
