"""RMSNorm forward and backward in Triton (Zhang & Sennrich 2019, arXiv:1910.07467).

``y = x * rstd * w`` with ``rstd = 1 / sqrt(mean(x**2) + eps)``, one program per row, statistics in
fp32. The forward saves only ``rstd`` (N floats) beside ``x``, which the caller keeps anyway (it is the
residual stream); Hugging Face's version saves an fp32 copy of ``x`` and of ``x * rstd`` per norm.
``add_rmsnorm_forward`` also does the residual add before the norm (``s = x + h``) in the same pass, and
the backward can add the residual path's gradient.
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
def _add_rmsnorm_fwd(X, H, W, S, Y, RSTD, stride_x, stride_h, n_cols, eps, BLOCK: tl.constexpr):
    # s = x + h (rounded to S's dtype, as the unfused add would), y = rmsnorm(s)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + h).to(S.dtype.element_ty)
    tl.store(S + row * n_cols + cols, s, mask=mask)
    s = s.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * n_cols + cols, (s * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DRES, stride_dy, stride_x, stride_dres, n_cols, HAS_RES: tl.constexpr,
                 BLOCK: tl.constexpr):
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) (+ dres: the gradient reaching x by the residual path)
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
    dx = (g - xhat * c) * rstd
    if HAS_RES:
        dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)


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


def add_rmsnorm_forward(x2: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor, eps: float):
    """``s = x2 + h2`` (N, d) and its normalised rows: returns ``(s, y, rstd)``."""
    n, d = x2.shape
    s = torch.empty((n, d), dtype=x2.dtype, device=x2.device)
    y = torch.empty_like(s)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    block, warps = _launch_params(d)
    _add_rmsnorm_fwd[(n,)](x2, h2, weight, s, y, rstd, x2.stride(0), h2.stride(0), d, eps, BLOCK=block,
                           num_warps=warps)
    return s, y, rstd


def rmsnorm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dres: torch.Tensor | None = None):
    """Gradient of ``rmsnorm_forward`` with respect to its input rows: (N, d) in x's dtype, plus ``dres``
    (N, d) if given (the gradient reaching the input by another path, added in the same pass)."""
    n, d = x2.shape
    dx = torch.empty((n, d), dtype=x2.dtype, device=x2.device)
    block, warps = _launch_params(d)
    _rmsnorm_bwd[(n,)](dy2, x2, weight, rstd, dx, dres if dres is not None else dy2, dy2.stride(0), x2.stride(0),
                       dres.stride(0) if dres is not None else 0, d, HAS_RES=dres is not None, BLOCK=block,
                       num_warps=warps)
    return dx
