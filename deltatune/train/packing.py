"""Padding-free packing that keeps examples apart: several examples in one row, each attending only to
itself.

Examples are placed into rows of at most ``max_tokens`` tokens by best-fit decreasing (longest first,
each into the fullest row it still fits), so rows come out nearly full and a step's work nearly
constant. Each row carries ``position_ids`` that restart at 0 for every example: transformers turns
restarting positions (with no padding mask given) into a block-diagonal causal mask for SDPA / eager /
flex attention and into variable-length calls for FlashAttention, so no token attends across examples
and RoPE sees each example's own positions. The first label of every example is masked: the token
before it belongs to another example, and unpacked that first token is never predicted either. The
loss of a packed row is therefore the sum of its examples' unpacked losses (tests/test_packing.py).
"""

from __future__ import annotations

import bisect

__all__ = ["pack", "segments"]

IGNORE = -100


def pack(examples: list[dict], max_tokens: int) -> list[dict]:
    """Rows of at most ``max_tokens`` tokens holding whole examples (longer ones are cut to it).

    Each row: ``input_ids``, ``labels`` (each example's first label masked) and ``position_ids``
    (0, 1, ... per example). Deterministic: the same examples give the same rows.
    """
    if max_tokens < 2:
        raise ValueError(f"packing needs rows of at least 2 tokens, got {max_tokens}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted: the fullest row that fits is the first >= need
    for i in order:
        need = min(len(examples[i]["input_ids"]), max_tokens)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_tokens, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - need > 1:  # a row with one token left takes no example worth training on
            bisect.insort(free, (room - need, row))
    return [_row([examples[i] for i in members], max_tokens) for members in rows]


def _row(members: list[dict], max_tokens: int) -> dict:
    ids, labels, positions = [], [], []
    for ex in members:
        n = min(len(ex["input_ids"]), max_tokens)
        ids += ex["input_ids"][:n]
        labels += [IGNORE] + list(ex["labels"][1:n])  # its first token is predicted from another example
        positions += list(range(n))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row, from its restarting positions."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))
