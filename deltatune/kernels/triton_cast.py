"""Cast and scale several small fp32 tensors into one 16-bit buffer in one launch (the LoRA factors of a
fused node: ``A`` as is, ``s B`` scaled), and add several tensors into as many others in one launch (the
CUDA graphs' gradient accumulation). Imports triton: load through ``deltatune.kernels`` (lazily).

``torch._foreach_copy_`` does this in one launch too, but gives each 65,536-element chunk to one thread
block: a node's handful of (16, 4096) factors ran as six blocks, 16 us a launch on an H200. Here a
program takes ``BLOCK`` elements of one tensor (grid: chunks x tensors): 2.7 us a launch on average in
the 8B training step on the same H200. ``_foreach_add_`` has the same one-block-per-chunk layout: a
layer's fourteen adapter gradients took 20.5 us to accumulate there, these two launches 7.6 us.
"""

import torch
import triton
import triton.language as tl

from deltatune.kernels.backend import interpreted
from deltatune.kernels.triton_bits import bf16_bits

MAX_TENSORS = 8  # per launch; more are cast in several
BLOCK = 1024


def _launches(n: int):
    """The index lists of ``n`` tensors, ``MAX_TENSORS`` a launch."""
    return [list(range(start, min(start + MAX_TENSORS, n))) for start in range(0, n, MAX_TENSORS)]


def _padded(values, fill) -> list:
    """``values`` filled up to ``MAX_TENSORS`` with ``fill`` (the unused slots of a launch's arguments)."""
    return list(values) + [fill] * (MAX_TENSORS - len(values))


@triton.jit
def _cast_one(dst, src, n, offset, scale, offs, HAND: tl.constexpr):
    mask = offs < n
    x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32) * scale  # fp32 product, rounded once
    if HAND:  # bf16 round to nearest even by hand into an int16 view (the interpreter's cast truncates)
        tl.store(dst + offset + offs, bf16_bits(x).to(tl.int16), mask=mask)
    else:
        tl.store(dst + offset + offs, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _cast_many(dst, s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, n4, n5, n6, n7,
               o0, o1, o2, o3, o4, o5, o6, o7, c0, c1, c2, c3, c4, c5, c6, c7,
               COUNT: tl.constexpr, HAND: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(1)  # which tensor
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if t == 0:
        _cast_one(dst, s0, n0, o0, c0, offs, HAND)
    if COUNT > 1 and t == 1:
        _cast_one(dst, s1, n1, o1, c1, offs, HAND)
    if COUNT > 2 and t == 2:
        _cast_one(dst, s2, n2, o2, c2, offs, HAND)
    if COUNT > 3 and t == 3:
        _cast_one(dst, s3, n3, o3, c3, offs, HAND)
    if COUNT > 4 and t == 4:
        _cast_one(dst, s4, n4, o4, c4, offs, HAND)
    if COUNT > 5 and t == 5:
        _cast_one(dst, s5, n5, o5, c5, offs, HAND)
    if COUNT > 6 and t == 6:
        _cast_one(dst, s6, n6, o6, c6, offs, HAND)
    if COUNT > 7 and t == 7:
        _cast_one(dst, s7, n7, o7, c7, offs, HAND)


def cast_into(dst: torch.Tensor, srcs, offsets, scales) -> torch.Tensor:
    """``dst[o:o + src.numel()] = (src * scale)`` rounded to ``dst``'s dtype, for each source (contiguous
    fp32/bf16/fp16 tensors) at its element offset in the flat contiguous ``dst``. Returns ``dst``."""
    hand = dst.dtype == torch.bfloat16 and interpreted()
    out = dst.view(torch.int16) if hand else dst
    for part in _launches(len(srcs)):
        ptrs = _padded([srcs[i] for i in part], srcs[part[0]])
        sizes = _padded([srcs[i].numel() for i in part], 0)
        offs = _padded([offsets[i] for i in part], 0)
        cs = _padded([float(scales[i]) for i in part], 1.0)
        grid = (triton.cdiv(max(sizes), BLOCK), len(part))
        _cast_many[grid](out, *ptrs, *sizes, *offs, *cs, COUNT=len(part), HAND=hand, BLOCK=BLOCK)
    return dst


@triton.jit
def _add_one(dst, src, n, offs):
    mask = offs < n
    x = tl.load(dst + offs, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + offs, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _add_many(d0, d1, d2, d3, d4, d5, d6, d7, s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, n4, n5, n6, n7,
              COUNT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(1)  # which pair
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if t == 0:
        _add_one(d0, s0, n0, offs)
    if COUNT > 1 and t == 1:
        _add_one(d1, s1, n1, offs)
    if COUNT > 2 and t == 2:
        _add_one(d2, s2, n2, offs)
    if COUNT > 3 and t == 3:
        _add_one(d3, s3, n3, offs)
    if COUNT > 4 and t == 4:
        _add_one(d4, s4, n4, offs)
    if COUNT > 5 and t == 5:
        _add_one(d5, s5, n5, offs)
    if COUNT > 6 and t == 6:
        _add_one(d6, s6, n6, offs)
    if COUNT > 7 and t == 7:
        _add_one(d7, s7, n7, offs)


def add_many_(dsts, srcs) -> None:
    """``dst += src`` for each pair (contiguous, same numel; the sum in fp32, rounded once to dst's dtype),
    up to ``MAX_TENSORS`` pairs a launch."""
    for part in _launches(len(dsts)):
        ds = _padded([dsts[i] for i in part], dsts[part[0]])
        ss = _padded([srcs[i] for i in part], srcs[part[0]])
        sizes = _padded([dsts[i].numel() for i in part], 0)
        grid = (triton.cdiv(max(sizes), BLOCK), len(part))
        _add_many[grid](*ds, *ss, *sizes, COUNT=len(part), BLOCK=BLOCK)
