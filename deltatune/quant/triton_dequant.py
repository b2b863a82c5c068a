"""Triton kernel that dequantizes bitsandbytes-layout NF4/FP4 weights (double quantization included).

One program writes ``BLOCK`` consecutive outputs: element ``i`` is the high nibble of byte ``i // 2``
when ``i`` is even, the low nibble when odd (bitsandbytes' order); its scale is ``absmax[i //
blocksize]``, or with double quantization ``dynamic[qabsmax[b]] * nested_absmax[b // 256] + offset``.
The arithmetic is the reference's (fp32 products, one rounding to the output dtype) and FMA
contraction is off, so the result equals ``nf4.dequantize_4bit`` bit for bit.

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


BLOCK = 1024


def dequantize_4bit(q, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``q`` (a ``QuantizedTensor``) in ``dtype``, computed by the Triton kernel; ``out`` may be reused."""
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
    grid = (triton_cdiv(n, BLOCK),)
    bf16 = dtype == torch.bfloat16
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
