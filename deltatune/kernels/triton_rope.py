"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) in Triton, forward and backward.

Hugging Face's ``rotate_half`` convention: with ``x = [x1, x2]`` split in halves of the head dim D,
``out = x * cos + [-x2, x1] * sin``, where ``cos``/``sin`` are (N, D) per token. The map is a rotation,
so the backward is the same kernel with ``-sin``; nothing but cos and sin (shared by every layer) is
saved. One program handles all heads of one token, for q and k in separate launches; cos/sin rows are
indexed per (batch, position), so a batch-1 cos/sin is shared without a copy. With ``rotate=False`` the
kernel copies (v into its contiguous layout, dv into the stacked gradient): 5-6 us for an 8B layer's v
where PyTorch's strided copy took 13.5 (H200).
Imports triton: load through ``deltatune.kernels`` (lazily).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(X, COS, SIN, Y, n_heads, half, stride_b, stride_t, stride_head, seq_len, cs_stride_b, cs_stride_t,
          out_stride_b, out_stride_t, out_stride_head, BACKWARD: tl.constexpr, ROTATE: tl.constexpr,
          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (d < half)
    src = X + (tok // seq_len) * stride_b + (tok % seq_len) * stride_t + heads * stride_head + d
    dst = Y + (tok // seq_len) * out_stride_b + (tok % seq_len) * out_stride_t + heads * out_stride_head + d
    if ROTATE:
        cs = (tok // seq_len) * cs_stride_b + (tok % seq_len) * cs_stride_t  # this token's cos/sin row
        c1 = tl.load(COS + cs + d, mask=d < half, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cs + half + d, mask=d < half, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cs + d, mask=d < half, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cs + half + d, mask=d < half, other=0.0).to(tl.float32)
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(dst, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + half, y2.to(Y.dtype.element_ty), mask=mask)
    else:  # a copy, bit for bit
        tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)
        tl.store(dst + half, tl.load(src + half, mask=mask, other=0.0), mask=mask)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
               out: torch.Tensor | None = None, rotate: bool = True) -> torch.Tensor:
    """Rotate ``x`` (B, T, H, D) (any strides with a unit last stride) by ``cos``/``sin`` (B or 1, T, D).

    A batch of one in cos/sin is broadcast (stride 0, no copy). Returns a new contiguous (B, T, H, D)
    tensor, or writes ``out`` (B, T, H, D, any strides with a unit last stride, not overlapping x);
    ``backward=True`` applies the transposed rotation; ``rotate=False`` copies x (cos/sin unread).
    """
    b, t, h, dim = x.shape
    assert x.stride(3) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    y = torch.empty((b, t, h, dim), dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == x.shape and y.stride(3) == 1 and y.dtype == x.dtype, (y.shape, y.stride(), y.dtype)
    half = dim // 2
    cs_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope[(b * t,)](x, cos, sin, y, h, half, x.stride(0), x.stride(1), x.stride(2), t, cs_b, cos.stride(1),
                    y.stride(0), y.stride(1), y.stride(2), BACKWARD=backward, ROTATE=rotate,
                    BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return y
