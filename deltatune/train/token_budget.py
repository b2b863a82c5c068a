"""Batching by token budget (``--tokens-per-step``): every micro-batch takes, in the sampling order, as
many examples (or packed rows) as fit in ``tokens_per_step / grad_accum`` padded tokens, so steps carry
nearly the same work whatever the lengths of their examples: many short sentences, or few long answers.

The order of examples is still ``data.sample_index`` (a pure function of seed and position); where
each step starts in it is found by walking the micro-batches from step 0, which is also how a resumed
run finds it: the schedule depends on the seed, the lengths and the budget only.
"""

from __future__ import annotations

import math

from deltatune.train.data import sample_index

__all__ = ["BudgetSchedule"]


class BudgetSchedule:
    """Which examples each micro-batch of each step holds under a padded-token budget."""

    def __init__(self, lengths: list[int], seed: int, tokens_per_step: int, grad_accum: int = 1):
        if tokens_per_step <= 0:
            raise ValueError(f"--tokens-per-step must be positive, got {tokens_per_step}")
        self.lengths, self.seed, self.accum = lengths, seed, grad_accum
        self.budget = max(tokens_per_step // grad_accum, 1)
        self.longest = max(lengths)
        if self.longest > self.budget:
            raise ValueError(f"--tokens-per-step {tokens_per_step} gives {self.budget} tokens a micro-batch "
                             f"(over --grad-accum {grad_accum}), fewer than the longest example ({self.longest} "
                             f"tokens); raise it to at least {self.longest * grad_accum}")
        self._starts = [0]  # the sampling position where each step starts, extended as steps are asked for

    def _micro(self, start: int) -> tuple[list[int], int]:
        """(example indices, next position) of the micro-batch starting at sampling position ``start``."""
        n = len(self.lengths)
        picked, width = [], 0
        k = start
        while True:
            i = sample_index(k, n, self.seed)
            wider = max(width, self.lengths[i])
            if picked and wider * (len(picked) + 1) > self.budget:
                return picked, k
            picked.append(i)
            width, k = wider, k + 1

    def step(self, index: int) -> list[list[int]]:
        """The example indices of each micro-batch of optimizer step ``index`` (0-based)."""
        while len(self._starts) <= index + 1:
            k = self._starts[-1]
            for _ in range(self.accum):
                _, k = self._micro(k)
            self._starts.append(k)
        micro, k = [], self._starts[index]
        for _ in range(self.accum):
            picked, k = self._micro(k)
            micro.append(picked)
        return micro

    def samples_before(self, index: int) -> int:
        """Examples drawn before step ``index``."""
        self.step(index)
        return self._starts[index]

    def steps_for_epochs(self, epochs: float) -> int:
        """Steps until ``epochs`` passes over the data have been drawn (the last step may end past it)."""
        target = math.ceil(epochs * len(self.lengths))
        index = 0
        while self.samples_before(index) < target:
            index += 1
        return max(index, 1)


def step_examples(schedule: BudgetSchedule | None, index: int, n: int, micro_batch: int, grad_accum: int,
                  seed: int) -> list[list[int]]:
    """The example indices of each micro-batch of step ``index``: by ``schedule`` under a token budget,
    else ``micro_batch`` examples each, consecutive in the sampling order."""
    if schedule is not None:
        return schedule.step(index)
    first = index * micro_batch * grad_accum
    return [[sample_index(first + i * micro_batch + j, n, seed) for j in range(micro_batch)] for i in range(grad_accum)]
