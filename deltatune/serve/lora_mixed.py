"""Mixed-adapter LoRA: ``y[t] = base(x)[t] + scale_s · B_s(A_s x[t])`` with each token ``t`` its own slot ``s``.

The adapters of one layer sit stacked and rank-padded in slots (``deltatune.serve.pool``):
``A`` (S, R, in), ``B`` (S, out, R), ``scales`` (S,), zeros beyond each adapter's rank, so a padded
rank adds exact zeros. Which token uses which slot (-1: the base model, no adapter) is described once
per forward call by a ``SlotBatch`` and shared by every layer of the model:

* ``order``: the adapted tokens sorted by slot (stable), so each slot's tokens form one segment;
  base tokens are not in it, so they cost nothing beyond the base layer;
* ``tiles``: (start, end, slot) blocks of at most ``block_m`` positions of ``order``, one segment each:
  the work items of the segmented kernels (SGMV, Chen et al. 2023, "Punica", arXiv:2310.18547);
* ``slots``: each token's slot, for the gathered per-token kernel (BGMV: shrink and expand in one launch)
  used when segments are short (decode: one token per sequence).

``mixed_lora(x, y, A, B, scales, batch)`` adds the terms to ``y``: through the Triton kernels of
``deltatune.kernels.sgmv`` where ``kernels.backend`` says Triton runs, else through the PyTorch
reference below (one matmul pair per segment; any device, the tests' oracle for the kernels).
``linear_mixed_lora(x, W, bias, ...)`` computes a whole prefill projection the other way round: the terms
first, into a fresh buffer, then the base GEMM adding into it (no read-modify-write of the output).
Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltatune.kernels import backend

__all__ = ["SlotBatch", "slot_batch", "mixed_lora", "mixed_lora_reference", "linear_mixed_lora"]

GATHERED_MAX_SEGMENT = 4
"""Segments of at most this many tokens each take the gathered per-token kernel (BGMV) instead of SGMV."""


@dataclass(frozen=True)
class SlotBatch:
    """Which token uses which slot, for one forward call: host lists (the reference, the launch shapes)
    and one device tensor holding the int32 index arrays the kernels read."""

    num_tokens: int
    segments: tuple[tuple[int, int, int], ...]
    """(slot, start, end) per distinct slot, positions into ``order``."""
    block_m: int
    """Tokens per SGMV tile."""
    slots: torch.Tensor
    """(T,) int32: each token's slot, -1 for the base."""
    order: torch.Tensor
    """(N,) int32: the adapted tokens, sorted by slot."""
    tiles: torch.Tensor
    """(num_tiles, 3) int32: (start, end, slot) per SGMV tile."""
    longest: int
    """Tokens in the longest segment."""
    base: torch.Tensor
    """(T - N,) int32: the tokens with no adapter, ascending (the rows ``linear_mixed_lora`` fills with the bias)."""

    @property
    def num_adapted(self) -> int:
        """N: how many tokens use an adapter."""
        return self.segments[-1][2] if self.segments else 0

    @property
    def gathered(self) -> bool:
        """Whether the per-token (BGMV) kernel suits this batch better than the segmented ones (SGMV)."""
        return self.longest <= GATHERED_MAX_SEGMENT


def slot_batch(token_slots: list[int], device: torch.device | str, block_m: int | None = None) -> SlotBatch:
    """The ``SlotBatch`` of tokens using ``token_slots[t]`` (a slot index, or -1 for the base model).

    Built on the host from the list; the index arrays reach ``device`` in one copy.
    """
    T = len(token_slots)
    order = sorted((t for t in range(T) if token_slots[t] >= 0), key=lambda t: token_slots[t])  # stable
    segments, start = [], 0
    for pos in range(1, len(order) + 1):
        if pos == len(order) or token_slots[order[pos]] != token_slots[order[start]]:
            segments.append((token_slots[order[start]], start, pos))
            start = pos
    longest = max((end - start for _, start, end in segments), default=0)
    if block_m is None:  # long segments: fewer tiles, each reading its slot's A and B once
        block_m = 128 if longest >= 128 else 64 if longest >= 64 else 16
    tiles = [(lo, min(lo + block_m, end), s) for s, start, end in segments for lo in range(start, end, block_m)]
    base = [t for t in range(T) if token_slots[t] < 0]
    flat = torch.tensor(list(token_slots) + order + base + [v for tile in tiles for v in tile], dtype=torch.int32)
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    N = len(order)
    return SlotBatch(T, tuple(segments), block_m, flat[:T], flat[T:T + N], flat[2 * T:].view(-1, 3), longest,
                     flat[T + N:2 * T])


