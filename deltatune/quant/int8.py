"""Asymmetric int8 quantization with a scale and zero point per block or per output channel.

``q = clamp(round(x / scale) + zero, -128, 127)`` and ``x ~ (q - zero) * scale``, with
``scale = (max - min) / 255`` over a group whose range is widened to include 0, so that 0 is
represented exactly (zero padding, ReLU outputs) and the rounding error is at most ``scale / 2``.
A group is either a block of ``blocksize`` consecutive values of the flattened tensor, or, with
``blocksize=None``, one row (output channel) of a 2-D weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["Int8Tensor", "quantize_int8", "dequantize_int8"]

QMIN, QMAX = -128, 127


@dataclass
class Int8Tensor:
    """An int8-quantized tensor: ``packed`` int8 shaped like the original (or padded flat for blocks).

    ``scale`` and ``zero`` (fp32) have one entry per group: (rows, 1) per channel, (blocks, 1) per block.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    kind: str = "int8"
    blocksize: int | None = None

    @property
    def double_quant(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: the original dtype), written into ``out`` if given."""
        dense = dequantize_int8(self, dtype)
        return dense if out is None else out.copy_(dense)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scale": self.scale, "zero": self.zero}

    def to(self, device) -> "Int8Tensor":
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _groups(x: torch.Tensor, blocksize: int | None) -> torch.Tensor:
    """x as (groups, group_size) fp32; a ragged last block is padded with zeros (inside any range)."""
    if blocksize is None:
        if x.dim() < 2:
            raise ValueError("per-channel int8 needs a tensor of 2 or more dims (rows are output channels)")
        return x.reshape(x.shape[0], -1).float()
    flat = x.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


def quantize_int8(x: torch.Tensor, blocksize: int | None = None) -> Int8Tensor:
    """Quantize ``x`` to asymmetric int8, per output channel (``blocksize=None``) or per block."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantization takes fp32/fp16/bf16 tensors, got {x.dtype}")
    if blocksize is not None and blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    g = _groups(x, blocksize)
    lo = g.amin(dim=1, keepdim=True).clamp(max=0)
    hi = g.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (QMAX - QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale is exact
    zero = (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX)
    q = (torch.round(g / scale) + zero).clamp(QMIN, QMAX).to(torch.int8)
    return Int8Tensor(q, scale, zero, x.shape, x.dtype, "int8", blocksize)


def dequantize_int8(q: Int8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(q - zero) * scale`` reshaped to the original shape, in ``dtype``."""
    out = (q.packed.float() - q.zero) * q.scale
    return out.reshape(-1)[: q.numel()].reshape(q.shape).to(dtype or q.dtype)
