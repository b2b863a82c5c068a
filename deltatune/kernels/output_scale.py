"""Per-output-feature scales of the fused LoRA projections (DoRA on the fused path, ``kernels/lora.py``).

A projection ``(W, bias, adapters, f)`` computes ``y = f ⊙ z + b`` with ``z = x W^T + Σ s h B^T`` the fused
node's output and f (out,) a differentiable scale (DoRA's ``m / ||W + s·BA||_c``, the norm detached, so
f's gradient reaches m only). The node runs the projection without its bias and:

* ``ScaleOutput`` scales its output: saves z; backward ``dz = f ⊙ dy`` (into the node's backward, which
  then gives dA, dB, dx as for LoRA) and ``df = Σ_tokens dy ⊙ z`` (fp32 sums), ``db = Σ_tokens dy``;
* ``ScaledSwiGLU`` is the gated MLP's ``silu(g) * u`` with g, u scaled inside it: it saves z_g and z_u
  (as the LoRA MLP node saves its base gate and up outputs) and recomputes the scaled values and the
  SwiGLU in backward.

Elementwise over (N, out): a small part of a projection's time next to its matmuls. On a GPU the
backwards and the scaled SwiGLU are Triton kernels (``triton_dora.py``) that read each (N, out) input
once and sum df on the way; elsewhere (and for float64) the same math in PyTorch.
"""

from __future__ import annotations

import torch

from deltatune.kernels.backend import load, triton_enabled
from deltatune.kernels.functional import swiglu_backward, swiglu_forward

__all__ = ["ScaleOutput", "ScaledSwiGLU", "split_output_scales"]


def split_output_scales(projections):
    """Projections for the nodes (a scaled one without its bias) and per projection ``(f, bias)`` or None."""
    inner, outer = [], []
    for p in projections:
        if len(p) > 3 and p[3] is not None:
            inner.append((p[0], None, p[2]))
            outer.append((p[3], p[1]))
        else:
            inner.append(tuple(p[:3]))
            outer.append(None)
    return inner, outer


def _scaled(z, f, bias):
    """``f ⊙ z + b`` in z's dtype, as ``z + z (f - 1)``: f near 1 (DoRA's m starts at the norm), so rounding
    ``f - 1`` to z's dtype costs far less than rounding f."""
    y = torch.addcmul(z, z, (f - 1).to(z.dtype))
    return y if bias is None else y.add_(bias.to(z.dtype))


def _fast(t: torch.Tensor) -> bool:
    """Whether the Triton kernels (``triton_dora.py``) take ``t``: where ``triton_enabled``, 16/32-bit floats."""
    return t.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_enabled(t)


def _kernels():
    return load("deltatune.kernels.triton_dora")


def _scale_grads(dy, z, f, bias_dtype, needs):
    """Gradients of ``_scaled`` for (z, f, bias): ``f ⊙ dy``, ``Σ_tokens dy ⊙ z`` (fp32 sums), ``Σ_tokens dy``."""
    n = z.shape[-1]
    db = dy.reshape(-1, n).sum(0, dtype=torch.float32).to(bias_dtype) if needs[2] else None
    if needs[1] and _fast(dy):  # one pass: dz and the partial sums of df
        dz, df = _kernels().scale_backward(dy, z, f)
        return (dz if needs[0] else None), df.to(f.dtype), db
    dz = torch.addcmul(dy, dy, (f - 1).to(dy.dtype)) if needs[0] else None
    df = torch.sum(dy.reshape(-1, n) * z.reshape(-1, n), 0, dtype=torch.promote_types(f.dtype, torch.float32)) \
        if needs[1] else None
    return dz, None if df is None else df.to(f.dtype), db


class ScaleOutput(torch.autograd.Function):
    """``y = f ⊙ z + b`` over z's last dimension (f, b of shape (out,)); saves z and f."""

    @staticmethod
    def forward(ctx, z, f, bias):
        ctx.save_for_backward(z, f)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _scaled(z, f, bias)

    @staticmethod
    def backward(ctx, dy):
        z, f = ctx.saved_tensors
        return _scale_grads(dy, z, f, ctx.bias_dtype, ctx.needs_input_grad)


class ScaledSwiGLU(torch.autograd.Function):
    """``silu(f_g ⊙ z_g + b_g) * (f_u ⊙ z_u + b_u)`` (..., I), each scale optional (None: z as it is, and no
    b); saves z_g and z_u (as the LoRA MLP node saves its gate and up outputs) and recomputes the rest.
    On a GPU one Triton kernel each way (``triton_dora.py``), which also sums df_g, df_u."""

    @staticmethod
    def forward(ctx, zg, zu, fg, bg, fu, bu):
        ctx.save_for_backward(zg, zu, fg, bg, fu, bu)
        if _fast(zg):
            i = zg.shape[-1]
            flat = [t.reshape(-1, i) for t in (zg, zu)]
            flat = [t if t.stride(1) == 1 else t.contiguous() for t in flat]
            return _kernels().scaled_swiglu_forward(*flat, fg, bg, fu, bu).view(zg.shape)
        g = zg if fg is None else _scaled(zg, fg, bg)
        u = zu if fu is None else _scaled(zu, fu, bu)
        return swiglu_forward(g.contiguous(), u.contiguous())

    @staticmethod
    def backward(ctx, dh):
        zg, zu, fg, bg, fu, bu = ctx.saved_tensors
        need = ctx.needs_input_grad  # zg, zu, fg, bg, fu, bu
        if _fast(zg) and not need[3] and not need[5]:  # (no bias gradients: frozen biases, as always here)
            i = zg.shape[-1]
            flat = [t.reshape(-1, i) for t in (dh, zg, zu)]
            flat = [t if t.stride(1) == 1 else t.contiguous() for t in flat]
            dzg, dzu, sg, su = _kernels().scaled_swiglu_backward(*flat, fg, bg, fu, bu)
            return (dzg.view(zg.shape), dzu.view(zu.shape), None if fg is None else sg.to(fg.dtype), None,
                    None if fu is None else su.to(fu.dtype), None)
        g = zg if fg is None else _scaled(zg, fg, bg)
        u = zu if fu is None else _scaled(zu, fu, bu)
        _, dg, du = swiglu_backward(dh.contiguous().clone(), g.contiguous(), u.contiguous())  # dg over the clone
        del g, u
        grads = []
        for dz, z, f, b, needs in ((dg, zg, fg, bg, (need[0], need[2], need[3])),
                                   (du, zu, fu, bu, (need[1], need[4], need[5]))):
            if f is None:
                grads.append((dz, None, None))
                continue
            grads.append(_scale_grads(dz, z, f, None if b is None else b.dtype, needs))
        (dzg, dfg, dbg), (dzu, dfu, dbu) = grads
        return dzg, dzu, dfg, dbg, dfu, dbu
