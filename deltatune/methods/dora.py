"""DoRA (Liu et al. 2024, arXiv:2402.09353): LoRA's update split into a magnitude and a direction.

Eq. (5): ``W' = m ⊙ (W + s·BA) / ||W + s·BA||_c`` with one learned magnitude per output feature and the
norm taken over everything else (the paper's column norm; a row of our ``(out, in...)`` matrix). Chosen
by ``LoraConfig(use_dora=True)``: the LoRA method builds its delta (A, B, scale, dropout, init) as usual
and wraps it in a ``DoraDelta``, which adds the magnitude m, initialised to ``||W + s·BA||_c`` so that
the adapted layer starts as the base (as PEFT's ``DoraLinearLayer.update_layer``).

The forward is PEFT's (``peft/tuners/lora/dora.py``), on activations, with the norm detached as the
paper's Sec. 4.3 suggests (it reflects ΔV but gets no gradient):

    f = m / ||W + s·BA||_c                              (out,), no gradient through the norm
    y' = y + (f - 1) ⊙ (y - b) + f ⊙ s·B(A(x))          base output y reused, b the bias

With dropout in training, ``y - b`` is recomputed from the dropped input (PEFT does the same). For
embeddings (``y`` has no bias) this is PEFT's ``f ⊙ y + f ⊙ s·(A[x] B^T)``; for convolutions the
factor broadcasts over the spatial dimensions. W is the base weight as the geometry gives it, so the
4-bit ``QuantLinear`` works as PEFT's QDoRA does: W dequantized for the norm.

Merging is not additive: ``merge_delta`` gives ``W' - W`` and keeps the norm of that moment (outside
the state dict), which ``unmerge_delta`` needs to recover ``W = W' / f - s·BA`` (PEFT caches it the
same way).

The fused training path (``deltatune.fast``) takes DoRA as LoRA's low-rank form plus an output scale:
``y = f ⊙ (W x + s·B A x) + b`` with the same f, which equals the forward above (``y - b`` is ``W x``).
``low_rank`` gives ``(A, B, s, output_scale)``; ``output_scale(layer)`` computes f without the
(out, in) matrix ``W + s·BA``, row by row:

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·(B (A Aᵀ) Bᵀ)_ii

``||W_i||²`` is cached (keyed on the weight's storage and version and the layer's merged adapters, so a
merge or a load recomputes it); ``W Aᵀ`` is the base projection applied to the r rows of A (the 4-bit
base through its own dequantizing matmul), out·in·r work a step and no weight-sized temporary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DoraDelta", "magnitude_shape", "row_norms_sq", "update_norm"]


def magnitude_shape(family: str, b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The magnitude's shape for a layer whose LoRA B has ``b_shape``: (out,) for linear layers and
    embeddings (out = embedding dim), (1, out, 1, ...) for convolutions, as PEFT stores it."""
    if family == "conv":
        return (1, b_shape[0], *b_shape[2:])
    return (b_shape[0],)


