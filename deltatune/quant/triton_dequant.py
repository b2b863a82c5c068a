"""Triton kernel that dequantizes bitsandbytes-layout NF4/FP4 weights (double quantization included).

One program writes ``BLOCK`` consecutive outputs: element ``i`` is the high nibble of byte ``i // 2``
when ``i`` is even, the low nibble when odd (bitsandbytes' order); its scale is ``absmax[i //
blocksize]``, or with double quantization ``dynamic[qabsmax[b]] * nested_absmax[b // 256] + offset``.
The arithmetic is the reference's (fp32 products, one rounding to the output dtype) and FMA
contraction is off, so the result equals ``nf4.dequantize_4bit`` bit for bit.

For 16-bit outputs (the training case) a second kernel works a byte per lane instead: it looks up
both nibbles of byte ``j`` with the one scale they share (``blocksize`` is even), rounds each to 16
bits and stores the pair as one 32-bit word (element ``2j`` in the low half: little-endian), so each
program does half the index arithmetic and scale loads and its stores need no interleave.
``dequantize_4bit`` picks it when the element count is even and the output is bf16/fp16.

For training shapes (thousands of tokens) dequantize-then-cuBLAS is the fast path: dequantizing
costs ``O(out * in)`` against the matmul's ``O(tokens * out * in)``. The kernels live in
``triton_dequant_kernels.py``, imported (with triton) on the first call, never at ``import deltatune``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "dequantize_4bit"]


def available() -> bool:
    """Whether Triton can be imported (the GPU path falls back to PyTorch otherwise)."""
    from deltatune.kernels.functional import triton_importable

    return triton_importable()


def _kernels():
    """The kernel module (imports triton on first use)."""
    import importlib

    return importlib.import_module("deltatune.quant.triton_dequant_kernels")


BLOCK = 1024
PAIR_BLOCK = 2048  # bytes (= 4096 outputs) per program of the pair kernel
PAIR_WARPS = 4


def dequantize_4bit(q, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                    pairs: bool | None = None) -> torch.Tensor:
    """Dense ``q`` (a ``QuantizedTensor``) in ``dtype``, computed by a Triton kernel, into ``out`` if given.

    ``out`` is contiguous, or a 2-D view with unit column stride (the left columns of a wider matrix):
    written in place by the byte-pair kernel when columns and row stride are even, else through a copy.
    ``pairs`` forces the byte-pair kernel (True) or the per-element one (False); by default the pair
    kernel runs wherever it applies (16-bit output, even element count).
    """
    from deltatune.quant.nf4 import code_table, dynamic_map

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
    if strided:
        cols = q.shape[-1]
        if not (pairs_apply and out.dim() == 2 and out.stride(1) == 1 and cols % 2 == 0 and out.stride(0) % 2 == 0
                and out.storage_offset() % 2 == 0 and pairs is not False):
            return out.copy_(dequantize_4bit(q, dtype, pairs=pairs))  # whole 32-bit words only: via a copy
    if pairs and not pairs_apply:
        raise ValueError(f"the byte-pair kernel needs a 16-bit output and an even size, got {dtype}, {n} elements")
    if pairs_apply and pairs is not False:
        nbytes = n // 2
        if strided:  # (rows, cols / 2) int32 words, word (r, c) at r * stride_words + c from the first
            words = out.view(torch.int32)
            row_words, stride_words = cols // 2, out.stride(0) // 2
        else:
            words, row_words, stride_words = out.view(-1).view(torch.int32), 1, 1
        grid = (out.shape[0], triton_cdiv(row_words, PAIR_BLOCK)) if strided else (triton_cdiv(nbytes, PAIR_BLOCK),)
        _kernels().dequant_4bit_pairs_kernel[grid](
            q.packed, q.absmax, nested, offset, code, code8, words, nbytes, row_words, stride_words,
            HALF_BLOCKSIZE=q.blocksize // 2, NESTED=q.double_quant, BF16=bf16, STRIDED=strided, BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS, **_launch_options())
        return out
    grid = (triton_cdiv(n, BLOCK),)
    _kernels().dequant_4bit_kernel[grid](q.packed, q.absmax, nested, offset, code, code8,
                                         out.view(torch.int16) if bf16 else out, n, BLOCKSIZE=q.blocksize,
                                         NESTED=q.double_quant, BF16=bf16, BLOCK=BLOCK, **_launch_options())
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.lru_cache(maxsize=None)
def _launch_options() -> dict:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs numpy, which never fuses
        return {}
    return {"enable_fp_fusion": False}
