"""RMSNorm forward and backward in Triton (Zhang & Sennrich 2019, arXiv:1910.07467).

``y = x * rstd * w`` with ``rstd = 1 / sqrt(mean(x**2) + eps)``, one program per row, statistics in
fp32. The forward saves only ``rstd`` (N floats) beside ``x``, which the caller keeps anyway (it is the
residual stream); Hugging Face's version saves an fp32 copy of ``x`` and of ``x * rstd`` per norm.
Imports triton: load through ``deltatune.kernels`` (lazily).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, stride_dy, stride_x, n_cols, BLOCK: tl.constexpr):
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  xhat = x * rstd
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = x * rstd
    g = dy * w
    c = tl.sum(g * xhat, axis=0) / n_cols
    tl.store(DX + row * n_cols + cols, ((g - xhat * c) * rstd).to(DX.dtype.element_ty), mask=mask)


def _launch_params(n_cols):
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)


def rmsnorm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    """Normalise the rows of ``x2`` (N, d). Returns ``y`` (N, d) in x's dtype and ``rstd`` (N,) fp32."""
    n, d = x2.shape
    y = torch.empty((n, d), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    block, warps = _launch_params(d)
    _rmsnorm_fwd[(n,)](x2, weight, y, rstd, x2.stride(0), d, eps, BLOCK=block, num_warps=warps)
    return y, rstd


def rmsnorm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Gradient of ``rmsnorm_forward`` with respect to its input rows: (N, d) in x's dtype."""
    n, d = x2.shape
    dx = torch.empty((n, d), dtype=x2.dtype, device=x2.device)
    block, warps = _launch_params(d)
    _rmsnorm_bwd[(n,)](dy2, x2, weight, rstd, dx, dy2.stride(0), x2.stride(0), d, BLOCK=block, num_warps=warps)
    return dx
