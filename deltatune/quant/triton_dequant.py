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
costs ``O(out * in)`` against the matmul's ``O(tokens * out * in)``. ``import triton`` happens on the
first call, never at ``import deltatune``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "dequantize_4bit"]


def available() -> bool:
    """Whether Triton can be imported (the GPU path falls back to PyTorch otherwise)."""
    from deltatune.kernels.functional import triton_importable

    return triton_importable()


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_4bit_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) element indices
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = offs // BLOCKSIZE
        if NESTED:
            qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code8_ptr + qabs, mask=mask, other=0.0) * tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        result = value * scale
        if BF16:  # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
            bits = result.to(tl.int32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(out_ptr + offs, (bits >> 16).to(tl.int16), mask=mask)  # out_ptr is an int16 view
        else:
            tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)

    return dequant_4bit_kernel


@functools.lru_cache(maxsize=None)
def _pair_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_4bit_pairs_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                                  nbytes, row_words, stride_words, HALF_BLOCKSIZE: tl.constexpr,
                                  NESTED: tl.constexpr, BF16: tl.constexpr, STRIDED: tl.constexpr,
                                  BLOCK: tl.constexpr):
        if STRIDED:  # grid (rows, chunks of a row): rows of row_words words, stride_words apart in out
            row = tl.program_id(0).to(tl.int64)
            col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            mask = col < row_words
            offs = row * row_words + col  # (BLOCK,) byte indices
            dest = row * stride_words + col  # and where their words go
        else:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte = output word indices
            mask = offs < nbytes
            dest = offs
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        high = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0)  # element 2j
        low = tl.load(code_ptr + (byte & 15), mask=mask, other=0.0)  # element 2j + 1
        block = offs // HALF_BLOCKSIZE
        if NESTED:
            qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code8_ptr + qabs, mask=mask, other=0.0) * tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high, low = high * scale, low * scale
        if BF16:  # round to nearest even by hand (the interpreter's fp32 -> bf16 cast truncates)
            hb, lb = high.to(tl.int32, bitcast=True), low.to(tl.int32, bitcast=True)
            hb = ((hb + 0x7FFF + ((hb >> 16) & 1)) >> 16) & 0xFFFF
            lb = ((lb + 0x7FFF + ((lb >> 16) & 1)) >> 16) & 0xFFFF
        else:
            hb = high.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            lb = low.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        word = hb | (lb << 16)
        tl.store(out_ptr + dest, word, mask=mask)  # out_ptr is an int32 view of the 16-bit output

    return dequant_4bit_pairs_kernel


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
        _pair_kernel()[grid](
            q.packed, q.absmax, nested, offset, code, code8, words, nbytes, row_words, stride_words,
            HALF_BLOCKSIZE=q.blocksize // 2, NESTED=q.double_quant, BF16=bf16, STRIDED=strided, BLOCK=PAIR_BLOCK,
            num_warps=PAIR_WARPS, **_launch_options())
        return out
    grid = (triton_cdiv(n, BLOCK),)
    _kernel()[grid](q.packed, q.absmax, nested, offset, code, code8, out.view(torch.int16) if bf16 else out, n,
                    BLOCKSIZE=q.blocksize, NESTED=q.double_quant, BF16=bf16, BLOCK=BLOCK, **_launch_options())
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.lru_cache(maxsize=None)
def _launch_options() -> dict:
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs numpy, which never fuses
        return {}
    return {"enable_fp_fusion": False}
