"""Per-output-feature scales of the fused LoRA projections (DoRA on the fused path, ``kernels/lora.py``).

A projection ``(W, bias, adapters, f)`` computes ``y = f ⊙ z + b`` with ``z = x W^T + Σ s h B^T`` the fused
node's output and f (out,) a differentiable scale (DoRA's ``m / ||W + s·BA||_c``, the norm detached, so
f's gradient reaches m only). The node runs the projection without its bias and:

* ``ScaleOutput`` scales its output: saves z; backward ``dz = f ⊙ dy`` (into the node's backward, which
  then gives dA, dB, dx as for LoRA) and ``df = Σ_tokens dy ⊙ z`` (fp32 sums), ``db = Σ_tokens dy``;
* ``ScaledSwiGLU`` is the gated MLP's ``silu(g) * u`` with g, u scaled inside it: it saves z_g and z_u
  (as the LoRA MLP node saves its base gate and up outputs) and recomputes the scaled values and the
  SwiGLU in backward (``swiglu_forward``/``swiglu_backward``: the Triton kernels on a GPU).

Elementwise over (N, out): a small part of a projection's time next to its matmuls.
"""

from __future__ import annotations

import torch

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


def _scale_grads(dy, z, f, bias_dtype, needs):
    """Gradients of ``_scaled`` for (z, f, bias): ``f ⊙ dy``, ``Σ_tokens dy ⊙ z`` (fp32 sums), ``Σ_tokens dy``."""
    n = z.shape[-1]
    dz = torch.addcmul(dy, dy, (f - 1).to(dy.dtype)) if needs[0] else None
    df = torch.sum(dy.reshape(-1, n) * z.reshape(-1, n), 0, dtype=torch.promote_types(f.dtype, torch.float32)) \
        if needs[1] else None
    db = dy.reshape(-1, n).sum(0, dtype=torch.float32).to(bias_dtype) if needs[2] else None
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
    """``silu(f_g ⊙ z_g + b_g) * (f_u ⊙ z_u + b_u)``, each scale optional (None: z as it is); saves z_g and z_u
    (2 x (N, I), as the LoRA MLP node saves its gate and up outputs) and recomputes the scaled values."""

    @staticmethod
    def forward(ctx, zg, zu, fg, bg, fu, bu):
        zg, zu = zg.contiguous(), zu.contiguous()
        ctx.save_for_backward(zg, zu, fg, bg, fu, bu)
        g = zg if fg is None else _scaled(zg, fg, bg)
        u = zu if fu is None else _scaled(zu, fu, bu)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        zg, zu, fg, bg, fu, bu = ctx.saved_tensors
        g = zg if fg is None else _scaled(zg, fg, bg)
        u = zu if fu is None else _scaled(zu, fu, bu)
        _, dg, du = swiglu_backward(dh.contiguous().clone(), g, u)  # clone: dg is written over it
        del g, u
        need = ctx.needs_input_grad  # zg, zu, fg, bg, fu, bu
        grads = []
        for dz, z, f, b, needs in ((dg, zg, fg, bg, (need[0], need[2], need[3])),
                                   (du, zu, fu, bu, (need[1], need[4], need[5]))):
            if f is None:
                grads.append((dz, None, None))
                continue
            grads.append(_scale_grads(dz, z, f, None if b is None else b.dtype, needs))
        (dzg, dfg, dbg), (dzu, dfu, dbu) = grads
        return dzg, dzu, dfg, dbg, dfu, dbu
