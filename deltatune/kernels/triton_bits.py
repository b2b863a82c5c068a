"""Bit-level and small helpers shared by Triton kernels here and in ``deltatune.quant`` (which imports them from
here: kernels never import quant). Imports triton: load the kernel modules that use it through
``deltatune.kernels.backend.load``."""

import triton
import triton.language as tl


@triton.jit
def bf16_bits(x):
    """fp32 ``x`` rounded to bf16 (nearest, ties to even) with integer operations, as the int32 whose low
    16 bits are the bf16 pattern: the interpreter's fp32 -> bf16 cast truncates."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation (exact fp32 products with ``IEEE``: fp32 inputs, the interpreter)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)
