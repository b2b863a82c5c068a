"""What a training step computes on one kind of data: the seam between the one loop and a task.

The loop (``deltatune.train.loop``) asks an objective to collate a micro-batch from a dataset's
examples, to count its targets (the loss is normalised by the targets of the whole optimizer step,
so gradient accumulation equals one big batch), for the summed loss of a micro-batch, for the
step's throughput meter and, after the last step, to save what was trained. ``TokenObjective`` is
the default: next-token or class cross-entropy over tokenized examples. Diffusion models plug in
``deltatune.train.diffusion.DiffusionObjective`` (noise-prediction loss on cached VAE latents).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from deltatune.train.data import collate
from deltatune.train.evaluate import batch_loss, labels_count
from deltatune.train.throughput import Meter

if TYPE_CHECKING:
    from deltatune.train.loop import Run

__all__ = ["Objective", "TokenObjective", "WIDTH_MULTIPLE", "static_shape", "token_objective", "width_buckets"]


@runtime_checkable
class Objective(Protocol):
    """A task's part of a training step (see the module docstring)."""

    def collate(self, examples: list[dict]) -> dict:
        """One micro-batch (tensors on the host) from a dataset's ``examples``."""

    def targets(self, batch: dict) -> int:
        """The number of targets in ``batch`` that its summed loss adds up."""

    def batch_loss(self, model, batch: dict, device, autocast, fast: bool):
        """(summed loss, targets, logits or None) of one micro-batch, as ``evaluate.batch_loss`` gives it."""

    def meter(self, model, device: torch.device, amp_dtype) -> object:
        """An object whose ``measure(batches, seconds) -> dict`` gives a step's throughput metrics."""

    def save_outputs(self, run: "Run") -> Path:
        """Write the trained result of ``run`` (the adapter, ...); returns its directory."""


WIDTH_MULTIPLE = 16
"""On a GPU, rows of one example each are padded to a multiple of this many tokens (``width_buckets``)."""


class TokenObjective:
    """Cross-entropy over tokenized examples: causal LM (token t predicts t+1) or classification (one
    label a row), through ``evaluate.batch_loss``; the fused path where the run has it."""

    def __init__(self, task: str, pad_id: int, static: tuple[int, int] | None = None,
                 widths: tuple[int, int] | None = None):
        """``static``: (rows, width) of every micro-batch of packed rows, for CUDA graphs (``data.collate``).
        ``widths``: (multiple, cap) for rows of one example each: the width is the longest row rounded up to
        a multiple of ``multiple``, at most ``cap`` (or the longest row, if longer); see ``width_buckets``."""
        if widths is not None and widths[0] < 1:
            raise ValueError(f"TokenObjective: the width multiple must be at least 1, got {widths[0]}")
        self.task, self.pad_id, self.static, self.widths = task, pad_id, static, widths
        self._segments = 0

    def _segments_for(self, n: int) -> int:
        """How many segments a static batch lists for ``n`` real ones: a power of two (16 at least) that
        never shrinks, so the shapes change a few times in a run at most."""
        self._segments = max(self._segments, 16, 1 << (n - 1).bit_length())
        return self._segments

    def collate(self, examples: list[dict]) -> dict:
        """Right-padded ids, mask and labels (``data.collate``), in static shapes for packed rows if asked,
        rows of one example padded to a bucket's width if asked (``widths``)."""
        if self.static is None or "position_ids" not in examples[0]:
            return collate(examples, self.pad_id, self.task, width=self._width(examples))
        rows, width = self.static
        return collate(examples, self.pad_id, self.task, width=width, rows=rows, segments=self._segments_for)

    def _width(self, examples: list[dict]) -> int | None:
        """The bucket width of rows of one example each (``widths``), or None (the longest row's)."""
        if self.widths is None or "position_ids" in examples[0]:
            return None
        multiple, cap = self.widths
        longest = max(len(ex["input_ids"]) for ex in examples)
        return max(longest, min(-(-longest // multiple) * multiple, cap))

    def targets(self, batch: dict) -> int:
        """Target tokens (causal LM) or rows (classification)."""
        return labels_count(batch["labels"], self.task)

    def batch_loss(self, model, batch: dict, device, autocast, fast: bool):
        """``evaluate.batch_loss`` for this task."""
        return batch_loss(model, batch, self.task, device, autocast, fast)

    def meter(self, model, device: torch.device, amp_dtype) -> Meter:
        """Tokens/s, memory and MFU (``throughput.Meter``)."""
        return Meter(model, device, amp_dtype)

    def save_outputs(self, run: "Run") -> Path:
        """The adapter in PEFT's format (or the full model), merged if asked (``outputs.save_outputs``)."""
        from deltatune.train.outputs import save_outputs

        return save_outputs(run.model, run.tokenizer, run.args, run.data, run.out, run.train_data)


def static_shape(args, data, train_data) -> tuple[int, int] | None:
    """(rows, width) for every micro-batch of packed rows under --cuda-graphs (graphs replay only the
    shapes they captured): --micro-batch rows of --max-length tokens. None where shapes vary anyway (one
    example a row, or a token budget that sets the rows per step)."""
    if not (args.cuda_graphs and train_data.packed and not args.tokens_per_step):
        return None
    return args.micro_batch, max(data.max_length, max(len(ex["input_ids"]) for ex in train_data.examples))


def width_buckets(args, data, train_data, device) -> tuple[int, int] | None:
    """(multiple, cap) of ``TokenObjective``'s widths for a run on ``device``: on CUDA, rows of one example
    each padded to a multiple of ``WIDTH_MULTIPLE`` tokens, at most --max-length (or the longest example).

    A step whose width no earlier step had pays one-off work on a GPU (cuDNN's attention, which PyTorch
    prefers on Hopper, builds its plans per shape). With SST-2's batches of 32 sentences 23 of the 100
    timed steps of bench/bench_overhead.py had a new width, and on the H200 more than a tenth of the steps
    took ~190 ms against a median of 30 (docs/speed_notes.md, session 12; the cause is to be confirmed
    there). Buckets leave at most ``max_length / 16`` widths. The padding is masked and carries no labels:
    the loss is the same. None on the CPU (nothing is set up per shape there; padding only costs), for
    packed rows, and under a token budget (which sizes micro-batches by their padded tokens)."""
    if device.type != "cuda" or train_data.packed or args.tokens_per_step:
        return None
    return WIDTH_MULTIPLE, data.max_length or max(len(ex["input_ids"]) for ex in train_data.examples)


def token_objective(task: str, tokenizer, args, data, train_data, device) -> TokenObjective:
    """A run's default objective: ``TokenObjective`` with the tokenizer's pad id (0 without one), static
    shapes for CUDA graphs (``static_shape``) and width buckets on a GPU (``width_buckets``)."""
    return TokenObjective(task, getattr(tokenizer, "pad_token_id", None) or 0,
                          static=static_shape(args, data, train_data),
                          widths=width_buckets(args, data, train_data, device))
