"""SwiGLU ``h = silu(g) * u`` (Shazeer 2020, arXiv:2002.05202) in Triton, with a backward that
recomputes ``h`` instead of storing it.

The plain backward reads ``g``, ``u`` and ``dh`` once and writes ``h``, ``dg`` (over ``dh``, a temporary
of the caller's backward) and ``du``. The LoRA MLP's backward (``swiglu_lora_backward``) writes only
``dg`` and ``du``: what the adapters need of ``h``, ``dg`` and ``du`` it sums on the way. Imports triton:
load through ``deltatune.kernels`` (lazily).
"""

import torch
import triton
import triton.language as tl

from deltatune.kernels.backend import interpreted

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
# the down projection's low-rank input gradient, dact = dact0 + g_d @ A_d, the same way, and sums dB_g,
# dB_u and dA_d over the rows in the same pass: no (N, I) tensor is read again for them, and the
# SwiGLU output is never written (on an 8B MLP at 4096 tokens, 329 us against 272 us for the kernel
# that wrote it plus ~100 us for the three skinny matmuls that read it, dg and du back; H200).
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32: 16-bit operands on the tensor cores, or exact fp32 products (``IEEE``: fp32
    operands, and the interpreter, whose dot misreads 16-bit floats)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _low_rank(acc, H, stride_h, SB, rows, cols, N, I, R: tl.constexpr, P: tl.constexpr, IEEE: tl.constexpr):
    """acc (BLOCK_N, BLOCK_I) fp32 plus H[rows, :R] @ SB^T[:, cols] (SB (I, R) row-major): one tensor-core
    product, R padded to P (>= 16, what tl.dot takes) with zeros. (R rank-one FMA updates on the CUDA
    cores instead measured 2-3x slower on an H100, and passing acc as the product's accumulator made no
    difference.)
    """
    k = tl.arange(0, P)
    h = tl.load(H + rows[:, None] * stride_h + k[None, :], mask=(rows < N)[:, None] & (k < R)[None, :], other=0.0)
    sb = tl.load(SB + cols[None, :] * R + k[:, None], mask=(k < R)[:, None] & (cols < I)[None, :], other=0.0)
    return acc + _dot(h, sb, IEEE)


@triton.jit
def _gate_up_tile(G, stride_g, U, stride_u, HG, HU, stride_h, SBG, SBU, rows, cols, mask, N, I, RG: tl.constexpr,
                  RU: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr, IEEE: tl.constexpr):
    """The (BLOCK_N, BLOCK_I) tiles of g and u in fp32, each with its adapter's low-rank term added."""
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RG > 0:
        g = _low_rank(g, HG, stride_h, SBG, rows, cols, N, I, RG, PG, IEEE)
    if RU > 0:
        u = _low_rank(u, HU, stride_h, SBU, rows, cols, N, I, RU, PU, IEEE)
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
                     GD, stride_gd, AD, PART, N, I, rows_per_program, scale_g, scale_u,
                     RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr,
                     PD: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    # One program: a column block of BLOCK_I over rows_per_program rows, BLOCK_N at a time. Besides dg and
    # du it sums the adapters' gradients that reduce over the rows, so dg, du and act are never read back:
    # dB_g = s_g dg^T h_g, dB_u = s_u du^T h_u (BLOCK_I, r) and dA_d = g_d^T act (r_d, BLOCK_I), each
    # from the 16-bit values a separate matmul would read. Per-program partial sums go to PART
    # (programs along the rows, I r_g + I r_u + r_d I), summed by the caller.
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cmask = cols < I
    split = tl.program_id(1).to(tl.int64)
    kg, ku, kd = tl.arange(0, PG), tl.arange(0, PU), tl.arange(0, PD)
    # the factors' column tiles, loaded once: (s B_g)^T, (s B_u)^T (P, BLOCK_I) and A_d (PD, BLOCK_I)
    sbg = tl.load(SBG + cols[None, :] * RG + kg[:, None], mask=(kg < RG)[:, None] & cmask[None, :], other=0.0)
    sbu = tl.load(SBU + cols[None, :] * RU + ku[:, None], mask=(ku < RU)[:, None] & cmask[None, :], other=0.0)
    ad = tl.load(AD + kd[:, None] * I + cols[None, :], mask=(kd < RD)[:, None] & cmask[None, :], other=0.0)
    acc_g = tl.zeros((BLOCK_I, PG), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_I, PU), dtype=tl.float32)
    acc_d = tl.zeros((PD, BLOCK_I), dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_N):
        rows = split * rows_per_program + start + tl.arange(0, BLOCK_N)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RD > 0:  # the down adapter's part of the SwiGLU output gradient: + g_d A_d
            gd = tl.load(GD + rows[:, None] * stride_gd + kd[None, :], mask=rmask[:, None] & (kd < RD)[None, :],
                         other=0.0)
            dh += _dot(gd, ad, IEEE)
        if RG > 0:
            hg = tl.load(HG + rows[:, None] * stride_h + kg[None, :], mask=rmask[:, None] & (kg < RG)[None, :],
                         other=0.0)
            g += _dot(hg, sbg, IEEE)
        if RU > 0:
            hu = tl.load(HU + rows[:, None] * stride_h + ku[None, :], mask=rmask[:, None] & (ku < RU)[None, :],
                         other=0.0)
            u += _dot(hu, sbu, IEEE)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty)
        du = (dh * silu).to(DU.dtype.element_ty)
        offs = rows[:, None] * stride_dgu + cols[None, :]
        tl.store(DG + offs, dg, mask=mask)
        tl.store(DU + offs, du, mask=mask)
        if RG > 0:
            acc_g += _dot(tl.trans(dg), hg, IEEE)
        if RU > 0:
            acc_u += _dot(tl.trans(du), hu, IEEE)
        if RD > 0:
            acc_d += _dot(tl.trans(gd), (silu * u).to(DG.dtype.element_ty), IEEE)
    part = PART + split * (I * (RG + RU + RD))
    if RG > 0:
        tl.store(part + cols[:, None] * RG + kg[None, :], acc_g * scale_g, mask=cmask[:, None] & (kg < RG)[None, :])
    if RU > 0:
        tl.store(part + I * RG + cols[:, None] * RU + ku[None, :], acc_u * scale_u,
                 mask=cmask[:, None] & (ku < RU)[None, :])
    if RD > 0:
        tl.store(part + I * (RG + RU) + kd[:, None] * I + cols[None, :], acc_d, mask=(kd < RD)[:, None] & cmask[None, :])


