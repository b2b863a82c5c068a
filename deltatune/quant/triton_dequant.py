"""Triton kernel that dequantizes bitsandbytes-layout NF4/FP4 weights (double quantization included).

One program writes ``BLOCK`` consecutive outputs: element ``i`` is the high nibble of byte ``i // 2``
when ``i`` is even, the low nibble when odd (bitsandbytes' order); its scale is ``absmax[i //
blocksize]``, or with double quantization ``dynamic[qabsmax[b]] * nested_absmax[b // 256] + offset``.
The arithmetic is the reference's (fp32 products, one rounding to the output dtype) and FMA
contraction is off, so the result equals ``nf4.dequantize_4bit`` bit for bit.

For 16-bit outputs (the training case) two kernels work a byte per lane instead: each looks up
both nibbles of byte ``j`` with the one scale they share (``blocksize`` is even), rounds each to 16
bits and stores the pair as one 32-bit word (element ``2j`` in the low half: little-endian), so its
stores need no interleave. The "pairs" kernel computes the scale for every byte; the "blocks" kernel
(the default) takes a tile of whole quantization blocks and computes each block's scale once, a
sixteenth of the scale loads at blocksize 64. Both round with the hardware's bf16 conversion when
compiled (the interpreter's conversion truncates, so interpreted runs round by hand). On an H200, in
an 8B training step: 43.8 against 56.0 us for a 4096x14336 weight, 14.0 against 17.8 for 4096x4096
(isolated, L2 flushed: 41.8 and 47.0 at 14336x4096; bench/bench_dequant.py). Into the left columns of
a wider matrix (the stacked weights' backward) the blocks kernel runs a grid of (row, tile of the
row's blocks), where rows are whole blocks: 42.0 against 47.3 us for W_g into [W_g; W_u | 32 spare
columns] (isolated, H200). An earlier version (flat 128-block tiles spanning two rows, each block's
row found by an int64 division) ran 2.6x slower than the pairs kernel there.

For training shapes (thousands of tokens) dequantize-then-cuBLAS is the fast path: dequantizing
costs ``O(out * in)`` against the matmul's ``O(tokens * out * in)``. The kernels live in
``triton_dequant_kernels.py``, imported (with triton) on the first call, never at ``import deltatune``.
"""

from __future__ import annotations

import functools

import torch

from deltatune.kernels.backend import interpreted, load
from deltatune.quant.codes import code_table, dynamic_map

__all__ = ["dequantize_4bit"]


def _kernels():
    """The kernel module (imports triton on first use)."""
    return load("deltatune.quant.triton_dequant_kernels")


BLOCK = 1024
PAIR_BLOCK = 2048  # bytes (= 4096 outputs) per program of the pair kernel
PAIR_WARPS = 4
BLOCKS_BYTES = 4096  # bytes per program of the blocks kernel (128 blocks of 64): fastest on an H200
BLOCKS_WARPS = 4
KERNELS = ("element", "pairs", "blocks")


def dequantize_4bit(q, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                    kernel: str | None = None) -> torch.Tensor:
    """Dense ``q`` (a ``QuantizedTensor``) in ``dtype``, computed by a Triton kernel, into ``out`` if given.

    ``out`` is contiguous, or a 2-D view with unit column stride (the left columns of a wider matrix):
    written in place by the 16-bit kernels when columns and row stride are even, else through a copy.
    ``kernel`` forces one of ``KERNELS``: "element" (any dtype and size), "pairs" (a byte a lane;
    16-bit output, even size), "blocks" (a tile of whole quantization blocks, each block's scale
    computed once; as "pairs", and into a strided ``out`` only when its rows are whole blocks). By
    default "blocks" where it applies, else "pairs", else "element".
    """
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    dtype = dtype or q.dtype
    n = q.numel()
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    code = code_table(q.kind, q.device)
    if q.double_quant:
        nested, offset, code8 = q.nested_absmax, q.offset.reshape(1).float(), dynamic_map(q.device)
    else:  # unused pointers; any fp32 tensor on the device
        nested = offset = code8 = code
    bf16 = dtype == torch.bfloat16
    pairs_apply = dtype in (torch.bfloat16, torch.float16) and n % 2 == 0 and q.blocksize % 2 == 0
    strided = not out.is_contiguous()
    cols = q.shape[-1] if q.shape else 1
    if strided and not (pairs_apply and out.dim() == 2 and out.stride(1) == 1 and cols % 2 == 0
                        and out.stride(0) % 2 == 0 and out.storage_offset() % 2 == 0 and kernel != "element"):
        return out.copy_(dequantize_4bit(q, dtype, kernel=kernel))  # whole 32-bit words only: via a copy
    blocks_apply = pairs_apply and (not strided or cols % q.blocksize == 0)  # strided: rows of whole blocks
    if kernel in ("pairs", "blocks") and not (blocks_apply if kernel == "blocks" else pairs_apply):
        raise ValueError(f"the {kernel} kernel does not apply to {dtype} output of {tuple(q.shape)} "
                         f"(blocksize {q.blocksize}{', strided' if strided else ''})")
    kernel = kernel or ("blocks" if blocks_apply else "pairs" if pairs_apply else "element")
    common = dict(NESTED=q.double_quant, BF16=bf16, **_launch_options())
    if kernel == "element":
        grid = (triton_cdiv(n, BLOCK),)
        _kernels().dequant_4bit_kernel[grid](q.packed, q.absmax, nested, offset, code, code8,
                                             out.view(torch.int16) if bf16 else out, n, BLOCKSIZE=q.blocksize,
                                             BLOCK=BLOCK, **common)
        return out
    # 16-bit output as int32 words, word j holding elements 2j, 2j + 1 (those of byte j);
    # strided: (rows, cols / 2) words, word (r, c) at r * stride_words + c from the first
    words = out.view(torch.int32) if strided else out.view(-1).view(torch.int32)
    row_words, stride_words = (cols // 2, out.stride(0) // 2) if strided else (1, 1)
    nbytes, half = n // 2, q.blocksize // 2
    common.update(HALF_BLOCKSIZE=half, HAND=interpreted())
    if kernel == "blocks":
        rows = max(1, BLOCKS_BYTES // half)
        if strided:  # a tile of one row's blocks (no wider than the row): 64 of them fastest on an H200
            rows = min(rows, 1 << (row_words // half - 1).bit_length())
            grid = (out.shape[0], triton_cdiv(row_words // half, rows))
        else:
            grid = (triton_cdiv(nbytes, rows * half),)
        _kernels().dequant_4bit_blocks_kernel[grid](
            q.packed, q.absmax, nested, offset, code, code8, words, nbytes, row_words, stride_words,
            STRIDED=strided, ROWS=rows, num_warps=BLOCKS_WARPS, **common)
        return out
    grid = (out.shape[0], triton_cdiv(row_words, PAIR_BLOCK)) if strided else (triton_cdiv(nbytes, PAIR_BLOCK),)
    _kernels().dequant_4bit_pairs_kernel[grid](
        q.packed, q.absmax, nested, offset, code, code8, words, nbytes, row_words, stride_words,
        STRIDED=strided, BLOCK=PAIR_BLOCK, num_warps=PAIR_WARPS, **common)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.lru_cache(maxsize=None)
def _launch_options() -> dict:
    if interpreted():  # the interpreter runs numpy, which never fuses
        return {}
    return {"enable_fp_fusion": False}
