"""Autograd functions for RMSNorm, RoPE, SwiGLU and linear + cross-entropy, with Triton on CUDA.

Every function computes in fp32 and rounds once to the input dtype; the PyTorch branch is the same math
and is what runs on CPU. What each saves for backward is stated in its docstring.
"""

from __future__ import annotations

import torch

from deltatune.kernels.backend import load, triton_enabled

__all__ = ["add_many_", "add_rms_norm", "apply_rope", "linear_cross_entropy", "rms_norm", "rms_norm_pass",
           "rms_norm_values", "swiglu", "triton_enabled"]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or kept in fp64: the PyTorch branch's compute dtype."""
    return t if t.dtype == torch.float64 else t.float()


def _k(name: str):
    """The Triton kernel module ``deltatune.kernels.<name>`` (imports triton on first use)."""
    return load("deltatune.kernels." + name)


# -- RMSNorm --------------------------------------------------------------------------------------------
def _rms_ref(x2, weight, eps):
    xf = _wide(x2)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[:, None] * _wide(weight)).to(x2.dtype), rstd


def _rms_forward(ctx, x, weight, eps):
    x2 = x.reshape(-1, x.shape[-1])
    if triton_enabled(x2):
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y, rstd = _k("triton_rmsnorm").rmsnorm_forward(x2, weight, eps)
    else:
        y, rstd = _rms_ref(x2, weight, eps)
    ctx.save_for_backward(x2, weight, rstd)
    return y.view(x.shape)


def _rms_backward(ctx, dy, dres=None, need_dx=None, need_dw=None):
    """(dx, dweight) of ``_rms_forward`` (``ctx`` saved the norm's input, weight and rstd); ``dres`` (x's
    shape), if given, is added to dx in the same pass. ``need_dx``/``need_dw`` default to the node's
    first two ``needs_input_grad`` flags."""
    x2, weight, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0] if need_dx is None else need_dx
    need_dw = ctx.needs_input_grad[1] if need_dw is None else need_dw
    dy2 = dy.reshape(x2.shape)
    dres2 = dres.reshape(x2.shape) if dres is not None else None
    dx = dw = None
    if need_dx:
        if triton_enabled(x2):
            dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
            dres2 = dres2 if dres2 is None or dres2.stride(-1) == 1 else dres2.contiguous()
            dx = _k("triton_rmsnorm").rmsnorm_backward(dy2, x2, weight, rstd, dres2)
        else:
            xhat = _wide(x2) * rstd[:, None]
            g = _wide(dy2) * _wide(weight)
            dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd[:, None]
            dx = (dx + _wide(dres2) if dres2 is not None else dx).to(x2.dtype)
        dx = dx.view(dy.shape)
    if need_dw:  # a trained norm weight (frozen in LoRA; computed only if asked)
        dw = (_wide(dy2) * _wide(x2) * rstd[:, None]).sum(0).to(weight.dtype)
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    """Saves x (N, d) (the caller's residual stream, no copy) and rstd (N,) fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        return _rms_forward(ctx, x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        return *_rms_backward(ctx, dy), None


class _RMSNormPass(torch.autograd.Function):
    """``(x, rmsnorm(x))``: x passes through (as a view) for the residual path, so the backward gets both
    gradients and adds the residual's in the norm's backward pass (one kernel where autograd would run
    the norm's backward and then an add over the residual stream). Saves what ``_RMSNorm`` saves."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        return x.view_as(x), _rms_forward(ctx, x, weight, eps)

    @staticmethod
    def backward(ctx, dres, dy):
        if dy is None:
            return dres, None, None
        return *_rms_backward(ctx, dy, dres), None


def rms_norm_pass(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x, rms_norm(x))`` where x also feeds a residual path: the same values as ``x`` and
    ``rms_norm(x, weight, eps)``, with the two gradients reaching x summed in the norm's backward kernel."""
    return _RMSNormPass.apply(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (..., d) with ``weight`` (d,): ``x / sqrt(mean(x^2) + eps) * weight``.

    A fused LoRA node that takes the output as input can be told so (``lora_group(..., norm=(x, weight,
    eps))``): it then saves x (which this node saves anyway) instead of the output, and recomputes the
    output in its backward with ``rms_norm_values`` (one elementwise kernel instead of d * 2 bytes a token
    kept).
    """
    return _RMSNorm.apply(x, weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    """``s = x + h``, ``y = rmsnorm(s)`` in one pass; saves s (the residual stream: returned anyway) and rstd.

    Backward: both inputs get ``ds + d rmsnorm / ds (dy)``, the residual path's gradient added in the
    norm's backward pass instead of by a separate kernel."""

    @staticmethod
    def forward(ctx, x, h, weight, eps):
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        if triton_enabled(x2):
            x2, h2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, h2))
            s, y, rstd = _k("triton_rmsnorm").add_rmsnorm_forward(x2, h2, weight, eps)
        else:
            s = x2 + h2
            y, rstd = _rms_ref(s, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = x.shape
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        if dy is None:
            dx, dw = ds, None
        else:
            dx, dw = _rms_backward(ctx, dy, ds, need_dx=True, need_dw=ctx.needs_input_grad[2])
        dx = dx.view(ctx.shape) if dx is not None else None
        return dx, dx, dw, None


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the RMSNorm after it in one pass: returns ``(x + h, rms_norm(x + h))``.

    A fused LoRA node taking the normalised output can be given ``norm=(x + h, weight, eps)`` (it then
    saves the sum, which this node saves anyway, and recomputes the norm), as with ``rms_norm``."""
    return _AddRMSNorm.apply(x, h, weight, eps)


def rms_norm_values(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward of ``rms_norm`` without autograd, bit for bit (x (N, d) -> (N, d))."""
    if triton_enabled(x):
        return _k("triton_rmsnorm").rmsnorm_forward(x if x.stride(-1) == 1 else x.contiguous(), weight, eps)[0]
    return _rms_ref(x, weight, eps)[0]


# -- RoPE -----------------------------------------------------------------------------------------------
def _rope_ref(x, cos, sin, backward=False):
    # x (B, T, H, D); cos, sin (B or 1, T, D)
    half = x.shape[-1] // 2
    xf, c, s = _wide(x), _wide(cos)[:, :, None], _wide(sin)[:, :, None]
    x1, x2 = xf[..., :half], xf[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), -1)
    else:
        y = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), -1)
    return y.to(x.dtype)