# (BLOCK_N, BLOCK_I, warps): the fastest of a sweep on an H100 at N=4096, I=14336, r=16 (bench/bench_swiglu.py)
LORA_FWD_TILE = (32, 128, 4)
LORA_BWD_TILE = (64, 64, 4, 2)  # (rows per step, columns, warps, pipeline stages) of the backward's row loop
PROGRAMS_PER_SM = 1  # the sweep on an H200: 1-2 within 3%, 4 and more slower (bench/bench_swiglu.py)


def _ieee(t) -> bool:
    return t.dtype == torch.float32 or interpreted()


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


def swiglu_lora_backward(dh, g, u, lora_g=None, lora_u=None, lora_d=None, scales=(1.0, 1.0)):
    """Gradients of ``swiglu_lora_forward``, given ``dh`` (N, I) contiguous, the gradient of its output less
    the down adapter's part: ``lora_d = (g_d (N, r_d), A_d (r_d, I))`` adds ``g_d @ A_d`` to it first.

    Returns ``(dgu, dB_g, dB_u, dA_d)``: ``dgu`` (N, 2I) is ``[dg | du]`` (so the gate/up input gradient
    can be one matmul against ``[W_g; W_u]``); ``dB_g = scales[0] dg^T h_g`` and ``dB_u = scales[1] du^T h_u``
    (I, r) and ``dA_d = g_d^T act`` (r_d, I), with ``act = silu(g) * u`` the MLP's SwiGLU output, are fp32
    (None without that adapter), summed in the kernel from the 16-bit dg, du and act it computes. ``dh``
    is not changed.
    """
    n, i = g.shape
    dgu = torch.empty((n, 2 * i), dtype=g.dtype, device=g.device)
    dg, du = dgu[:, :i], dgu[:, i:]
    (hg, hu, stride_h, sbg, sbu), ranks = _gate_up_args(g, lora_g, lora_u)
    gd, ad, rd, pd = _rank(lora_d)
    gd, ad = (gd, ad) if gd is not None else (g, g)
    bn, bi, warps, stages = LORA_BWD_TILE
    col_blocks, row_blocks = triton.cdiv(i, bi), triton.cdiv(n, bn)
    splits = min(row_blocks, max(1, triton.cdiv(_programs(g.device), col_blocks)))
    rows_per_program = triton.cdiv(row_blocks, splits) * bn
    splits = triton.cdiv(n, rows_per_program)
    rg, ru = ranks["RG"], ranks["RU"]
    part = torch.empty((splits, i * (rg + ru + rd)), dtype=torch.float32, device=g.device)
    _swiglu_lora_bwd[(col_blocks, splits)](
        dh, dh.stride(0), g, g.stride(0), u, u.stride(0), dg, du, dgu.stride(0), hg, hu, stride_h, sbg, sbu, gd,
        gd.stride(0), ad, part, n, i, rows_per_program, float(scales[0]), float(scales[1]), **ranks, RD=rd, PD=pd,
        IEEE=_ieee(g), BLOCK_N=bn, BLOCK_I=bi, num_warps=warps, num_stages=stages)
    sums = part.sum(0) if splits > 1 else part[0]
    db_g = sums[:i * rg].view(i, rg) if rg else None
    db_u = sums[i * rg:i * (rg + ru)].view(i, ru) if ru else None
    da_d = sums[i * (rg + ru):].view(rd, i) if rd else None
    return dgu, db_g, db_u, da_d


def _programs(device) -> int:
    """How many backward programs to aim for: a few per multiprocessor (programs loop over rows)."""
    if device.type != "cuda":
        return 4
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
