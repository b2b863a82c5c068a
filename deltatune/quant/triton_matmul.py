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
dequantize-then-cuBLAS per shape. The kernel lives in ``triton_matmul_kernels.py``, imported (with triton)
on the first call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from deltatune.kernels.backend import interpreted, load, triton_enabled
from deltatune.quant.codes import code_table, dynamic_map

__all__ = ["Config", "fused_quant_matmul", "quant_matmul", "use_fused", "supported"]


class Config(NamedTuple):
    """Tile shape and launch options of one fused launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def _kernel():
    """The kernel (imports triton on first use)."""
    return load("deltatune.quant.triton_matmul_kernels").quant_matmul_kernel


def supported(x: torch.Tensor, q) -> bool:
    """Whether ``fused_quant_matmul(x, q)`` applies: 2-D x in bf16/fp16, a 2-D NF4/FP4 weight of x's width."""
    return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and getattr(q, "kind", None) in ("nf4", "fp4")
            and len(q.shape) == 2 and q.shape[1] == x.shape[1] and x.device == q.device)


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
                    GROUPED=grouped, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, UPCAST=interpreted(),
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

    The fused kernel runs where ``kernels.backend.triton_enabled`` (CUDA) for bf16/fp16 and NF4/FP4 weights
    when ``use_fused`` says so;
    everything else (CPU, int8, fp32, large M) dequantizes and calls cuBLAS.
    """
    if supported(x, q) and x.shape[0] > 0 and use_fused(x.shape[0], q.shape[0], x.shape[1]) and triton_enabled(x):
        return fused_quant_matmul(x, q)
    return F.linear(x, q.dequantize(x.dtype))
