"""The NF4/FP4 dequantization kernels (launched by ``deltatune.quant.triton_dequant``, which says what
they compute). Imports triton: load it only through ``triton_dequant`` (lazily, ``kernels.backend.load``)."""

import triton
import triton.language as tl

from deltatune.kernels.triton_bits import bf16_bits


@triton.jit
def _block_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, block, mask, NESTED: tl.constexpr):
    """The fp32 absmax of blocks ``block``: stored, or with double quantization
    ``dynamic[qabsmax[b]] * nested_absmax[b // 256] + offset``."""
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + qabs, mask=mask, other=0.0) * tl.load(nested_ptr + block // 256, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


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
    scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, block, mask, NESTED)
    result = value * scale
    if BF16:  # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        tl.store(out_ptr + offs, bf16_bits(result).to(tl.int16), mask=mask)  # out_ptr is an int16 view
    else:
        tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _halves(high, low, BF16: tl.constexpr, HAND: tl.constexpr):
    """fp32 ``high``/``low`` rounded to 16 bits and packed as one int32 word each (``high`` in the low half:
    little-endian, element 2j first). ``HAND``: round to nearest even with integer operations (the
    interpreter's fp32 -> bf16 cast truncates); compiled, the hardware's conversion rounds the same way."""
    if BF16 and HAND:
        hb, lb = bf16_bits(high) & 0xFFFF, bf16_bits(low) & 0xFFFF
    else:
        half = tl.bfloat16 if BF16 else tl.float16
        hb = high.to(half).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lb = low.to(half).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return hb | (lb << 16)


@triton.jit
def dequant_4bit_pairs_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                              nbytes, row_words, stride_words, HALF_BLOCKSIZE: tl.constexpr,
                              NESTED: tl.constexpr, BF16: tl.constexpr, HAND: tl.constexpr, STRIDED: tl.constexpr,
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
    scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, block, mask, NESTED)
    tl.store(out_ptr + dest, _halves(high * scale, low * scale, BF16, HAND), mask=mask)  # out: int32 view


@triton.jit
def dequant_4bit_blocks_kernel(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, code8_ptr, out_ptr,
                               nbytes, row_bytes, stride_words, HALF_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                               BF16: tl.constexpr, HAND: tl.constexpr, STRIDED: tl.constexpr, ROWS: tl.constexpr):
    # A (ROWS, HALF_BLOCKSIZE) tile of bytes: ROWS quantization blocks, each block's scale computed once.
    k = tl.arange(0, HALF_BLOCKSIZE)[None, :]
    if STRIDED:  # grid (rows, tiles of a row): rows of row_bytes bytes (whole blocks), stride_words apart in out
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # (ROWS,) blocks of this row
        col = j[:, None] * HALF_BLOCKSIZE + k  # byte of the row = output word of the row
        mask = col < row_bytes
        block = row * (row_bytes // HALF_BLOCKSIZE) + j
        block_mask = j * HALF_BLOCKSIZE < row_bytes
        offs = row * row_bytes + col
        dest = row * stride_words + col
    else:
        block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        offs = block[:, None] * HALF_BLOCKSIZE + k  # byte = output word indices
        mask = offs < nbytes
        block_mask = block * HALF_BLOCKSIZE < nbytes
        dest = offs
    scale = _block_scale(absmax_ptr, nested_ptr, offset_ptr, code8_ptr, block, block_mask, NESTED)[:, None]
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))  # element 2j (codes 0..15: no mask needed)
    low = tl.load(code_ptr + (byte & 15))  # element 2j + 1
    tl.store(out_ptr + dest, _halves(high * scale, low * scale, BF16, HAND), mask=mask)  # out: int32 view