def _rope(x, cos, sin, backward, out=None):
    if triton_enabled(x):
        return _k("triton_rope").rope_apply(x, cos, sin, backward, out)
    y = _rope_ref(x, cos, sin, backward)
    return y if out is None else out.copy_(y)


def _copy_heads(x, out=None):
    """x (B, T, H, D) copied into ``out`` (unit last stride) or a new contiguous tensor: by the RoPE kernel
    on CUDA when x has a unit last stride (a strided copy in PyTorch ran at half the bandwidth)."""
    if triton_enabled(x) and x.stride(-1) == 1:
        return _k("triton_rope").rope_apply(x, x, x, False, out, rotate=False)
    return x.contiguous() if out is None else out.copy_(x)


class _Rope(torch.autograd.Function):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (B or 1, T, D); v (B, T, Hv, D) or None rides along.
    Saves only cos and sin (shared by layers).

    With v, the backward writes dq, dk and dv as adjacent head blocks of one (B, T, Hq + Hk + Hv, D)
    tensor: when q, k, v are column blocks of one projection output (a stacked q/k/v matmul), the
    projection's backward finds its output gradient in one piece and runs one matmul, with no copy.
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        cos, sin = (cos, sin) if cos.stride(-1) == 1 and sin.stride() == cos.stride() else (cos.contiguous(), sin.contiguous())
        ctx.save_for_backward(cos, sin)
        ctx.with_v = v is not None
        out = (_rope(q, cos, sin, False), _rope(k, cos, sin, False))
        if v is not None:
            out += (v if v.is_contiguous() else _copy_heads(v),)
        return out

    @staticmethod
    def backward(ctx, dq, dk, dv=None):
        cos, sin = ctx.saved_tensors
        if not ctx.with_v:
            return _rope(dq, cos, sin, True), _rope(dk, cos, sin, True), None, None, None
        hq, hk = dq.shape[2], dk.shape[2]
        grads = dq.new_empty((*dq.shape[:2], hq + hk + dv.shape[2], dq.shape[3]))
        _rope(dq, cos, sin, True, grads[:, :, :hq])
        _rope(dk, cos, sin, True, grads[:, :, hq:hq + hk])
        _copy_heads(dv, grads[:, :, hq + hk:])
        return grads[:, :, :hq], grads[:, :, hq:hq + hk], grads[:, :, hq + hk:], None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor | None = None):
    """Rotary embedding of ``q`` (B, T, Hq, D) and ``k`` (B, T, Hk, D), token-major layout, with
    Hugging Face's ``rotate_half`` convention; ``cos``/``sin`` (B or 1, T, D). Returns contiguous
    (B, T, H, D) tensors.

    ``v`` (B, T, Hv, D), optional, is returned contiguous as a third output, unrotated; its gradient and
    q's and k's are then adjacent blocks of one tensor (see ``_Rope``).
    """
    return _Rope.apply(q, k, v, cos, sin)


