"""Measuring a run: parameter counts, a peak-memory estimate, the loss plot, and evaluation
(perplexity, accuracy, exact match) on a ``Dataset``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from deltatune.data import IGNORE, Dataset, collate

if TYPE_CHECKING:
    from deltatune.train import TrainArgs

__all__ = ["count_params", "estimate_memory", "plot_metrics", "batch_loss", "evaluate", "OOM_ADVICE"]


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed 4-bit weights hold 2 values a byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


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


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


OOM_ADVICE = ("out of GPU memory at micro-batch {mb} x {len} tokens. Remedies: a smaller --micro-batch with "
              "a larger --grad-accum (same effective batch), --gradient-checkpointing, a shorter --max-length, "
              "or QLoRA (--quant nf4) to shrink the frozen base.")


def plot_metrics(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Plot training (and validation) loss from a metrics JSONL file to a PNG; returns its path."""
    try:
        import matplotlib
    except ImportError:  # a declared dependency; without it the run still finishes, without the plot
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="train loss")
    if len(losses) >= 10:  # per-step losses are noisy: an exponential moving average shows the trend
        beta, avg, smooth = 1 - 1 / max(5, len(losses) // 20), 0.0, []
        for i, value in enumerate(losses, 1):
            avg = beta * avg + (1 - beta) * value
            smooth.append(avg / (1 - beta ** i))  # bias-corrected, so the first points are not pulled to 0
        ax.plot(steps, smooth, lw=1.8, color="C0", label="train loss (moving average)")
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


# -- loss and evaluation -------------------------------------------------------------------------------------
def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def batch_loss(model, batch: dict, task: str, device, autocast, fast: bool = False):
    """(summed loss, number of targets, logits or None) of one batch; causal LM predicts token t+1 from t.

    With ``fast`` (causal LM) the head and cross-entropy run fused (``deltatune.fast``) and no logits
    are returned; the attention mask is dropped there, since with right padding and causal
    attention it changes only padded positions, which carry no loss.
    """
    labels = batch["labels"].to(device)
    if fast and task == "causal-lm":
        from deltatune.fast import fused_causal_lm_loss

        n = int((labels[:, 1:] != IGNORE).sum())
        with autocast():
            mean = fused_causal_lm_loss(model, batch["input_ids"].to(device), labels)
        return mean.float() * n, n, None
    with autocast():
        logits = model(**_model_inputs(batch, device)).logits
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel(), logits
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum()), logits


@torch.no_grad()
def evaluate(model, ds: Dataset, batch_size: int = 8, device=None, autocast=None) -> dict[str, float]:
    """Loss and, by task, perplexity, accuracy (classification) and exact match (instruction data).

    Exact match is greedy-decoding exact match computed in one teacher-forced pass: greedy decoding
    reproduces the target iff the argmax at every target position is the target token.
    """
    import contextlib

    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    total, count, correct, exact = 0.0, 0, 0, 0
    pad = 0
    for start in range(0, len(ds), batch_size):
        batch = collate(ds.examples[start:start + batch_size], pad, ds.task)
        loss, n, logits = batch_loss(model, batch, ds.task, device, autocast)
        total += float(loss)
        count += n
        if ds.task == "classification":
            correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        else:
            labels = batch["labels"][:, 1:]
            pred = logits[:, :-1].argmax(-1).cpu()
            target = labels != IGNORE
            exact += int(((pred == labels) | ~target).all(dim=1).sum())
    model.train(was_training)
    out = {"loss": total / max(count, 1)}
    if ds.task == "classification":
        out["accuracy"] = correct / len(ds)
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["exact_match"] = exact / len(ds)
    return out


# -- the loop --------------------------------------------------------------------------------------------------
