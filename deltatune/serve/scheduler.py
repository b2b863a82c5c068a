"""Continuous batching: which tokens of which sequences the next step computes.

Every step the scheduler fills a token budget (``max_num_batched_tokens``): first the running
sequences, oldest first (a decode token each, or the next chunk of a prompt still prefilling), then
waiting requests in arrival order while blocks, budget and ``max_num_seqs`` allow; a request whose
adapter cannot run yet (an adapter pool's slots all held by the running requests' adapters, or its load
still in flight: ``adapter_ready``) is passed by later ones and keeps its place. A long prompt is
thus prefilled in chunks beside other sequences' decode steps (chunked prefill, as in Sarathi and
vLLM V1), and requests join and leave between any two steps (Orca's iteration-level scheduling).

When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it waits at the head of the queue to be recomputed from its prompt and
the tokens it has generated (vLLM's recompute preemption). A request that could not fit even
alone in the whole cache, or whose prompt reaches the model's length, is refused when it is added.

Beams of a beam-search request (``serve/beam.py``) are sequences too; a beam whose logits wait for
its siblings' has nothing to compute ("held") and is skipped. A held beam chosen for preemption, or
every held beam when a step would otherwise compute nothing while requests wait, is parked: its blocks
are freed but it is not queued, since its logits are already taken; the engine queues it again
(``unpark``) if it goes on, to be recomputed. ``fork`` starts a new beam from its parent's blocks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from deltatune.serve.kv_cache import PagedKVCache
from deltatune.serve.model_runner import Chunk
from deltatune.serve.sampling import SamplingParams

__all__ = ["RequestRefused", "Sequence", "Scheduler"]


class RequestRefused(ValueError):
    """A request the engine can never serve (too long for the cache or the model); the message says why."""


@dataclass
class Sequence:
    """One request: its prompt, settings, generated tokens and how much of it the cache holds."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens (prompt, then output) whose keys and values are in the cache."""
    status: str = "waiting"
    """"waiting", "running" or "finished"."""
    finish_reason: str | None = None
    """"stop" (EOS, a stop token or string), "length" (max_new_tokens or the model's length)."""
    generator: torch.Generator | None = None
    text: str = ""
    """Decoded output so far (cut before a stop string)."""
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    virtual: str | None = None
    """The prompt-method adapter whose virtual tokens start ``prompt_ids`` (``adapter`` is then None: the base
    weights), or None."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        return [self.token(i) for i in range(start, stop)]


class Scheduler:
    """Waiting and running sequences over one paged cache; ``schedule()`` plans a step."""

    def __init__(self, cache: PagedKVCache, max_num_batched_tokens: int = 512, max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_adapters=None, adapter_ready=None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.cache = cache
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.max_model_len = max_model_len or cache.capacity_tokens
        # distinct adapters the running sequences may name (an adapter pool's slots): an int, a callable
        # giving it (the pool's capacity can change as adapters register), or None for no limit
        self.max_adapters = max_adapters
        # adapter name -> whether its slot is loaded (an adapter pool's ``ready``), or None: always. A request
        # whose adapter is still being copied is not admitted yet, so the step it would join does not wait
        # for the copy and neither do the running sequences in that step
        self.adapter_ready = adapter_ready
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def max_tokens(self, seq: Sequence) -> int:
        """Tokens (prompt and output) ``seq`` may reach."""
        return min(len(seq.prompt_ids) + seq.params.max_new_tokens, self.max_model_len)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raises RequestRefused when it can never be served."""
        n = len(seq.prompt_ids)
        if n == 0:
            raise RequestRefused("the prompt is empty: give at least one token")
        if n >= self.max_model_len:
            raise RequestRefused(f"the prompt has {n} tokens; the model takes at most {self.max_model_len} "
                                 f"(max_model_len), with room for one generated token")
        need = self.cache.blocks_for(self.max_tokens(seq))
        if need > self.cache.usable_blocks:
            raise RequestRefused(
                f"the request needs up to {self.max_tokens(seq)} tokens ({n} prompt + max_new_tokens "
                f"{seq.params.max_new_tokens}) = {need} KV blocks of {self.cache.block_size}; the cache holds "
                f"{self.cache.usable_blocks} blocks for requests ({self.cache.capacity_tokens} tokens): lower "
                f"max_new_tokens, "
                f"shorten the prompt or give the cache more memory (gpu_memory_fraction / num_blocks)")
        seq.status = "waiting"
        self.waiting.append(seq)

    def schedule(self) -> list[Chunk]:
        """The chunks of the next step (at most the token budget); blocks for them are reserved."""
        chunks = self._plan()
        head = self.waiting[0].adapter if self.waiting else None
        loading = head is not None and self.adapter_ready is not None and not self.adapter_ready(head)
        if not chunks and self.waiting and not loading:  # only held beams run and they block the queue: make room
            for seq in [s for s in self.running if s.num_computed >= s.num_tokens]:
                self.park(seq)
            chunks = self._plan()
        return chunks

    def _plan(self) -> list[Chunk]:
        budget, chunks, planned = self.max_num_batched_tokens, [], set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != "running":  # preempted below, earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n == 0:  # a held beam
                continue
            while not self.cache.can_hold(seq.seq_id, seq.num_computed + n):
                others = [s for s in reversed(self.running) if s.seq_id not in planned]
                victim = next((s for s in others if s.num_computed >= s.num_tokens), others[0])  # held beams first
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status != "running":
                continue
            chunks.append(self._chunk(seq, n))
            planned.add(seq.seq_id)
            budget -= n
        cap = self.max_adapters() if callable(self.max_adapters) else self.max_adapters
        adapters = {s.adapter for s in self.running if s.adapter is not None}
        passed = []  # requests whose adapter cannot run yet: later ones go ahead of them, they keep their place
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(passed) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.cache.can_hold(seq.seq_id, seq.num_computed + n):
                break  # first come, first served: later requests wait behind it
            if seq.adapter is not None and seq.adapter not in adapters and (
                    (cap is not None and len(adapters) >= cap)  # its adapter needs a slot the running ones hold
                    or (self.adapter_ready is not None and not self.adapter_ready(seq.adapter))):  # still loading
                passed.append(self.waiting.popleft())  # as vLLM does with LoRA requests over max_loras
                continue
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            self.waiting.popleft()
            seq.status = "running"
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(passed))
        return chunks

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        start = seq.num_computed
        self.cache.reserve(seq.seq_id, start + n)
        return Chunk(seq.seq_id, seq.tokens(start, start + n), start, seq.adapter,
                     want_logits=start + n == seq.num_tokens)

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to be recomputed (its output so far is kept);
        a held beam is parked instead."""
        if seq.num_computed >= seq.num_tokens:
            return self.park(seq)
        self.cache.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed, seq.status = 0, "waiting"
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def park(self, seq: Sequence) -> None:
        """Free a held beam's blocks and take it off the running list, unqueued (see the module's doc)."""
        self.cache.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed, seq.status = 0, "parked"
        seq.preemptions += 1
        self.num_preemptions += 1

    def unpark(self, seq: Sequence) -> None:
        """Queue a parked beam first, to be recomputed."""
        seq.status = "waiting"
        self.waiting.appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start beam ``child`` (``parent``'s tokens and one more) from ``parent``'s cached blocks; it runs
        at once when the cache held any of them and ``max_num_seqs`` allows, else it is queued first."""
        held = self.cache.fork(parent.seq_id, child.seq_id, parent.num_computed if parent.status == "running" else 0)
        if held and len(self.running) < self.max_num_seqs:
            child.num_computed, child.status = held, "running"
            self.running.append(child)
        else:
            self.cache.free(child.seq_id)
            child.num_computed, child.status = 0, "waiting"
            self.waiting.appendleft(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (running or waiting) and free its blocks."""
        self.cache.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.finish_time = "finished", reason, time.perf_counter()
