"""Mixed-adapter LoRA kernels: each token its own adapter slot, ``y[t] += scale_s · B_s (A_s x[t])``.

Two shapes of work:

* **SGMV** (segmented, Punica's "shrink" and "expand", Chen et al. 2023, arXiv:2310.18547), in two passes
  through an fp32 buffer ``h`` (SPLIT, N, R) (position ``p`` of ``order`` holds token ``order[p]``'s
  ``A_s x``): tokens sorted by slot, cut into tiles of at most BLOCK_M tokens of one slot; a tile multiplies
  its tokens by its slot's A (a (BLOCK_M, BLOCK_K) x (BLOCK_K, R) tensor-core product, K looped) and then
  ``h`` by B, added into ``y`` tile by tile. For prefill: long segments, each slot's weights read once a tile.
  The shrink splits K (split-K, deterministic: no atomics): program (tile, s) writes the partial product of
  K range s into ``h[s]``, and each expand program sums a tile's SPLIT partials in fp32, in split order, as
  it loads them, then rounds h to B's dtype as before. Long prefill segments give few tiles (8192 tokens in
  tiles of 128: 64 programs on an H200's 132 multiprocessors), each streaming all of K, so the shrink alone
  was latency-bound; ``shrink_split`` picks SPLIT (a power of two, >= 1.5 programs a multiprocessor, >= 2
  blocks of K a split) and ``DELTATUNE_SGMV_SPLIT`` (a positive integer; 1: the one-pass shrink) forces it,
  for A/B runs. An expand program covers ``expand_tiles`` output blocks, so it loads the partials once for
  all of them.
* **BGMV** (gathered, per token), one launch: a program per (token, run of output blocks) reads its
  token's slot from ``slots`` (T,), computes the rank-R shrink ``A_s x`` in registers (every program of a
  token recomputes it: R x in multiply-adds, cheap at R <= 64) and adds ``B_s h`` to its outputs. No
  sorting, no buffer, no host work per call beyond the launch (``Bgmv`` checks shapes once per layer), and
  a grid fixed by the token count: what a CUDA graph of a decode step needs. Tokens of slot -1, and slots
  of rank 0 on this layer (``ranks``, on the device), have every load and store masked off; a slot reads
  only its own rank, not the padding. For decode: one token per sequence, many distinct adapters. Eager
  decode runs this one launch (a launch costs host time there); a graphed decode step runs the same
  arithmetic in two phases, a split-K shrink into an fp32 buffer and an expand (``Bgmv(...)(...,
  phases=2)``, ``kernels.bgmv_split``: why, and how both give the same bits).

Slots are rank-padded (zeros beyond an adapter's rank), so R is one number per layer. Tokens with no
adapter are not in ``order``: the kernels never touch them. Operands in A's / B's dtype with fp32
accumulation; fp32 operands (and the interpreter, whose dot misreads 16-bit floats) multiply exactly
in fp32 ("ieee"). Imports triton: load it only through ``deltatune.kernels.backend.load``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from deltatune.kernels.backend import interpreted
from deltatune.kernels.bgmv_split import (bgmv_expand, bgmv_shrink, bgmv_shrink_group, decode_split, expand_block,
                                          shrink_block, slot_rank)
from deltatune.kernels.triton_bits import dot as _dot

__all__ = ["sgmv", "shrink_split", "expand_tiles", "bgmv", "Bgmv"]


@triton.jit
def _sgmv_shrink(X, stride_x, A, stride_as, stride_ar, H, stride_hs, ORDER, TILES, R, K,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                 IEEE: tl.constexpr):
    """h[s, pos, r] = sum_k x[order[pos], k] A[slot, r, k] over split s's K range (K_TILES blocks of BLOCK_K from
    s * K_TILES * BLOCK_K, masked at K) for one tile's positions, every r: program (tile, s)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(TILES + tile * 3)
    end = tl.load(TILES + tile * 3 + 1)
    slot = tl.load(TILES + tile * 3 + 2).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)  # (BM,) positions in order
    pmask = pos < end
    rows = tl.load(ORDER + pos, mask=pmask, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)  # (BR,) BLOCK_R >= R
    rmask = r < R
    k0 = split * (K_TILES * BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(0, K_TILES):  # constexpr trip count (the interpreter cannot loop over run-time bounds)
        k = k0 + i * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(A + slot * stride_as + r[None, :] * stride_ar + k[:, None],
                    mask=kmask[:, None] & rmask[None, :], other=0.0)  # (BK, BR): A[slot]^T
        acc += _dot(x.to(a.dtype), a, IEEE)
    tl.store(H + split.to(tl.int64) * stride_hs + pos[:, None] * R + r[None, :], acc,
             mask=pmask[:, None] & rmask[None, :])


@triton.jit
def _sgmv_expand(H, stride_hs, B, stride_bs, stride_bn, SCALES, Y, stride_y, ORDER, TILES, BIAS, R, N_OUT,
                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr,
                 BLOCK_R: tl.constexpr, IEEE: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[order[pos], n] += scale[slot] * sum_r h[pos, r] B[slot, n, r], h = round(sum_s h[s, pos, r]) (the SPLIT
    partials summed in fp32 in split order, then rounded to B's dtype), for one tile and N_TILES blocks of n.
    ACCUMULATE off: y[order[pos], n] = that term (a store, y never read); HAS_BIAS: bias[n] added too."""
    tile = tl.program_id(0)
    start = tl.load(TILES + tile * 3)
    end = tl.load(TILES + tile * 3 + 1)
    slot = tl.load(TILES + tile * 3 + 2).to(tl.int64)
    pos = start + tl.arange(0, BLOCK_M)
    pmask = pos < end
    rows = tl.load(ORDER + pos, mask=pmask, other=0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    hmask = pmask[:, None] & rmask[None, :]
    h = tl.load(H + pos[:, None] * R + r[None, :], mask=hmask, other=0.0)  # (BM, BR) fp32, split 0
    for s in range(1, SPLIT):  # constexpr: a fixed order, so the sum is the same run to run
        h += tl.load(H + s * stride_hs + pos[:, None] * R + r[None, :], mask=hmask, other=0.0)
    h = h.to(B.dtype.element_ty)  # the rounding of h an unfused B(A x) in B's dtype has
    scale = tl.load(SCALES + slot)
    for j in range(0, N_TILES):  # h loaded (and its partials summed) once for N_TILES output blocks
        n = (tl.program_id(1) * N_TILES + j) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        nmask = n < N_OUT
        b = tl.load(B + slot * stride_bs + n[None, :] * stride_bn + r[:, None],
                    mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BR, BN): B[slot]^T
        acc = _dot(h, b, IEEE) * scale
        out = Y + rows[:, None] * stride_y + n[None, :]
        omask = pmask[:, None] & nmask[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if ACCUMULATE:
            acc += tl.load(out, mask=omask, other=0.0).to(tl.float32)
        tl.store(out, acc.to(Y.dtype.element_ty), mask=omask)


@triton.jit
def _bgmv(X, A, B, SCALES, RANKS, Y, SLOTS, ROWS_PER_SLOT, R: tl.constexpr, K: tl.constexpr, N_OUT: tl.constexpr,
          HAS_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
          N_TILES: tl.constexpr, SPLIT: tl.constexpr, K_TILES: tl.constexpr):
    """y[t, n] += scale_s * sum_r B[s, n, r] h[r], h = round(A[s] x[t]), s = slots[t // ROWS_PER_SLOT]: one token
    and N_TILES blocks of BLOCK_N outputs per program, shrink and expand in one launch (each program of a token
    recomputes its rank-R shrink). No slot (-1) or rank 0 on this layer: every load and the store masked off.
    The shrink sums SPLIT K ranges of K_TILES blocks, each accumulated apart from zero, into ``acc`` in range
    order: the two-phase kernels' arithmetic (``kernels.bgmv_split``), so both give the same bits."""
    t = tl.program_id(0).to(tl.int64)
    s, rank = slot_rank(SLOTS, RANKS, t, ROWS_PER_SLOT, R, HAS_RANKS)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    part = tl.zeros((BLOCK_R,), dtype=tl.float32)  # the current K range's sum
    for i in range(0, SPLIT * K_TILES):  # constexpr trip count (the interpreter needs one), one loop: pipelined
        part += shrink_block(X, A, t, s, rank, i * BLOCK_K + tl.arange(0, BLOCK_K), R, K, BLOCK_R)
        last = (i % K_TILES) == K_TILES - 1  # a range ends: into acc, in range order (the two-phase expand's)
        acc = tl.where(last, acc + part, acc)
        part = tl.where(last, 0.0, part)
    h = acc.to(B.dtype.element_ty).to(tl.float32)  # the rounding of h an unfused B(A x) in B's dtype has
    scale = tl.load(SCALES + s)
    for j in range(0, N_TILES):
        n = (tl.program_id(1) * N_TILES + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        expand_block(B, Y, t, s, rank, h, scale, n, R, N_OUT, BLOCK_R)


def _check(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor):
    """Contiguous last dimensions and matching shapes: (x, y, A, B, scales) ready for the kernels."""
    S, R, K = A.shape
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != K or B.shape[0] != S or B.shape[2] != R or y.shape[1] != B.shape[1]:
        raise ValueError(f"mixed LoRA shapes: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(A.shape)} (S, R, in), "
                         f"B {tuple(B.shape)} (S, out, R)")
    if not y.is_contiguous():
        raise ValueError("mixed LoRA kernels add into y in place: y must be contiguous")
    x = x if x.stride(-1) == 1 else x.contiguous()
    A = A if A.stride(-1) == 1 else A.contiguous()
    B = B if B.stride(-1) == 1 else B.contiguous()
    return x, y, A, B, scales.float().contiguous()


def sgmv(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
         order: torch.Tensor, tiles: torch.Tensor, block_m: int, split: int | None = None, accumulate: bool = True,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Segmented mixed LoRA: ``y[order[p]] += scale_s · B_s A_s x[order[p]]`` for every tile's positions.

    x (T, in); y (T, out), updated in place; A (S, R, in); B (S, out, R); scales (S,); order (N,) int32
    token indices sorted by slot; tiles (num_tiles, 3) int32 (start, end, slot), at most ``block_m``
    positions each. ``split``: how many parts the shrink cuts K into (None: ``DELTATUNE_SGMV_SPLIT``, else
    ``shrink_split``; at most one part per BLOCK_K of K). ``accumulate`` False: ``y[order[p]] =`` the term,
    a store that never reads y (rows not in ``order`` untouched); ``bias`` (out,): added to every row written.
    Returns ``y``.
    """
    x, y, A, B, scales = _check(x, y, A, B, scales)
    if bias is not None and (bias.shape != (y.shape[1],) or bias.device != y.device):
        raise ValueError(f"sgmv: bias must be ({y.shape[1]},) on {y.device}, got {tuple(bias.shape)} on {bias.device}")
    bias = bias.contiguous() if bias is not None else scales  # a pointer the kernel never reads (HAS_BIAS off)
    S, R, K = A.shape
    N, n_tiles = order.numel(), tiles.shape[0]
    if N == 0 or n_tiles == 0:
        return y
    ieee = A.dtype == torch.float32 or interpreted()
    sms = _sm_count(x.device)
    block_r = max(16, _pow2(R))
    block_k = 64 if block_r <= 64 else 32
    k_blocks = _cdiv(K, block_k)
    if split is None:
        split = _env_split()
    if split is None:
        split = shrink_split(n_tiles, k_blocks, sms)
    elif isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"sgmv: split must be a positive integer, got {split!r}")
    k_tiles = _cdiv(k_blocks, min(split, k_blocks))  # BLOCK_K blocks per split
    split = _cdiv(k_blocks, k_tiles)  # no empty split
    h = torch.empty(split, N, R, device=x.device, dtype=torch.float32)  # the shrink's partial sums, per split
    warps = 8 if block_m >= 128 else 4
    _sgmv_shrink[(n_tiles, split)](x, x.stride(0), A, A.stride(0), A.stride(1), h, N * R, order, tiles, R, K,
                                   BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, K_TILES=k_tiles, IEEE=ieee,
                                   num_warps=warps, num_stages=3)
    n_out = B.shape[1]
    block_n = 128
    n_blocks = _cdiv(n_out, block_n)
    n_tiles_out = expand_tiles(n_tiles, n_blocks, sms)
    _sgmv_expand[(n_tiles, _cdiv(n_blocks, n_tiles_out))](h, N * R, B, B.stride(0), B.stride(1), scales, y,
                                                          y.stride(0), order, tiles, bias, R, n_out, SPLIT=split,
                                                          BLOCK_M=block_m, BLOCK_N=block_n, N_TILES=n_tiles_out,
                                                          BLOCK_R=block_r, IEEE=ieee, ACCUMULATE=bool(accumulate),
                                                          HAS_BIAS=bias is not scales, num_warps=warps,
                                                          num_stages=2)
    return y


def shrink_split(n_tiles: int, k_blocks: int, sms: int) -> int:
    """How many parts the SGMV shrink cuts K (``k_blocks`` blocks of BLOCK_K) into for ``n_tiles`` tiles on ``sms``
    multiprocessors: the smallest power of two giving at least 1.5 programs a multiprocessor (each program streams
    its tile's rows of x; one long K loop per tile leaves most of the GPU idle when prefill segments are long), at
    most 16 and at most one part per 2 blocks of K. Powers of two bound the kernel variants compiled."""
    split = 1
    while n_tiles * split * 2 < 3 * sms and split < 16 and k_blocks >= 4 * split:
        split *= 2
    return split


def expand_tiles(n_tiles: int, n_blocks: int, sms: int) -> int:
    """Output blocks per SGMV expand program (a power of two): the most that still leave at least 3 programs a
    multiprocessor. Each program loads its tile's h (summing the shrink's partials) once for all its blocks, so
    fewer, wider programs read h fewer times: with one 128-wide block a program, SPLIT fp32 partials at R 64 are
    SPLIT / 2 times the bytes of the y the program reads and writes."""
    per = 1
    while per * 2 <= n_blocks and n_tiles * _cdiv(n_blocks, per * 2) >= 3 * sms:
        per *= 2
    return per


def _env_split() -> int | None:
    """``DELTATUNE_SGMV_SPLIT`` as a positive integer (None when unset or empty)."""
    value = os.environ.get("DELTATUNE_SGMV_SPLIT", "").strip()
    if not value:
        return None
    try:
        split = int(value)
    except ValueError:
        split = 0
    if split < 1:
        raise ValueError(f"DELTATUNE_SGMV_SPLIT must be a positive integer (1: the one-pass shrink), got {value!r}")
    return split


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; 4 off CUDA (the interpreter), so that small tests split too."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


class Bgmv:
    """The gathered (per-token) launches for one layer's slots: shapes checked and launch constants chosen once,
    so a call is one kernel launch (or two) and no other host work (no allocation after the first call of a
    shape, no host read of a device tensor).

    A (S, R, in), B (S, out, R) contiguous, in one dtype; scales (S,) fp32; ranks (S,) int32 or None (every slot
    uses all R). The tensors are held, not copied: slots loaded into them later are seen by the next call.
    ``split``: how many K ranges the shrink sums apart (None: ``decode_split``; at most one per BLOCK_K of
    K), the same in both variants. ``workspace``: a dict, token count -> fp32 buffer, shared by layers whose
    calls run one after another on one stream (a pool's layers: one buffer per token count, not one per
    layer); None: this object's own. It holds the two-phase variant's partials, allocated on the first call
    of a token count and reused by every later one (a CUDA graph captures its address); a layer needing more
    than the shared buffer holds replaces it with a larger one, and layers that took the old one keep it.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor | None = None,
                 split: int | None = None, workspace: dict[int, torch.Tensor] | None = None):
        if A.dim() != 3 or B.dim() != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
            raise ValueError(f"mixed LoRA slots: A {tuple(A.shape)} (S, R, in), B {tuple(B.shape)} (S, out, R)")
        S, R, K = A.shape
        if not (A.is_contiguous() and B.is_contiguous()):
            raise ValueError("mixed LoRA slots A and B must be contiguous (the kernel derives their strides)")
        if scales.shape != (S,) or scales.dtype != torch.float32 or not scales.is_contiguous():
            raise ValueError(f"scales must be a contiguous float32 ({S},) tensor, got {scales.dtype} "
                             f"{tuple(scales.shape)}")
        if ranks is not None and (ranks.shape != (S,) or ranks.dtype != torch.int32 or not ranks.is_contiguous()):
            raise ValueError(f"ranks must be a contiguous int32 ({S},) tensor, got {ranks.dtype} {tuple(ranks.shape)}")
        if any(t.device != A.device for t in (B, scales) + ((ranks,) if ranks is not None else ())):
            raise ValueError(f"mixed LoRA slots on different devices: A {A.device}, B {B.device}, "
                             f"scales {scales.device}" + (f", ranks {ranks.device}" if ranks is not None else ""))
        if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
            raise ValueError(f"Bgmv: split must be a positive integer, got {split!r}")
        self.A, self.B, self.scales = A, B, scales
        self.ranks = ranks if ranks is not None else scales  # a pointer the kernel never reads (HAS_RANKS off)
        N = B.shape[1]
        block_r = max(16, _pow2(R))
        block_k = min(max(16, _pow2(K)), max(32, 8192 // block_r))
        k_blocks = _cdiv(K, block_k)
        k_tiles = _cdiv(k_blocks, min(decode_split(k_blocks) if split is None else split, k_blocks))  # blocks a range
        self.split = _cdiv(k_blocks, k_tiles)  # no empty range
        self.K, self.N, self.R = K, N, R
        self._const = dict(R=R, K=K, N_OUT=N, HAS_RANKS=ranks is not None, BLOCK_R=block_r, BLOCK_K=block_k,
                           BLOCK_N=min(max(16, _pow2(N)), max(32, 8192 // block_r)), SPLIT=self.split,
                           K_TILES=k_tiles, num_warps=4)
        self._sms = _sm_count(A.device)
        self._workspace = {} if workspace is None else workspace
        self._launches: dict[tuple, tuple] = {}  # (x shape, y shape, slots, rows per slot, phases) -> launch

    def _launch(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, rows_per_slot: int, phases: int) -> tuple:
        """What a call of these shapes launches (checked here, once per shape): (grid, constants) for one launch;
        for two, the shrink's and the expand's (grid, constants) and the partials buffer (SPLIT, T, R)."""
        if x.shape[-1] != self.K or y.shape[-1] != self.N or x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"mixed LoRA: x {tuple(x.shape)} and y {tuple(y.shape)} do not fit slots of in={self.K}, "
                             f"out={self.N}")
        tokens = x.shape[:-1].numel()
        if slots.dim() != 1 or slots.dtype != torch.int32 or slots.shape[0] * rows_per_slot != tokens:
            raise ValueError(f"slots must be int32 with one entry per {rows_per_slot} token(s) of the {tokens}: "
                             f"got {slots.dtype} {tuple(slots.shape)}")
        if not (x.device == y.device == slots.device == self.A.device):
            raise ValueError(f"mixed LoRA on different devices: x {x.device}, y {y.device}, slots {slots.device}, "
                             f"slots' factors {self.A.device}")
        if isinstance(phases, bool) or phases not in (1, 2):
            raise ValueError(f"Bgmv: phases must be 1 (one launch) or 2 (shrink, then expand), got {phases!r}")
        c = self._const
        blocks = _cdiv(self.N, c["BLOCK_N"])
        if phases == 2:  # as many output blocks a program as leave >= 3 programs a multiprocessor
            n_tiles = expand_tiles(max(tokens, 1), blocks, self._sms)
            shrink = dict((k, c[k]) for k in ("R", "K", "HAS_RANKS", "BLOCK_R", "BLOCK_K", "K_TILES", "num_warps"))
            expand = dict((k, c[k]) for k in ("R", "N_OUT", "HAS_RANKS", "SPLIT", "BLOCK_R", "BLOCK_N", "num_warps"))
            return ((tokens, self.split), shrink), ((tokens, _cdiv(blocks, n_tiles)), dict(expand, N_TILES=n_tiles)), \
                self._partials(tokens, x.device)
        # programs along the output: enough of them to fill the GPU (~4 a multiprocessor), but at most ~2 shrinks
        # (R x in, re-read from cache) per expand (out x R) of a token
        split = max(1, min(blocks, _cdiv(4 * self._sms, max(tokens, 1)), _cdiv(2 * self.N, self.K)))
        n_tiles = _cdiv(blocks, split)
        return (tokens, _cdiv(blocks, n_tiles)), dict(c, N_TILES=n_tiles)

    def _partials(self, tokens: int, device: torch.device, index: int = 0) -> torch.Tensor:
        """The two-phase partials (SPLIT, tokens, R) fp32: a view of the workspace's buffer for ``tokens``,
        replaced by a larger one when it is too small (whoever holds the old one keeps it). ``index`` > 0: the
        buffer of the index-th layer of a ``shrink_group`` (whose partials wait for that layer's expand)."""
        need, key = self.split * tokens * self.R, tokens if index == 0 else (tokens, index)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < need:
            buf = self._workspace[key] = torch.empty(max(need, 1), dtype=torch.float32, device=device)
        return buf[:need].view(self.split, tokens, self.R)

    def _shrink_constants(self) -> tuple:
        c = self._const
        return (self.R, self.K, self.split, self.A.dtype, self.A.device,
                *(c[k] for k in ("HAS_RANKS", "BLOCK_R", "BLOCK_K", "K_TILES")))

    def shrink_group(self, others: list["Bgmv"], x: torch.Tensor, slots: torch.Tensor,
                     rows_per_slot: int = 1) -> list[torch.Tensor] | None:
        """The two-phase shrinks of this layer and up to two ``others`` that read the same input ``x``, in one
        launch (``bgmv_shrink_group``): their partials, this layer's first, each for ``expand``; the same bits
        as each layer's own shrink. None where the layers' shrinks differ in a constant (rank padding, input
        width, split, dtype): then each runs its own."""
        members = [self, *others]
        if len(members) > 3 or any(m._shrink_constants() != self._shrink_constants() for m in others):
            return None
        if not x.is_contiguous():
            x = x.contiguous()
        tokens = x.shape[:-1].numel()
        if x.shape[-1] != self.K or slots.dim() != 1 or slots.shape[0] * rows_per_slot != tokens:
            raise ValueError(f"mixed LoRA: x {tuple(x.shape)} and slots {tuple(slots.shape)} do not fit a shrink of "
                             f"in={self.K} with {rows_per_slot} token(s) a slot")
        hs = [m._partials(tokens, x.device, i) for i, m in enumerate(members)]
        if tokens:
            pad = 3 - len(members)
            c = self._const
            bgmv_shrink_group[(tokens, self.split, len(members))](
                x, *[m.A for m in members], *[members[-1].A] * pad, *[m.ranks for m in members],
                *[members[-1].ranks] * pad, slots, *hs, *[hs[-1]] * pad, rows_per_slot, tokens,
                **{k: c[k] for k in ("R", "K", "HAS_RANKS", "BLOCK_R", "BLOCK_K", "K_TILES", "num_warps")})
        return hs

    def expand(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
               rows_per_slot: int = 1) -> torch.Tensor:
        """The second phase alone: ``y`` plus ``scale_s · B_s round(sum_p h[p, t])`` for the partials ``h`` that
        ``shrink_group`` wrote for this layer from ``x``. Updates ``y`` in place and returns it."""
        if not y.is_contiguous():
            y = y.contiguous()
        key = (x.shape, y.shape, slots.shape, rows_per_slot, 2)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._launch(x, y, slots, rows_per_slot, 2)
        _, (expand_grid, expand), _ = launch
        if expand_grid[0]:
            bgmv_expand[expand_grid](h, self.B, self.scales, self.ranks, y, slots, rows_per_slot, expand_grid[0],
                                     **expand)
        return y

    def __call__(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, rows_per_slot: int = 1,
                 phases: int = 1) -> torch.Tensor:
        """``y`` (.., out) plus ``scale_s · B_s A_s x[t]`` for each token ``t`` of ``x`` (.., in), ``s`` =
        ``slots[t // rows_per_slot]`` (int32 on the device; -1: none). ``phases``: 1, one launch (each program
        of a token recomputes its shrink: eager decode, where a launch costs host time); 2, a shrink over
        (token, K range) then an expand through the partials buffer (a graphed decode step, where launches are
        free); the same bits either way. Updates ``y`` in place and returns it (a contiguous copy first if
        ``y`` is not contiguous)."""
        if not x.is_contiguous():
            x = x.contiguous()
        if not y.is_contiguous():
            y = y.contiguous()
        key = (x.shape, y.shape, slots.shape, rows_per_slot, phases)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._launch(x, y, slots, rows_per_slot, phases)
        if phases == 1:
            grid, const = launch
            if grid[0]:
                _bgmv[grid](x, self.A, self.B, self.scales, self.ranks, y, slots, rows_per_slot, **const)
            return y
        (shrink_grid, shrink), (expand_grid, expand), h = launch
        if shrink_grid[0]:
            tokens = shrink_grid[0]
            bgmv_shrink[shrink_grid](x, self.A, self.ranks, slots, h, rows_per_slot, tokens, **shrink)
            bgmv_expand[expand_grid](h, self.B, self.scales, self.ranks, y, slots, rows_per_slot, tokens, **expand)
        return y


def bgmv(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
         slots: torch.Tensor, ranks: torch.Tensor | None = None, rows_per_slot: int = 1, phases: int = 1,
         split: int | None = None) -> torch.Tensor:
    """Gathered mixed LoRA, token by token: ``y[t] += scale_s · B_s A_s x[t]`` with ``s = slots[t // rows_per_slot]``
    (int32, -1: no adapter). x (T, in); y (T, out), updated in place; A, B, scales as ``sgmv``; ``ranks`` (S,)
    int32 on the device lets a slot skip its padded rank (0: the slot adds nothing here); ``phases`` and
    ``split`` as ``Bgmv``. Returns ``y``. A layer called many times holds a ``Bgmv`` instead (checks done once,
    buffers kept)."""
    x, y, A, B, scales = _check(x, y, A, B, scales)
    return Bgmv(A.contiguous(), B.contiguous(), scales, ranks, split)(x, y, slots, rows_per_slot, phases)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (plain Python: ``triton.cdiv`` and friends cost microseconds a call)."""
    return 1 << max(0, n - 1).bit_length()
