"""What a training step achieved: real and padded tokens/s, GPU memory, and model FLOPs utilisation.

Real tokens are the attention mask's ones; padded tokens every position of the batch (rows padded to
the longest). Memory is the peak allocated and reserved by PyTorch's caching allocator so far.

The count follows PaLM's MFU (Chowdhery et al. 2022, App. B): the FLOPs the step's arithmetic needs,
not what the kernels ran (recomputation under activation checkpointing is not counted). Per token,
every weight matrix costs 2 FLOPs a parameter forward and 2 backward for the gradient of its input;
a trained weight 2 more for its own gradient: a frozen base with an adapter costs 4N, full
fine-tuning 6N (N: the matrix parameters, head included, embeddings excluded; 4-bit weights count by
their logical shape). Attention adds, per layer and example of L tokens, 2·L²·d forward (QKᵀ and PV,
causal: half of 2·2·L²·d) and twice that backward. Peak rates are the dense 16-bit tensor-core FLOP/s
of the GPUs below; elsewhere MFU is not reported.
"""

from __future__ import annotations

import torch

from deltatune.train.packing import segments
from deltatune.train.report import quantized_layers

__all__ = ["Meter", "bar_postfix", "example_lengths", "matmul_params", "attention_shape", "step_flops", "peak_flops", "PEAK_BF16"]

PEAK_BF16 = {  # dense bf16/fp16 tensor FLOP/s, from the vendors' data sheets (SXM parts where both exist)
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trained) weight-matrix parameters used per token: 2-D parameters other than embedding
    tables, plus quantized layers by their logical shape (always frozen)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    frozen = trained = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.dim() < 2 or (id(p) in embeddings and p is not head_weight):
            continue
        if p.requires_grad:
            trained += p.numel()
        else:
            frozen += p.numel()
    for _, m in quantized_layers(model):
        frozen += m.out_features * m.in_features
    return frozen, trained


def attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(layers, heads × head dimension) from a transformers config; (0, 0) where it has none."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
    return layers, heads * head_dim


def step_flops(params: tuple[int, int], tokens: int, example_lengths: list[int], layers: int,
               attention_width: int) -> float:
    """Training FLOPs of a step of ``tokens`` real tokens whose examples have ``example_lengths``
    (each attends to itself only), for ``params`` = ``matmul_params(model)``; ``attention_width`` is
    heads × head dimension."""
    frozen, trained = params
    dense = tokens * (4 * frozen + 6 * trained)
    attention = 3 * layers * 2 * attention_width * sum(n * n for n in example_lengths)
    return float(dense + attention)


def peak_flops(device: torch.device) -> float | None:
    """The dense 16-bit peak FLOP/s of ``device``, or None when it is not a GPU listed in ``PEAK_BF16``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "A100" before "A10"
        if key in name:
            return PEAK_BF16[key]
    return None


def example_lengths(batch: dict) -> list[int]:
    """The real length of each example in a collated batch: packed rows (``position_ids`` restarting per
    example) give several per row, other rows one."""
    mask = batch["attention_mask"]
    if "position_ids" not in batch:
        return mask.sum(1).tolist()
    out = []
    for positions, real in zip(batch["position_ids"].tolist(), mask.tolist()):
        out += [b - a for a, b in segments(positions) if real[a]]
    return out


def cuda_peaks(device: torch.device) -> tuple[int, int]:
    """Peak bytes allocated and reserved on ``device``. ``torch.cuda.max_memory_allocated`` flattens the
    allocator's whole statistics dictionary (about 0.3 ms of Python, a noticeable share of a small model's
    step); the nested dictionary it flattens holds the two numbers already."""
    try:
        stats = torch._C._cuda_memoryStats(device.index if device.index is not None else torch.cuda.current_device())
        return stats["allocated_bytes"]["all"]["peak"], stats["reserved_bytes"]["all"]["peak"]
    except (AttributeError, KeyError, TypeError):  # another torch: the public calls
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


class Meter:
    """Turns a step's micro-batches and seconds into its throughput metrics (host-side numbers only: no
    GPU wait)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None):
        self.params = matmul_params(model)
        self.layers, self.width = attention_shape(model)
        self.device = device
        self.peak = peak_flops(device) if amp_dtype in (torch.bfloat16, torch.float16) else None

    def measure(self, batches: list[dict], seconds: float) -> dict:
        """{tokens, padded_tokens, tok_s, padded_tok_s, mem_gib, mem_reserved_gib (CUDA), mfu (known GPU)}."""
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        out = {"tokens": tokens, "padded_tokens": padded, "tok_s": tokens / seconds, "padded_tok_s": padded / seconds}
        if self.device.type == "cuda":
            allocated, reserved = cuda_peaks(self.device)
            out["mem_gib"] = round(allocated / 2**30, 3)
            out["mem_reserved_gib"] = round(reserved / 2**30, 3)
        if self.peak:
            lengths = [n for b in batches for n in example_lengths(b)]
            flops = step_flops(self.params, tokens, lengths, self.layers, self.width)
            out["mfu"] = round(flops / seconds / self.peak, 4)
        return out


def bar_postfix(rec: dict) -> dict:
    """The progress bar's numbers: loss, lr, real tokens/s, and on a GPU memory and MFU."""
    out = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}
    if "tok_s" in rec:  # an objective over other data (images) reports its own rate
        out["tok/s"] = f"{rec['tok_s']:.0f}"
    if "images_s" in rec:
        out["img/s"] = f"{rec['images_s']:.1f}"
    if "mem_gib" in rec:
        out["mem"] = f"{rec['mem_gib']:.1f}/{rec['mem_reserved_gib']:.1f}G"
    if "mfu" in rec:
        out["mfu"] = f"{100 * rec['mfu']:.0f}%"
    return out
