"""DoRA's output scales on the fused path in Triton (``kernels/output_scale.py``): the backward of
``y = f ⊙ z + b`` and the gated MLP's ``silu(f_g ⊙ z_g + b_g) * (f_u ⊙ z_u + b_u)`` forward and backward.

Each reads its (N, C) inputs once and writes its outputs once, in fp32 arithmetic rounded once; the
backwards also sum ``df = Σ_rows dy ⊙ z`` (fp32) on the way, so no (N, C) product is written and read
back for it: a program owns a column block over a range of rows and stores its partial sums, which the
caller adds (as ``triton_swiglu.py`` sums the adapters' gradients). Imports triton: load through
``deltatune.kernels.backend``.
"""

import torch
import triton
import triton.language as tl

TILE = (32, 128, 4)  # (rows per step, columns, warps): elementwise streaming, 256-byte bf16 rows
PROGRAMS_PER_SM = 4


@triton.jit
def _tile(P, stride, rows, cols, mask):
    return tl.load(P + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scaled(z, F, B, cols, cmask, HAS_F: tl.constexpr, HAS_B: tl.constexpr):
    """``f ⊙ z + b`` of an fp32 tile (f, b per column; either absent)."""
    if HAS_F:
        z = z * tl.load(F + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        z = z + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _scale_bwd(DY, stride_dy, Z, stride_z, F, DZ, stride_dz, PART, N, C, rows_per_program,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # dz = f dy, and this program's part of df = sum over rows of dy z
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    split = tl.program_id(1).to(tl.int64)
    f = tl.load(F + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_N):
        rows = split * rows_per_program + start + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        dy = _tile(DY, stride_dy, rows, cols, mask)
        z = _tile(Z, stride_z, rows, cols, mask)
        tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], (dy * f[None, :]).to(DZ.dtype.element_ty), mask=mask)
        acc += tl.sum(dy * z, axis=0)
    tl.store(PART + split * C + cols, acc, mask=cmask)


@triton.jit
def _swiglu_fwd(ZG, stride_zg, ZU, stride_zu, FG, BG, FU, BU, H, N, I,
                HAS_FG: tl.constexpr, HAS_BG: tl.constexpr, HAS_FU: tl.constexpr, HAS_BU: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < I
    mask = (rows < N)[:, None] & cmask[None, :]
    g = _scaled(_tile(ZG, stride_zg, rows, cols, mask), FG, BG, cols, cmask, HAS_FG, HAS_BG)
    u = _scaled(_tile(ZU, stride_zu, rows, cols, mask), FU, BU, cols, cmask, HAS_FU, HAS_BU)
    tl.store(H + rows[:, None] * I + cols[None, :], (g * tl.sigmoid(g) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DH, stride_dh, ZG, stride_zg, ZU, stride_zu, FG, BG, FU, BU, DZG, DZU, PART, N, I, rows_per_program,
                HAS_FG: tl.constexpr, HAS_BG: tl.constexpr, HAS_FU: tl.constexpr, HAS_BU: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # dg = dh u sig (1 + g (1 - sig)), du = dh silu(g); dz_g = f_g dg, dz_u = f_u du (each f absent: 1);
    # partial sums of df_g = sum dg z_g and df_u = sum du z_u to PART (programs along the rows, 2 I)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < I
    split = tl.program_id(1).to(tl.int64)
    acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_N):
        rows = split * rows_per_program + start + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        dh = _tile(DH, stride_dh, rows, cols, mask)
        zg = _tile(ZG, stride_zg, rows, cols, mask)
        zu = _tile(ZU, stride_zu, rows, cols, mask)
        g = _scaled(zg, FG, BG, cols, cmask, HAS_FG, HAS_BG)
        u = _scaled(zu, FU, BU, cols, cmask, HAS_FU, HAS_BU)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * silu
        acc_g += tl.sum(dg * zg, axis=0)
        acc_u += tl.sum(du * zu, axis=0)
        offs = rows[:, None] * I + cols[None, :]
        tl.store(DZG + offs, _scaled(dg, FG, BG, cols, cmask, HAS_FG, False).to(DZG.dtype.element_ty), mask=mask)
        tl.store(DZU + offs, _scaled(du, FU, BU, cols, cmask, HAS_FU, False).to(DZU.dtype.element_ty), mask=mask)
    tl.store(PART + split * 2 * I + cols, acc_g, mask=cmask)
    tl.store(PART + split * 2 * I + I + cols, acc_u, mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (N, C) with unit column stride (a view where it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _splits(n: int, cols: int, device) -> tuple[int, int]:
    """(programs along the rows, rows per program) for column blocks of ``cols`` columns over n rows."""
    bn, bc, _ = TILE
    col_blocks, row_blocks = triton.cdiv(cols, bc), triton.cdiv(n, bn)
    programs = PROGRAMS_PER_SM * (torch.cuda.get_device_properties(device).multi_processor_count
                                  if device.type == "cuda" else 1)
    splits = min(row_blocks, max(1, triton.cdiv(programs, col_blocks)))
    rows_per_program = triton.cdiv(row_blocks, splits) * bn
    return triton.cdiv(n, rows_per_program), rows_per_program


def scale_backward(dy: torch.Tensor, z: torch.Tensor, f: torch.Tensor):
    """``(f ⊙ dy, Σ_rows dy ⊙ z)`` for dy, z (..., C) and f (C,): dz in dy's dtype and shape, df in fp32 (C,)."""
    dy2, z2 = _rows(dy), _rows(z)
    n, c = z2.shape
    dz = torch.empty((n, c), dtype=dy.dtype, device=dy.device)
    bn, bc, warps = TILE
    splits, rows_per_program = _splits(n, c, dy.device)
    part = torch.empty((splits, c), dtype=torch.float32, device=dy.device)
    _scale_bwd[(triton.cdiv(c, bc), splits)](dy2, dy2.stride(0), z2, z2.stride(0), f.contiguous(), dz, dz.stride(0),
                                            part, n, c, rows_per_program, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return dz.view(dy.shape), part.sum(0) if splits > 1 else part[0]


def _vectors(zg, fg, bg, fu, bu):
    """The kernels' f/b arguments (zg standing in for absent ones, never read) and their flags."""
    flags = dict(HAS_FG=fg is not None, HAS_BG=bg is not None, HAS_FU=fu is not None, HAS_BU=bu is not None)
    return [t.contiguous() if t is not None else zg for t in (fg, bg, fu, bu)], flags


def scaled_swiglu_forward(zg, zu, fg, bg, fu, bu) -> torch.Tensor:
    """``silu(f_g ⊙ z_g + b_g) * (f_u ⊙ z_u + b_u)`` for z_g, z_u (N, I) with unit column stride; f, b (I,) or
    None. Returns a new contiguous (N, I) tensor in z_g's dtype."""
    n, i = zg.shape
    h = torch.empty((n, i), dtype=zg.dtype, device=zg.device)
    vectors, flags = _vectors(zg, fg, bg, fu, bu)
    bn, bc, warps = TILE
    _swiglu_fwd[(triton.cdiv(n, bn), triton.cdiv(i, bc))](zg, zg.stride(0), zu, zu.stride(0), *vectors, h, n, i,
                                                          **flags, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps)
    return h


def scaled_swiglu_backward(dh, zg, zu, fg, bg, fu, bu):
    """Gradients of ``scaled_swiglu_forward`` given dh (N, I): ``(dz_g, dz_u, df_g, df_u)``, the first two new
    (N, I) tensors, the sums ``Σ_rows dg ⊙ z_g`` and ``Σ_rows du ⊙ z_u`` (I,) in fp32 (where f is absent too)."""
    n, i = zg.shape
    dh = dh if dh.stride(1) == 1 else dh.contiguous()
    dzg = torch.empty((n, i), dtype=zg.dtype, device=zg.device)
    dzu = torch.empty_like(dzg)
    vectors, flags = _vectors(zg, fg, bg, fu, bu)
    bn, bc, warps = TILE
    splits, rows_per_program = _splits(n, i, zg.device)
    part = torch.empty((splits, 2 * i), dtype=torch.float32, device=zg.device)
    _swiglu_bwd[(triton.cdiv(i, bc), splits)](dh, dh.stride(0), zg, zg.stride(0), zu, zu.stride(0), *vectors, dzg, dzu,
                                             part, n, i, rows_per_program, **flags, BLOCK_N=bn, BLOCK_C=bc,
                                             num_warps=warps)
    sums = part.sum(0) if splits > 1 else part[0]
    return dzg, dzu, sums[:i], sums[i:]