def mixed_lora_reference(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                         batch: SlotBatch, ranks: list[int] | None = None) -> torch.Tensor:
    """``y`` plus each adapted token's ``scale_s · B_s A_s x`` in PyTorch: one matmul pair per segment.

    x (T, in); y (T, out); A (S, R, in); B (S, out, R); scales (S,) fp32; ``ranks`` (host, per slot) lets
    a segment skip its padded rank. The products run in A's dtype, the sum in y's. Returns a new tensor.
    """
    if not batch.segments:
        return y
    return y.index_add(0, batch.order.long(), _reference_terms(x, A, B, scales, batch, ranks).to(y.dtype))


def _reference_terms(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, batch: SlotBatch,
                     ranks: list[int] | None) -> torch.Tensor:
    """(N, out) in A's dtype: row p is token ``order[p]``'s ``scale_s · B_s A_s x``."""
    parts = []
    for slot, start, end in batch.segments:
        rows = batch.order[start:end].long()
        r = ranks[slot] if ranks is not None else A.shape[1]
        h = x[rows].to(A.dtype) @ A[slot, :r].T  # (n, r)
        parts.append((h @ B[slot, :, :r].T) * scales[slot].to(A.dtype))  # (n, out)
    return torch.cat(parts)


def mixed_lora(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
               batch: SlotBatch, ranks: list[int] | None = None) -> torch.Tensor:
    """``y`` with every adapted token's LoRA term added (see the module docstring for the shapes).

    Runs the Triton kernels where ``kernels.backend.triton_enabled(x)`` (updating ``y`` in place) and the
    PyTorch reference elsewhere. Returns the result.
    """
    if x.shape[0] != batch.num_tokens or y.shape[0] != batch.num_tokens:
        raise ValueError(f"the slot batch has {batch.num_tokens} tokens, the layer's input {x.shape[0]} "
                         f"and output {y.shape[0]}")
    if not batch.segments:
        return y
    if backend.triton_enabled(x) and not y.requires_grad:  # the kernels have no backward
        sgmv = backend.load("deltatune.kernels.sgmv")
        if batch.gathered:
            return sgmv.bgmv(x, y, A, B, scales, batch.slots)
        return sgmv.sgmv(x, y, A, B, scales, batch.order, batch.tiles, batch.block_m)
    return mixed_lora_reference(x, y, A, B, scales, batch, ranks)


def linear_mixed_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                      B: torch.Tensor, scales: torch.Tensor, batch: SlotBatch,
                      ranks: list[int] | None = None) -> torch.Tensor:
    """``x W^T + bias`` plus every adapted token's LoRA term, with no read-modify-write of the output.

    The terms go first into a fresh ``z`` (T, out), the bias with them: the SGMV expand writes the adapted
    rows (``sgmv(..., accumulate=False)``: a store, no load) and the base rows get the bias (or zeros); then
    the base GEMM adds ``x W^T`` to ``z`` in its epilogue (``z.addmm_``, beta 1: cuBLAS reads z while the
    compute-bound GEMM runs, nearly free). Adding the terms to a finished ``y`` instead reads and writes
    ``y`` again in the memory-bound expand (``mixed_lora``). x (T, in); weight (out, in) in x's dtype; bias
    (out,) or None; the rest as ``mixed_lora``. The PyTorch reference computes the terms where Triton does
    not run. Rounding: the terms (and bias) are rounded to x's dtype before the GEMM adds them, where
    ``mixed_lora`` rounds the base output first: the same within one rounding of x's dtype. Returns a new
    (T, out) tensor. No backward through the kernels: call it without gradients.
    """
    T, out = x.shape[0], weight.shape[0]
    if T != batch.num_tokens:
        raise ValueError(f"the slot batch has {batch.num_tokens} tokens, the layer's input {T}")
    z = torch.empty(T, out, device=x.device, dtype=x.dtype)
    if batch.num_adapted < T:  # only the base rows: the adapted ones are written below
        z.index_put_((batch.base,), bias.to(z.dtype) if bias is not None else torch.zeros((), dtype=z.dtype,
                                                                                           device=z.device))
    if backend.triton_enabled(x):
        backend.load("deltatune.kernels.sgmv").sgmv(x, z, A, B, scales, batch.order, batch.tiles, batch.block_m,
                                                    accumulate=False, bias=bias)
    else:
        terms = _reference_terms(x, A, B, scales, batch, ranks).to(z.dtype)  # (N, out)
        z.index_put_((batch.order,), terms + bias.to(z.dtype) if bias is not None else terms)
    return z.addmm_(x, weight.t())  # in place: out-of-place addmm would first copy z into its result

