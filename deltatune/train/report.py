"""What a run reports about the model before it trains: parameter counts and a peak-memory estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltatune.train.args import TrainArgs

__all__ = ["count_params", "quantized_layers", "estimate_memory", "gib", "OOM_ADVICE"]


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once.

    A quantized layer (a module with a ``quant_kind``: ``QuantLinear``, or the adapter wrapper around
    one) keeps its weight as packed buffers, not as a parameter: it counts as its logical
    ``out_features x in_features`` weight, frozen; so does one whose codes are held as float
    parameters for FSDP (``quant.store_as_float``), which are not counted again.
    """
    layers = quantized_layers(model)
    storage = {id(getattr(m, name)) for _, m in layers for name in (getattr(m, "float_storage", None) or ())}
    total = trainable = 0
    for p in model.parameters():  # deduplicated: a tied parameter is seen once
        if id(p) in storage:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for _, module in layers:
        total += module.out_features * module.in_features
    return trainable, total


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of each quantized layer once: the innermost modules with a ``quant_kind`` (an
    adapter wrapper that holds the QuantLinear it wraps is not counted again)."""
    found = [(path, m) for path, m in model.named_modules() if hasattr(m, "quant_kind")]

    def holds(outer: str, inner: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    return [(path, m) for path, m in found if not any(holds(path, other) for other, _ in found)]


def estimate_memory(model: torch.nn.Module, args: TrainArgs, seq_len: int, task: str = "causal-lm") -> dict[str, float]:
    """A rough peak-memory estimate in bytes: weights, grads + AdamW state, activations, logits.

    Activations follow Korthikanti et al. 2022 (arXiv:2205.05198, Sec. 4.1): per layer about
    ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit; doubled in fp32; with gradient checkpointing only
    each layer's input (2*s*b*h) plus one layer's full set are kept.
    """
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = 8 if args.optimizer_bits == 32 else 2  # exp_avg + exp_avg_sq
    on_device = args.optimizer_states == "param"  # else host or paged out of the GPU
    optim = trainable * (4 + (state_bytes if on_device else 0))  # fp32 grad + the states held on the device
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    vocab = getattr(cfg, "vocab_size", 0) or 0
    b, s = args.micro_batch, seq_len
    per_layer = s * b * h * (34 + 5 * heads * s / max(h, 1)) * (2 if args.precision == "fp32" else 1)
    acts = (2 * s * b * h * layers + per_layer) if args.gradient_checkpointing else per_layer * layers
    logits = 3 * b * s * vocab * 4 if task == "causal-lm" else 0  # fp32 logits, log-softmax and its gradient
    est = {"weights": weights, "optimizer": optim, "activations": acts, "logits": logits}
    est["total"] = sum(est.values())
    return est


def gib(x: float) -> str:
    """``x`` bytes as "1.23 GiB"."""
    return f"{x / 2**30:.2f} GiB"


OOM_ADVICE = ("out of GPU memory at micro-batch {mb} x {len} tokens. Remedies: a smaller --micro-batch with "
              "a larger --grad-accum (same effective batch), --gradient-checkpointing, a shorter --max-length, "
              "or QLoRA (--quant nf4) to shrink the frozen base.")
