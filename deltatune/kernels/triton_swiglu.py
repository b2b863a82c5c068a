"""SwiGLU ``h = silu(g) * u`` (Shazeer 2020, arXiv:2002.05202) in Triton, with a backward that
recomputes ``h`` instead of storing it.

The backward reads ``g``, ``u`` and ``dh`` once and writes ``h`` (needed by the down projection's
adapter gradient), ``dg`` (over ``dh``, a temporary of the caller's backward) and ``du``. Imports triton: load through ``deltatune.kernels`` (lazily).
"""

import os

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


# -- SwiGLU with the gate/up adapters' low-rank terms added inside (the LoRA MLP) -------------------------
# The base matmuls write g0 = x W_g^T and u0 = x W_u^T only; the kernels add g = g0 + h_g @ (s B_g)^T and
# u = u0 + h_u @ (s B_u)^T tile by tile (a (BLOCK_N, r) x (r, BLOCK_I) tensor-core product, r padded to
# 16), so the (N, I) low-rank terms are never written to memory and read back. The backward also adds
# the down projection's low-rank input gradient, dact = dact0 + g_d @ A_d, the same way.
@triton.jit
def _low_rank(acc, H, stride_h, SB, rows, cols, N, I, R: tl.constexpr, P: tl.constexpr, TRANSPOSED: tl.constexpr,
              IEEE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_I) fp32 plus H[rows, :R] @ SB^T[:, cols] (SB (I, R) row-major), or plus
    H[rows, :R] @ SB[:, cols] if TRANSPOSED (SB (R, I) row-major): one tensor-core product, R padded to P
    (>= 16, what tl.dot takes) with zeros. (R rank-one FMA updates on the CUDA cores instead measured 2-3x
    slower on an H100, and passing acc as the product's accumulator made no difference.)
    """
    k = tl.arange(0, P)
    h = tl.load(H + rows[:, None] * stride_h + k[None, :], mask=(rows < N)[:, None] & (k < R)[None, :], other=0.0)
    if TRANSPOSED:
        sb = tl.load(SB + k[:, None] * I + cols[None, :], mask=(k < R)[:, None] & (cols < I)[None, :], other=0.0)
    else:
        sb = tl.load(SB + cols[None, :] * R + k[:, None], mask=(k < R)[:, None] & (cols < I)[None, :], other=0.0)
    if IEEE:  # fp32 operands (and the interpreter, whose dot misreads 16-bit floats): exact fp32 products
        return acc + tl.dot(h.to(tl.float32), sb.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(h, sb)  # 16-bit operands on the tensor cores, fp32 accumulation


@triton.jit
def _gate_up_tile(G, stride_g, U, stride_u, HG, HU, stride_h, SBG, SBU, rows, cols, mask, N, I, RG: tl.constexpr,
                  RU: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr, IEEE: tl.constexpr):
    """The (BLOCK_N, BLOCK_I) tiles of g and u in fp32, each with its adapter's low-rank term added."""
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RG > 0:
        g = _low_rank(g, HG, stride_h, SBG, rows, cols, N, I, RG, PG, False, IEEE)
    if RU > 0:
        u = _low_rank(u, HU, stride_h, SBU, rows, cols, N, I, RU, PU, False, IEEE)
    return g, u


@triton.jit
def _swiglu_lora_fwd(G, stride_g, U, stride_u, H, stride_hout, HG, HU, stride_h, SBG, SBU, N, I,
                     RG: tl.constexpr, RU: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    g, u = _gate_up_tile(G, stride_g, U, stride_u, HG, HU, stride_h, SBG, SBU, rows, cols, mask, N, I, RG, RU, PG, PU,
                         IEEE)
    h = g * tl.sigmoid(g) * u
    tl.store(H + rows[:, None] * stride_hout + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_lora_bwd(DH, stride_dh, G, stride_g, U, stride_u, DG, DU, stride_dgu, HG, HU, stride_h, SBG, SBU,
                     GD, stride_gd, AD, N, I, RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr,
                     PG: tl.constexpr, PU: tl.constexpr, PD: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    # act = silu(g) * u is written over DH (each program reads its tile before writing it)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RD > 0:
        dh = _low_rank(dh, GD, stride_gd, AD, rows, cols, N, I, RD, PD, True, IEEE)
    g, u = _gate_up_tile(G, stride_g, U, stride_u, HG, HU, stride_h, SBG, SBU, rows, cols, mask, N, I, RG, RU, PG, PU,
                         IEEE)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DH + rows[:, None] * stride_dh + cols[None, :], (silu * u).to(DH.dtype.element_ty), mask=mask)
    offs = rows[:, None] * stride_dgu + cols[None, :]
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)


# (BLOCK_N, BLOCK_I, warps): the fastest of a sweep on an H100 at N=4096, I=14336, r=16 (bench/bench_swiglu.py)
LORA_FWD_TILE = (32, 128, 4)
LORA_BWD_TILE = (16, 128, 4)


def _ieee(t) -> bool:
    return t.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _rank(lr):
    """(h (N, r) with unit column stride, factor, r, r padded for tl.dot) or dummies for no low-rank term."""
    if lr is None:
        return None, None, 0, 16
    h, f = lr
    r = h.shape[1]
    return h, f.contiguous(), r, max(16, triton.next_power_of_2(r))


def _gate_up_args(g, lora_g, lora_u):
    """Kernel arguments for the gate/up low-rank terms: ``(h_g, h_u, h row stride, sB_g, sB_u)`` (g itself
    standing in for absent ones, never read) and the rank constexprs."""
    hg, sbg, rg, pg = _rank(lora_g)
    hu, sbu, ru, pu = _rank(lora_u)
    base = hg if hg is not None else hu
    stride_h = base.stride(0) if base is not None else 0
    hg, sbg = (hg, sbg) if hg is not None else (g, g)
    hu, sbu = (hu, sbu) if hu is not None else (g, g)
    return (hg, hu, stride_h, sbg, sbu), {"RG": rg, "RU": ru, "PG": pg, "PU": pu}


def swiglu_lora_forward(g, u, lora_g=None, lora_u=None):
    """``silu(g + h_g (sB_g)^T) * (u + h_u (sB_u)^T)`` (N, I); g, u with unit column stride.

    ``lora_g``/``lora_u``: ``(h (N, r), sB (I, r))`` or None; both h must be views of one (N, R) tensor
    (they share its row stride). Returns a new contiguous (N, I) tensor.
    """
    n, i = g.shape
    out = torch.empty((n, i), dtype=g.dtype, device=g.device)
    (hg, hu, stride_h, sbg, sbu), ranks = _gate_up_args(g, lora_g, lora_u)
    bn, bi, warps = LORA_FWD_TILE
    grid = (triton.cdiv(n, bn), triton.cdiv(i, bi))
    _swiglu_lora_fwd[grid](g, g.stride(0), u, u.stride(0), out, out.stride(0), hg, hu, stride_h, sbg, sbu, n, i,
                           **ranks, IEEE=_ieee(g), BLOCK_N=bn, BLOCK_I=bi, num_warps=warps)
    return out


def swiglu_lora_backward(dh, g, u, lora_g=None, lora_u=None, lora_d=None):
    """``(act, dgu)`` for ``swiglu_lora_forward``, given ``dh`` (N, I) contiguous, the gradient of its
    output less the down adapter's part: ``lora_d = (g_d (N, r_d), A_d (r_d, I))`` adds ``g_d @ A_d``
    to it first. ``act`` is written over ``dh``; ``dgu`` (N, 2I) is ``[dg | du]`` (so the gate/up input
    gradient can be one matmul against ``[W_g; W_u]``).
    """
    n, i = g.shape
    dgu = torch.empty((n, 2 * i), dtype=g.dtype, device=g.device)
    dg, du = dgu[:, :i], dgu[:, i:]
    (hg, hu, stride_h, sbg, sbu), ranks = _gate_up_args(g, lora_g, lora_u)
    gd, ad, rd, pd = _rank(lora_d)
    gd, ad = (gd, ad) if gd is not None else (g, g)
    bn, bi, warps = LORA_BWD_TILE
    grid = (triton.cdiv(n, bn), triton.cdiv(i, bi))
    _swiglu_lora_bwd[grid](dh, dh.stride(0), g, g.stride(0), u, u.stride(0), dg, du, dgu.stride(0), hg, hu, stride_h,
                           sbg, sbu, gd, gd.stride(0), ad, n, i, **ranks, RD=rd, PD=pd, IEEE=_ieee(g), BLOCK_N=bn,
                           BLOCK_I=bi, num_warps=warps)
    return dh, dgu
