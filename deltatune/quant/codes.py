"""The code tables of bitsandbytes' formats: the 16 NF4 and FP4 values and the dynamic 8-bit map.

Shared by the reference quantizer (``nf4.py``), the Triton kernels' launchers (``triton_dequant.py``,
``triton_matmul.py``), bitsandbytes checkpoints (``hf_bnb.py``) and the 8-bit optimizer states, all of
which import them from here (downward). Torch only.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["NF4_CODE", "FP4_CODE", "FP4_ORDER", "NESTED_BLOCKSIZE", "code_table", "dynamic_map", "dynamic_lut"]

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantized absmax

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (bitsandbytes' create_normal_map(0.9677083)).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, before division by 12.
FP4_CODE = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Bit pattern of the k-th smallest FP4 value: the order bitsandbytes' CPU quantizer maps its
# sorted buckets through (which puts +0 below -0: tiny negatives get code 0, tiny positives 8).
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@functools.lru_cache(maxsize=None)
def code_table(kind: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """The 16 code values of ``kind`` ("nf4" or "fp4") as fp32, indexed by the 4-bit code."""
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"4-bit kind must be 'nf4' or 'fp4', got {kind!r}")
    data = torch.tensor(NF4_CODE if kind == "nf4" else FP4_CODE, dtype=torch.float32)
    return data.div_(data.abs().max()).to(device)  # bitsandbytes' get_4bit_type, same fp32 ops


@functools.lru_cache(maxsize=None)
def dynamic_map(device: str | torch.device = "cpu", signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (``create_dynamic_map(signed)``), (256,) fp32 sorted.

    Dettmers 2015 (arXiv:1511.04561): a sign bit (if ``signed``), a run of zeros giving a decimal
    exponent 10^-6..10^0, and the remaining bits a linear fraction in [0.1, 1]. The signed code
    stores double-quantized absmax values and Adam's first moment, the unsigned one the second.
    """
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def dynamic_lut(device) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: 65536 even steps over [-1, 1] -> nearest dynamic code."""
    code = dynamic_map(device)
    mid = 0.5 * (code[:-1] + code[1:])
    steps = torch.arange(65536, dtype=torch.float32, device=device)
    val = -1.0 + (2.0 * steps) / 65535.0
    return torch.searchsorted(mid, val, side="left").to(torch.uint8)  # number of midpoints < val