def row_norms_sq(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||W_i||²`` (out,) of the 2-D (out, in) ``W`` in ``dtype``, 1,024 rows at a time (no full-size copy)."""
    return torch.cat([W[i:i + 1024].to(dtype).square().sum(1) for i in range(0, W.shape[0], 1024)])


def update_norm(weight_rows: torch.Tensor, weight_norm_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``||W + s·BA||`` per output row (out,) without the (out, in) matrix, from ``weight_rows`` = ``W Aᵀ``
    (out, r), ``weight_norm_sq`` = ``||W_i||²`` (out,), A (r, in) and B (out, r), all in one float dtype:
    ``n² = ||W_i||² + Σ_k B_ik C_ik`` with ``C = 2s·W Aᵀ + s²·B (A Aᵀ)`` (out, r), one addmm."""
    inner = torch.addmm(weight_rows, B, A @ A.T, beta=2 * scale, alpha=scale * scale)  # (out, r)
    return torch.linalg.vecdot(B, inner).add_(weight_norm_sq).clamp_min_(0).sqrt_()


class DoraDelta(nn.Module):
    """One DoRA adapter on one layer: a LoRA delta (``lora``: A, B, scale, dropout) and the magnitude m."""

    method = "lora"  # in files: PEFT's LoRA with use_dora, m as <path>.lora_magnitude_vector
    changes_base = False

    def __init__(self, lora: nn.Module, family: str):
        super().__init__()
        self.lora = lora  # a LoraDelta (methods/lora.py)
        self.family = family
        A = lora.A
        shape = magnitude_shape(family, tuple(lora.B.shape))
        self.magnitude = nn.Parameter(torch.empty(shape, dtype=A.dtype, device=A.device))
        # ||W + s·BA||_c at the last merge (unmerge divides by m / this), (out,) fp32
        self.register_buffer("merged_norm", None, persistent=False)

    # -- the delta interface ----------------------------------------------------------------------------
    def roles(self) -> dict[str, nn.Parameter]:
        return {**self.lora.roles(), "magnitude": self.magnitude}

    def settings(self) -> dict:
        return self.lora.settings()

    def signature(self) -> tuple:
        return (*self.lora.signature(), "dora")

    def _exact(self) -> torch.dtype:
        """The dtype of init and merges: fp32, or the adapter's own where it is wider (float64)."""
        return torch.promote_types(self.magnitude.dtype, torch.float32)

    def attach(self, layer: nn.Module) -> None:
        self.lora.attach(layer)
        with torch.no_grad():
            W = layer.geometry.base_weight(layer).to(self._exact())
            self.magnitude.copy_(self._norm(W, self.lora.matrix().to(W.dtype)).view(self.magnitude.shape))

    def detach(self, layer: nn.Module) -> None:
        self.lora.detach(layer)

    def low_rank(self, training: bool):
        """LoRA's ``(A, B, scale)`` plus ``output_scale`` (the fused path's form, see the module docstring), or
        None where LoRA has none (dropout while training)."""
        low = self.lora.low_rank(training)
        return None if low is None else (*low, self.output_scale)

    def output_scale(self, layer: nn.Module) -> torch.Tensor:
        """``f = m / ||W + s·BA||_c`` (out,) for the fused path, the norm detached; differentiable in m."""
        return self.magnitude.reshape(-1) / self.fused_norm(layer)

    @torch.no_grad()
    def fused_norm(self, layer: nn.Module) -> torch.Tensor:
        """``||W + s·BA||`` per output row (out,) from ``||W_i||²``, ``W Aᵀ`` and ``A Aᵀ`` (``update_norm``: no
        (out, in) temporary): a handful of launches a layer (the fast path's step is partly bound by the host's)."""
        exact = self._exact()
        wa = self._base_rows(layer, self.lora.A).T.to(exact)  # (out, r): W Aᵀ
        return update_norm(wa, self._weight_norm_sq(layer), self.lora.A.to(exact), self.lora.B.to(exact),
                           self.lora.scale)

    @staticmethod
    def _base_rows(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ Wᵀ`` (r, out) for the rows (r, in) by the layer's base weight, without the bias."""
        weight = layer.fused_weight()
        if isinstance(weight, torch.Tensor):
            if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):  # fp32 out: no rounding of W Aᵀ
                return torch.mm(rows.to(weight.dtype), weight.T, out_dtype=torch.float32)
            return rows.to(weight.dtype) @ weight.T
        if getattr(layer, "bias", None) is None:  # a quantized base: its own (dequantizing) matmul
            return layer.geometry.base_forward(layer, rows)
        return rows @ weight.dequantize(rows.dtype).T

    def _weight_norm_sq(self, layer: nn.Module) -> torch.Tensor:
        """``||W_i||²`` (out,) in the exact dtype, cached until the base weight changes."""
        weight = layer.fused_weight()
        tensors = [weight] if isinstance(weight, torch.Tensor) else list(weight.tensors().values())
        # merges write through ``.data`` (no version bump): the merged adapters are part of the key
        key = (tuple(layer.merged), tuple((t.data_ptr(), t._version) for t in tensors))
        cached = self.__dict__.get("_wsq")
        if cached is not None and cached[0] == key:
            return cached[1]
        W = layer.geometry.base_weight(layer).flatten(1)  # (out, in); dequantized once for a 4-bit base
        wsq = row_norms_sq(W, self._exact())
        capturing = W.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling():  # (a graph's memory is not for keeping)
            self.__dict__["_wsq"] = (key, wsq)
        return wsq

    @staticmethod
    def _norm(W: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``||W + update||`` per output row of the 2-D (out, in...) matrices: (out,)."""
        return torch.linalg.norm(W.flatten(1) + update, dim=1)

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        W = layer.geometry.base_weight(layer).to(self._exact()).flatten(1)  # (out, in...), as it is now
        update = self.lora.matrix().to(W.dtype)  # s·BA, (out, in...)
        self.merged_norm = self._norm(W, update)
        factor = self.magnitude.to(W.dtype).reshape(-1) / self.merged_norm  # (out,)
        return layer.geometry.to_weight_layout(layer.base_module, factor[:, None] * (W + update) - W)

    def unmerge_delta(self, layer: nn.Module) -> torch.Tensor:
        if self.merged_norm is None:
            raise RuntimeError("DoRA: unmerge without a merge on this delta (the norm of the merge is unknown)")
        merged = layer.geometry.base_weight(layer).to(self._exact()).flatten(1)  # W' = f ⊙ (W + s·BA)
        factor = self.magnitude.to(merged.dtype).reshape(-1) / self.merged_norm
        W = merged / factor[:, None] - self.lora.matrix().to(merged.dtype)
        return layer.geometry.to_weight_layout(layer.base_module, W - merged)

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if not active:
            return y
        lora = self.lora
        h = x.to(lora.A.dtype) if x.is_floating_point() else x  # embeddings take token ids
        W = layer.geometry.base_weight(layer).to(lora.A.dtype)
        norm = self._norm(W, lora.matrix().detach()).detach()  # (out,): no gradient (Sec. 4.3)
        factor = self.magnitude / norm.view(self.magnitude.shape)
        bias = getattr(layer, "bias", None)
        if lora.dropout and self.training and h.is_floating_point():
            h = F.dropout(h, lora.dropout, training=True)
            base = layer.geometry.base_forward(layer, h.to(y.dtype))  # PEFT: W applied to the dropped input
        else:
            base = y
        if bias is not None:
            base = base - bias.view(self.magnitude.shape)
        return y + ((factor - 1) * base.to(factor.dtype) + factor * lora.update(layer, h)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"dora, magnitude={tuple(self.magnitude.shape)}"
