"""``combine``: a new LoRA adapter equal to a weighted sum of existing ones, exact or truncated by SVD."""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.adapters.surgery import adapter_record, delta_layers
from deltatune.methods.lora import LORA, LoraConfig, LoraDelta

__all__ = ["combine"]


def combine(model: nn.Module, weights: dict[str, float], name: str, rank: int | None = None) -> dict[str, float]:
    """Add adapter ``name`` equal to ``sum_i w_i * adapter_i`` and return a per-layer error report.

    Without ``rank`` the sum is exact: A's are stacked and B's concatenated with ``w_i * scale_i``
    folded in (rank = sum of ranks, scale 1). With ``rank`` each layer's summed delta is truncated to
    its top-``rank`` singular directions; the report maps each layer to its relative Frobenius error
    ``||dW - dW_rank|| / ||dW||`` (0.0 when exact). Only LoRA adapters combine.
    """
    record = adapter_record(model)
    missing = [n for n in weights if n not in record.configs]
    if missing:
        raise KeyError(f"combine: no adapter named {missing} (have {sorted(record.configs)})")
    if name in record.configs:
        raise ValueError(f"adapter {name!r} already exists on this model")
    not_lora = [n for n in weights if not isinstance(record.configs[n], LoraConfig) or record.configs[n].use_dora]
    if not_lora:
        raise ValueError(f"combine: adapters {not_lora} are not plain LoRA adapters (only low-rank sums combine)")
    if any(record.configs[n].modules_to_save for n in weights):
        raise ValueError("combine: adapters with modules_to_save cannot be combined (full copies have no low-rank sum)")
    report, built = {}, {}
    for path, layer in delta_layers(model):
        parts = [(layer.deltas[n], w) for n, w in weights.items() if n in layer.deltas]
        if not parts:
            continue
        A = torch.cat([d.A.detach().float() for d, _ in parts], dim=0)
        B = torch.cat([w * d.scale * d.B.detach().float() for d, w in parts], dim=1)
        err = 0.0
        if rank is not None and rank < A.shape[0]:
            A, B, err = _truncate(A, B, rank)
        built[path] = (A, B)
        report[path] = err
    first = record.configs[next(iter(weights))]
    ranks = {p: a.shape[0] for p, (a, _) in built.items()}
    cfg = LoraConfig(
        r=max(ranks.values()), alpha=float(max(ranks.values())), targets=sorted(built), init="kaiming",
        rank_pattern={p: r for p, r in ranks.items()}, alpha_pattern={p: float(r) for p, r in ranks.items()},
        dtype=first.dtype,
    )
    for path, (A, B) in built.items():
        layer = model.get_submodule(path)
        dtype = next(d for d in layer.deltas.values() if isinstance(d, LoraDelta)).A.dtype
        delta = LORA.delta(layer, A.shape[0], float(A.shape[0]), dtype=dtype)
        with torch.no_grad():
            delta.A.copy_(A)
            delta.B.copy_(B)
        layer.add(name, delta)
    record.configs[name] = cfg
    return report


def _truncate(A: torch.Tensor, B: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of ``B @ A`` (shapes kept per geometry) and the relative error."""
    a_shape, b_shape = A.shape, B.shape
    M = B.flatten(1) @ A.flatten(1)  # (out, in...) in the delta's own 2-D form
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    B2 = (U[:, :rank] * root).reshape(b_shape[0], rank, *b_shape[2:])
    A2 = (root[:, None] * Vh[:rank]).reshape(rank, *a_shape[1:])
    total = S.square().sum()
    err = float((S[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return A2, B2, err