# -- LoRA factors ---------------------------------------------------------------------------------------
def cast_into(dst: torch.Tensor, srcs, offsets, scales) -> torch.Tensor:
    """``dst[o:o + src.numel()] = src * scale`` in ``dst``'s dtype (fp32 product, one rounding) for each
    contiguous source at its element offset ``o`` in the flat contiguous ``dst``: one Triton launch on
    CUDA for up to 8 sources, a copy or ``torch.mul(out=)`` each elsewhere. Returns ``dst``."""
    wide = torch.float64 in (dst.dtype, *(t.dtype for t in srcs))  # the kernel multiplies in fp32
    if triton_enabled(dst) and not torch.compiler.is_compiling() and not wide:
        return _k("triton_cast").cast_into(dst, srcs, offsets, scales)
    for src, o, s in zip(srcs, offsets, scales):
        view = dst[o:o + src.numel()].view(src.shape)
        if s == 1.0:
            view.copy_(src)
        else:
            torch.mul(src, s, out=view)
    return dst


def add_many_(dsts, srcs) -> None:
    """``dst += src`` for each pair of same-shape tensors: one Triton launch per 8 pairs on CUDA where all
    are contiguous, the destinations fp32 and the sources fp32 or 16-bit (gradient buffers; the sum is
    ``_foreach_add_``'s, which gives each 65,536-element chunk one thread block), else ``_foreach_add_``."""
    if not dsts:
        return
    plain = all(d.is_contiguous() and s.is_contiguous() and d.shape == s.shape and d.dtype == torch.float32
                and s.dtype in (torch.float32, torch.bfloat16, torch.float16) for d, s in zip(dsts, srcs))
    if plain and triton_enabled(dsts[0]) and not torch.compiler.is_compiling():
        _k("triton_cast").add_many_(dsts, srcs)
    else:
        torch._foreach_add_(dsts, srcs)


