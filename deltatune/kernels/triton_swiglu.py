"""SwiGLU ``h = silu(g) * u`` (Shazeer 2020, arXiv:2002.05202) in Triton, with a backward that
recomputes ``h`` instead of storing it.

The backward reads ``g``, ``u`` and ``dh`` once and writes ``h`` (needed by the down projection's
adapter gradient), ``dg`` (over ``dh``, a temporary of the caller's backward) and ``du``. Imports triton: load through ``deltatune.kernels`` (lazily).
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DH, G, U, H, DU, n, BLOCK: tl.constexpr):
    # dg = dh * u * sig * (1 + g * (1 - sig)) written over DH,  du = dh * silu(g)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(H + offs, (silu * u).to(H.dtype.element_ty), mask=mask)
    tl.store(DH + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DH.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for contiguous ``g``, ``u`` of one shape; returns a new tensor."""
    h = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK, num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """Returns ``(h, dg, du)``: the recomputed ``silu(g) * u`` and the gradients; ``dg`` is ``dh``'s memory."""
    h, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dh, g, u, h, du, n, BLOCK=BLOCK, num_warps=4)
    return h, dh, du
