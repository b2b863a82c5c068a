"""Blockwise 4-bit NF4 / FP4 quantization in bitsandbytes' format (Dettmers et al. 2023, arXiv:2305.14314).

A weight is flattened, cut into blocks of ``blocksize`` values, and each block is scaled by its
absolute maximum (``absmax``) into [-1, 1]; every value becomes the index of the nearest of 16 code
values. Two codes share a byte, the first element in the high nibble (bitsandbytes' order), so
``packed`` holds ``ceil(n / 2)`` bytes shaped ``(ceil(n / 2), 1)`` exactly like
``bitsandbytes.functional.quantize_4bit``. With double quantization (QLoRA section 3) the fp32
absmax values have their mean (``offset``) subtracted and are themselves quantized to 8 bits in
blocks of 256 with bitsandbytes' dynamic 8-bit code, which saves ~0.37 bits per parameter.

Rounding follows bitsandbytes 0.50's CPU path bit for bit (it is the oracle the tests run):
4-bit codes by ``bucketize`` on the fp32 midpoints of the sorted table (a value exactly on a
midpoint takes the lower code); scales by ``x * (1 / absmax)`` for whole blocks and ``x / absmax`` for
the ragged last block; the 8-bit absmax codes through bitsandbytes' 65536-entry lookup table.
bitsandbytes' CUDA kernels pick the same codes except at exact midpoints (FP4 negatives, the
sign bit of FP4 zero) and for the 8-bit absmax, where their binary search differs from the LUT in
a few entries per thousand; every such choice decodes by the same tables, so files move freely
between the two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from deltatune.kernels.backend import triton_enabled
from deltatune.quant import triton_dequant
from deltatune.quant.codes import (FP4_CODE, FP4_ORDER, NESTED_BLOCKSIZE, NF4_CODE, code_table, dynamic_lut,
                                   dynamic_map)

__all__ = [
    "NF4_CODE", "FP4_CODE", "BLOCKSIZES", "NESTED_BLOCKSIZE", "QuantizedTensor", "code_table", "dynamic_map",
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.lru_cache(maxsize=None)
def _bounds(kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted-bucket midpoints (15,) and bucket -> code map (16,) for nearest-code rounding."""
    code = code_table(kind, device)
    order = torch.tensor(FP4_ORDER if kind == "fp4" else range(16), device=device)
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order.to(torch.uint8)


def _check_input(A: torch.Tensor) -> None:
    if A.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantization takes fp32/fp16/bf16 tensors, got {A.dtype}")
    if A.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(blocks,) fp32 absmax of each block of ``flat``; the last block may be short."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().unsqueeze(0)])
    return absmax


def quantize_blockwise_8bit(A: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic code, as bitsandbytes' CPU ``quantize_blockwise``.

    Returns (codes uint8 shaped like ``A``, absmax (blocks,) fp32). A block of zeros gets code 0.
    """
    _check_input(A)
    flat = A.reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, blocksize)
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # zero blocks: code 0 below
    scaled = (padded * inverse[:, None]).nan_to_num_(0.0).clamp_(-1.0, 1.0)  # nan: an overflowed mean
    # Same fp32 sequence as bitsandbytes: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
    index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)
    codes = dynamic_lut(A.device)[index.long()]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].reshape(A.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: ``code[q] * absmax[block]`` in fp32, shaped like ``codes``."""
    flat = dynamic_map(codes.device)[codes.reshape(-1).long()]
    n = flat.numel()
    blocks = absmax.numel()
    out = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize) * absmax[:, None]
    return out.reshape(-1)[:n].reshape(codes.shape)


@dataclass
class QuantizedTensor:
    """A 4-bit blockwise-quantized tensor in bitsandbytes' layout.

    ``packed`` (ceil(n/2), 1) uint8, high nibble first. ``absmax`` is (blocks,) fp32, or with double
    quantization (blocks,) uint8 codes of ``absmax - offset`` scaled by ``nested_absmax``
    (ceil(blocks/256),) fp32. ``shape`` and ``dtype`` are the original tensor's.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    kind: str = "nf4"
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def scales(self) -> torch.Tensor:
        """The fp32 per-block absmax, undoing the double quantization if any."""
        if not self.double_quant:
            return self.absmax.float()
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, NESTED_BLOCKSIZE) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: the original dtype): Triton where ``kernels.backend``
        says so (CUDA), else the reference ``dequantize_4bit``.

        ``out``: a tensor of this shape and dtype to write into, with unit last stride (e.g. rows of a
        stacked weight, or the left columns of a wider one).
        """
        dtype = dtype or self.dtype
        if out is not None and (out.shape != self.shape or out.dtype != dtype or out.stride(-1) != 1):
            raise ValueError(f"out must be a {dtype} tensor of shape {tuple(self.shape)} with unit last stride, "
                             f"got {out.dtype} {tuple(out.shape)} with strides {out.stride()}")
        if triton_enabled(self.packed):  # the kernel's launcher knows only the code tables: no cycle
            return triton_dequant.dequantize_4bit(self, dtype, out=out)
        dense = dequantize_4bit(self, dtype)
        return dense if out is None else out.copy_(dense)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (buffers of a module, entries of a state dict)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(nested_absmax=self.nested_absmax, offset=self.offset)
        return out

    def to(self, device) -> "QuantizedTensor":
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_4bit(A: torch.Tensor, kind: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> QuantizedTensor:
    """Quantize ``A`` (fp32/fp16/bf16, any shape) to ``kind`` ("nf4"/"fp4") in blocks of ``blocksize``.

    The result's ``packed`` and (without ``double_quant``) ``absmax`` equal bitsandbytes'
    ``quantize_4bit(A, blocksize=blocksize, quant_type=kind)`` byte for byte.
    """
    _check_input(A)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    bounds, order = _bounds(kind, A.device)
    flat = A.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = _blockwise_absmax(flat, blocksize)
    if full < n:  # bitsandbytes stores the ragged block's absmax clamped (whole blocks unclamped)
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax[: full // blocksize].clamp(min=1e-38))[:, None])
    scaled = scaled.clamp_(-1, 1).reshape(-1)
    if full < n:  # bitsandbytes divides (rather than multiplies by the reciprocal) in the ragged block
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / absmax[-1], -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the odd last byte's low nibble encodes 0
    codes = order[torch.bucketize(scaled, bounds)]
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    q = QuantizedTensor(packed, absmax, A.shape, A.dtype, kind, blocksize)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        q.offset = offset
    return q


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 4-bit codes from bitsandbytes' packing (high nibble first)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


@functools.lru_cache(maxsize=None)
def _byte_table(kind: str, device) -> torch.Tensor:
    """(256, 2) fp32: the (high, low) nibble code values of every byte, one gather per byte."""
    byte = torch.arange(256, device=device)
    return code_table(kind, device)[torch.stack([byte >> 4, byte & 0xF], dim=1)]


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantizer in PyTorch: ``code[q] * absmax[block]`` in fp32, then cast to ``dtype``."""
    n = q.numel()
    values = torch.nn.functional.embedding(q.packed.reshape(-1).int(), _byte_table(q.kind, q.device)).reshape(-1)
    absmax = q.scales()
    blocks = absmax.numel()
    if n % q.blocksize == 0 and values.numel() == n:
        out = values.view(blocks, q.blocksize) * absmax[:, None]
    else:
        out = torch.nn.functional.pad(values[:n], (0, blocks * q.blocksize - n)).view(blocks, q.blocksize) * absmax[:, None]
    return out.reshape(-1)[:n].reshape(q.shape).to(dtype or q.dtype)