# -- SwiGLU ---------------------------------------------------------------------------------------------
def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` without autograd (fp32 math, one rounding)."""
    if triton_enabled(g):
        return _k("triton_swiglu").swiglu_forward(g, u)
    gf = _wide(g)
    return (gf * torch.sigmoid(gf) * _wide(u)).to(g.dtype)


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """``(h, dg, du)`` given ``dh``: the recomputed ``silu(g) * u`` and the gradients (dg over dh's memory)."""
    if triton_enabled(g):
        return _k("triton_swiglu").swiglu_backward(dh, g, u)
    gf, uf, dhf = _wide(g), _wide(u), _wide(dh)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    du = (dhf * silu).to(u.dtype)
    dh.copy_(dhf * uf * sig * (1 + gf * (1 - sig)))
    return (silu * uf).to(g.dtype), dh, du


def _plus_low_rank(t, lr, transposed=False):
    """``t + h @ f.T`` (or ``h @ f`` if ``transposed``) in the wide dtype; ``lr = (h, f)`` or None."""
    t = _wide(t)
    if lr is None:
        return t
    h, f = _wide(lr[0]), _wide(lr[1])
    return t + (h @ f if transposed else h @ f.T)


def swiglu_lora_forward(g, u, lora_g=None, lora_u=None):
    """``silu(g + h_g (sB_g)^T) * (u + h_u (sB_u)^T)`` without autograd; the low-rank terms are added in
    the kernel, never written out. ``lora_*``: ``(h (N, r), sB (I, r))`` or None. g, u (N, I)."""
    if triton_enabled(g):
        return _k("triton_swiglu").swiglu_lora_forward(g, u, lora_g, lora_u)
    gf, uf = _plus_low_rank(g, lora_g), _plus_low_rank(u, lora_u)
    return (gf * torch.sigmoid(gf) * uf).to(g.dtype)


def swiglu_lora_backward(dh, g, u, lora_g=None, lora_u=None, lora_d=None, scales=(1.0, 1.0)):
    """Gradients of ``swiglu_lora_forward`` given ``dh`` (N, I) contiguous plus the down adapter's part
    ``lora_d = (g_d (N, r_d), A_d (r_d, I))`` (added as ``g_d @ A_d``): ``(dgu, dB_g, dB_u, dA_d)`` with
    ``dgu`` (N, 2I) ``[dg | du]``, new, and the adapter gradients that sum over the rows in fp32 (None
    without that adapter): ``dB_g = scales[0] dg^T h_g``, ``dB_u = scales[1] du^T h_u``, ``dA_d = g_d^T act``
    with ``act = silu(g) * u``, each from the 16-bit values (fp64 for fp64 inputs). ``dh`` is not changed."""
    if triton_enabled(g):
        return _k("triton_swiglu").swiglu_lora_backward(dh, g, u, lora_g, lora_u, lora_d, scales)
    gf, uf, dhf = _plus_low_rank(g, lora_g), _plus_low_rank(u, lora_u), _plus_low_rank(dh, lora_d, True)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    i = g.shape[1]
    dgu = torch.empty((g.shape[0], 2 * i), dtype=g.dtype, device=g.device)
    dgu[:, :i] = dhf * uf * sig * (1 + gf * (1 - sig))
    dgu[:, i:] = dhf * silu
    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
    grads = [None if lr is None else dgu[:, o:o + i].T.to(wide) @ lr[0].to(wide) * s
             for lr, o, s in ((lora_g, 0, scales[0]), (lora_u, i, scales[1]))]
    da_d = None if lora_d is None else lora_d[0].T.to(wide) @ (silu * uf).to(g.dtype).to(wide)
    return dgu, *grads, da_d


class _SwiGLU(torch.autograd.Function):
    """Saves g and u; recomputes ``h`` in backward rather than storing it."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        _, dg, du = swiglu_backward(dh.contiguous().clone(), g, u)  # clone: dg is written over it
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (SwiGLU's gate) with a recomputing backward."""
    return _SwiGLU.apply(g, u)


# -- linear + cross-entropy ----------------------------------------------------------------------------
def _ce_rows_ref_(z, labels, scale, ignore_index):
    zf = _wide(z)
    lse = torch.logsumexp(zf, -1)
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    loss = (lse - zf.gather(1, safe[:, None])[:, 0]).masked_fill(ignored, 0.0)
    p = torch.exp(zf - lse[:, None])
    p[torch.arange(z.shape[0], device=z.device), safe] -= 1.0
    z.copy_(p * (scale * (~ignored)[:, None]))
    return loss


def _rows_per_chunk(n, vocab, element_size, budget_bytes=1 << 30):
    rows = max(1, budget_bytes // max(1, vocab * element_size))
    return min(n, 1 << (rows.bit_length() - 1)) if rows < n else n


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, chunk by chunk over tokens.

    The forward also computes d(loss)/d(hidden) (N, d) (and d/d(weight) only if the head is trained)
    and saves just that; the logits live one chunk at a time, in the hidden dtype, never in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = (labels != ignore_index).sum()
        scale = (1.0 / valid.clamp(min=1).float()).reshape(1)
        dhidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = chunk_rows or _rows_per_chunk(n, vocab, hidden.element_size())
        w = weight.to(hidden.dtype)
        use_triton = triton_enabled(hidden)
        for i in range(0, n, rows):
            h = hidden[i:i + rows]
            z = h @ w.T  # (C, V) in the compute dtype
            if use_triton:
                loss = _k("triton_cross_entropy").cross_entropy_rows_(z, labels[i:i + rows], scale, ignore_index)
            else:
                loss = _ce_rows_ref_(z, labels[i:i + rows], scale, ignore_index)
            total += loss.sum()
            if dhidden is not None:
                torch.mm(z, w, out=dhidden[i:i + rows])
            if dweight is not None:
                dweight.addmm_(z.T.float(), h.float())
        ctx.save_for_backward(dhidden, dweight)
        return total * scale[0]

    @staticmethod
    def backward(ctx, dloss):
        dhidden, dweight = ctx.saved_tensors
        dh = dhidden * dloss.to(dhidden.dtype) if dhidden is not None else None
        dw = dweight * dloss if dweight is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` (never materialised whole) vs ``labels``.

    Args:
        hidden: (N, d) final hidden states, contiguous rows.
        weight: (V, d) output head weight; gets a gradient only if it requires one.
        labels: (N,) int64 targets; ``ignore_index`` rows are not counted.
        chunk_rows: tokens per chunk; default keeps a chunk's logits under 1 GiB.
    Returns:
        the scalar mean loss (fp32).
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the head matmul in autocast's dtype, as autocast would run it
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows)
