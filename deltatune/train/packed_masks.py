"""transformers' packed-row detection, answered from the host copy of the batch.

Given ``position_ids`` and no padding mask, transformers finds the examples of a packed row on the
device (``masking_utils.find_packed_sequence_indices``) and then branches on the result in Python, so
every forward of a packed micro-batch makes the host wait for the GPU. The training step knows the
rows on the host already: ``host_packing(position_ids)`` computes the same answer there (the same
function of the same numbers) and, while it is active, transformers reads it instead of asking the
GPU. Outside the context, or for a call with other positions, the original function runs.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["host_packing", "packed_sequence_indices"]

_KNOWN: contextvars.ContextVar = contextvars.ContextVar("deltatune_packed_rows", default=None)
_PATCHED = False


def packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Each token's example index within its row ((B, T), from 0), or None if every row is one example:
    what ``transformers.masking_utils.find_packed_sequence_indices`` returns, for a host tensor."""
    first = position_ids[:, :1] - 1
    indices = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    return None if bool((indices[:, -1] == 0).all()) else indices


@contextlib.contextmanager
def host_packing(position_ids: torch.Tensor | None, device):
    """While active, transformers' packed-row detection for these ``position_ids`` (a host tensor; the
    model gets its copy on ``device``) takes the answer computed here, already on ``device``."""
    if position_ids is None or not _patch():
        yield
        return
    indices = packed_sequence_indices(position_ids)
    if indices is not None:
        indices = indices.to(device, non_blocking=True)
    token = _KNOWN.set((tuple(position_ids.shape), indices))
    try:
        yield
    finally:
        _KNOWN.reset(token)


def _patch() -> bool:
    """Route transformers' detection through ``_detect`` (once); False where this transformers has none."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return False

    def _detect(position_ids):
        known = _KNOWN.get()
        if known is not None and tuple(position_ids.shape) == known[0]:
            return known[1]
        return original(position_ids)

    _detect.__wrapped__ = original
    masking_utils.find_packed_sequence_indices = _detect
    _PATCHED = True
    return True
