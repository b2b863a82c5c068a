"""A training step's randomness (dropout, noise) as a pure function of the run's seed, the step and the
micro-batch, which is what makes a resumed run compute what the uninterrupted one did."""

from __future__ import annotations

import torch

__all__ = ["step_seed", "seed_generators"]


def step_seed(seed: int, step: int) -> int:
    """The seed of 0-based optimizer step ``step`` of a run seeded with ``seed`` (non-negative, < 2**63)."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def seed_generators(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a step on ``device`` draws from: the CPU's and, on
    CUDA, every GPU's. (``torch.manual_seed`` also queues seeds for XPU and MTIA, recording a stack trace
    for each: about 0.1 ms a call, and a step makes one call plus one a micro-batch.) Other devices get
    ``torch.manual_seed`` itself."""
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
