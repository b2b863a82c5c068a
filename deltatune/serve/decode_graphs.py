"""Decode steps replayed from CUDA graphs: one launch for the whole model where Python launched hundreds.

A decode step (every scheduled chunk one token of a running sequence) is launch-bound: on an H200 the
1B projections of 64 rows take 2.7 ms of GPU time, while the step spends far more in Python. A step
of ``B`` rows runs instead as the replay of a graph captured for a bucket of rows (the next power of
two, ``rows_bucket``), with or without the adapter pool's launches. Every graph's block tables have one
width, the most blocks a sequence can hold (``table_width``: the engine's max model length, the cache's
blocks), so buckets do not grow with the contexts. The step's ids, positions and KV slots, then its
context lengths and the used columns of its block tables, are copied into the graph's static inputs (two
host-to-device copies), the
adapter pool writes the rows' slots into the table its kernels read (``AdapterPool.prepare``, the same
buffer the capture saw; after the pool drops its slots for larger ones, ``AdapterPool.generation``, the
graphs with its launches are captured again), and the graph replays into one logits buffer that all
graphs share. Rows beyond ``B`` are padding: token 0 at position 0, its key and value written to a
scratch block the cache keeps for them, attending to that one key; their logits are dropped.

Table entries past a row's length are never read: the paged attention kernel loads only positions below
each length, the PyTorch reference zeroes what its gather read past it (``kernels/paged_attention.py``).
So the columns a step does not use keep whatever block ids an earlier step left there (valid ids, never
read), and a step copies only as many columns as its longest table.

Where a step is not graphed (it runs through ``ModelRunner.forward`` as before): a step with a prefill
chunk, more rows than the largest bucket, a table wider than the graphs' width, adapters on the model
itself (routed by the PyTorch reference, whose shapes follow the rows), a device that is not CUDA
(``capture=False`` runs the same static path eagerly: what the CPU tests compare), or after a capture
failed (turned off, with a warning). A graph reads the pool's stacked slots in place; loading another
adapter into a slot copies into them, so graphs stay valid while adapters come and go. The pool's decode
kernel is the gathered one for any mix of rows (``PoolCall`` forced to it), so a replay never meets a
layout it was not captured with; forced gathered, it runs in two phases per projection (a split-K shrink
into a buffer the pool keeps per row count, then the expand: ``kernels.bgmv_split``), where eager decode
runs the one-launch kernel that saves host time; the same bits either way. ``DELTATUNE_BGMV_PHASES=1|2``
overrides the choice (``serve.pool_call.decode_phases``), for A/B runs.

One width costs the attention nothing where its splits follow each row's length (the kernel's default,
``kernels.triton_paged_attention.launch_plan``); with splits sized from the width (8192 positions at the
1B bench's max_model_len) a step of 8 to 48 rows ran each ~600-token context in one program, 10 tiles in a
row instead of 4-5. ``DELTATUNE_DECODE_GRAPH_WIDTH=bucketed`` keys the graphs by the step's width bucket
too (``model_runner.blocks_bucket``, the design before one width), for A/B runs; default ``one``.

Memory (``planned_bytes``, set aside in the engine's plan before the KV cache is sized): the shared
logits buffer, every bucket's static inputs, and the graphs' private memory pool, estimated as the sum
of each bucket's step peak (formula in ``planned_bytes``).
"""

from __future__ import annotations

import os
import warnings
from array import array
from dataclasses import dataclass

import torch

from deltatune.serve.kv_cache import PagedKVCache
from deltatune.serve.model_runner import Chunk, ModelRunner, blocks_bucket

__all__ = ["DecodeGraphs", "default_on", "graph_widths", "planned_bytes", "rows_bucket", "table_width", "width_mode"]

SCRATCH = -1
"""The cache's sequence id of the scratch block that padding rows write to."""


def default_on(device: torch.device, max_model_len: int | None, num_blocks: int | None = None) -> bool:
    """Whether an engine replays decode steps from graphs when not told (``Engine(cuda_graphs=None)``): on a
    CUDA device where the graphs' block-table width is known (``table_width``). On an H200 (docs/benchmarks.md,
    sessions 12 and 14) graphed decode served the 1B Poisson stream at 1.17x the eager base's tokens/s and the
    adapter pool at 1.37x its eager self, with the same tokens (tests/test_decode_graphs.py)."""
    return device.type == "cuda" and (max_model_len is not None or num_blocks is not None)


def rows_bucket(rows: int) -> int:
    """The rows a decode graph is captured for: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def table_width(max_model_len: int | None, block_size: int, num_blocks: int | None = None) -> int:
    """The block-table width of every decode graph: the blocks a sequence of ``max_model_len`` tokens holds,
    at most the cache's ``num_blocks`` less the scratch block (None: not known yet, the first bound alone).
    Raises ValueError when neither bounds it."""
    bounds = [] if max_model_len is None else [-(-max_model_len // block_size)]
    bounds += [] if num_blocks is None else [num_blocks - 1]
    if not bounds:
        raise ValueError("decode CUDA graphs need the longest sequence: give Engine max_model_len (the model's "
                         "config has no max_position_embeddings) or num_blocks")
    return max(1, min(bounds))


def width_mode() -> str:
    """``DELTATUNE_DECODE_GRAPH_WIDTH``: 'one' (default; every graph at ``table_width``) or 'bucketed' (a graph
    per step's width bucket as well). Raises ValueError on another value."""
    mode = os.environ.get("DELTATUNE_DECODE_GRAPH_WIDTH", "one")
    if mode not in ("one", "bucketed"):
        raise ValueError(f"DELTATUNE_DECODE_GRAPH_WIDTH must be 'one' or 'bucketed', got {mode!r}")
    return mode


def graph_widths(width: int, mode: str) -> list[int]:
    """The block-table widths graphs may be captured at for tables of at most ``width`` blocks: ``[width]``
    ('one'), or every ``blocks_bucket`` of 1 .. width blocks (1, 2, 4 .. the bucket of ``width``)."""
    if mode == "one":
        return [width]
    return [1 << i for i in range(blocks_bucket(width).bit_length())]


SEGMENTS = (2 << 20) + (20 << 20)
"""Bytes a captured bucket may leave partly used in CUDA's caching allocator: one 2 MiB segment (allocations
under 1 MiB) and one 20 MiB segment (under 10 MiB)."""


def planned_bytes(runner: ModelRunner, max_rows: int, width: int, block_size: int) -> int:
    """Bytes to set aside for the decode graphs of ``runner``, for steps of up to ``max_rows`` rows and block
    tables of at most ``width`` blocks: an estimate meant as an upper bound. With R = ``rows_bucket(max_rows)``,
    V the vocabulary, H the hidden size, I the MLP's, s the model dtype's bytes, and w over the widths graphs
    are captured at (``graph_widths(width, width_mode())``: ``width`` alone, or 1, 2, 4 .. bucketed),
    C = w x block_size:

    * logits: R x V x 4 (float32), one buffer all graphs write into;
    * static inputs: 3 x 8 + (1 + w) x 4 bytes a row, per bucket of r = 1, 2, 4 .. R rows and width w, with
      and without the pool: 2 x (2R - 1) rows a width;
    * the graphs' private pool: the sum over r = 1, 2, 4 .. R and every w of a step's peak at r rows,
      r x 4 x (6H + 3I) (the engine's per-token activation count) + r x V x s (the head's output before the
      float32 copy) + attention (the Triton kernel's split partials, r x Hq x splits x (D + 2) x 4, splits
      from its ``launch_plan``; or, where the PyTorch reference runs, its gather at full width,
      r x C x (2 (Hkv + Hq) D s + 8 Hq + 5)), plus on CUDA the allocator's ``SEGMENTS`` per bucket. Summed,
      not the largest alone: a bucket captured after a smaller one cannot always reuse the smaller one's
      blocks. Captures with and without the pool at one bucket allocate the same sizes and reuse each
      other's (the logits are outside the pool, so nothing a capture allocated stays live after it).
    """
    from deltatune.kernels import backend

    config = runner.config
    H = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * H)
    V, s = runner.head.weight.shape[0], torch.empty((), dtype=runner.dtype).element_size()
    Hq, Hkv, D = runner.num_heads, runner.num_kv_heads, runner.head_dim
    R = rows_bucket(max_rows)
    kernel = backend.triton_enabled(torch.empty(0, device=runner.device))
    if kernel:
        kernels = backend.load("deltatune.kernels.triton_paged_attention")
    total = R * V * 4
    for w in graph_widths(width, width_mode()):
        C = w * block_size
        total += 2 * (2 * R - 1) * (3 * 8 + (1 + w) * 4)
        r = 1
        while r <= R:
            if kernel:
                splits = kernels.launch_plan(r, Hkv, C)[0]
                attention = r * Hq * splits * (D + 2) * 4 if splits > 1 else 0
            else:
                attention = r * C * (2 * (Hkv + Hq) * D * s + 8 * Hq + 5)
            total += r * 4 * (6 * H + 3 * inter) + r * V * s + attention
            total += SEGMENTS if runner.device.type == "cuda" else 0
            r *= 2
    return total


@dataclass
class _StaticDecode:
    """What ``ModelRunner._attention`` reads of the decode rows (``_Decode``'s fields), as static tensors."""

    tokens: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor


class _Graph:
    """One captured decode step: its static inputs. ``ints`` holds each row's length, then its block table."""

    def __init__(self, rows: int, width: int, device: torch.device):
        self.rows, self.width = rows, width
        self.longs = torch.zeros(3, rows, dtype=torch.long, device=device)  # ids, positions, KV slots
        self.ints = torch.zeros(rows, 1 + width, dtype=torch.int32, device=device)  # (rows, length + table)
        self.decode = _StaticDecode(torch.arange(rows, device=device), self.ints[:, 0], self.ints[:, 1:])
        self.graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Runs decode steps of ``runner`` through graphs per (rows bucket, pooled or not) at one table width
    (``DELTATUNE_DECODE_GRAPH_WIDTH=bucketed``: per (rows bucket, width bucket, pooled)); other steps through
    ``runner.forward``. ``pool``: the engine's adapter pool (None: base model and no
    adapters); ``max_rows``: the largest batch the scheduler makes; ``max_model_len``: the most tokens a
    sequence may reach (None: as many as the cache holds), which sets the width; ``capture``: False runs
    the static path without graphs."""

    def __init__(self, runner: ModelRunner, cache: PagedKVCache, pool=None, max_rows: int = 256,
                 max_model_len: int | None = None, capture: bool | None = None):
        self.runner, self.cache, self.pool = runner, cache, pool
        self.max_rows = rows_bucket(max_rows)
        self.capture = runner.device.type == "cuda" if capture is None else capture
        self.mode = width_mode()
        self.graphs: dict[tuple, _Graph] = {}  # (rows, pooled), or (rows, width, pooled) bucketed
        self._generation = getattr(pool, "generation", 0)  # of the pool's slots the pooled graphs read
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.off: str | None = None
        cache.hold(SCRATCH, 1)  # one block, never freed (nor usable by requests): where padding rows write
        self.scratch_block = cache.tables[SCRATCH][0]
        self.width = table_width(max_model_len, cache.block_size, cache.num_blocks)
        # (max_rows, vocab) float32: every graph writes its rows' logits here, so no logits stay in the pool
        self.logits = torch.empty(self.max_rows, runner.head.weight.shape[0], dtype=torch.float32,
                                  device=runner.device)

    def applies(self, chunks: list[Chunk]) -> bool:
        """Whether this step runs graphed: decode rows only, few enough, tables within the width, routed by
        the pool or no adapters."""
        if self.off or not chunks or len(chunks) > self.max_rows:
            return False
        if any(len(c.token_ids) != 1 or not c.want_logits for c in chunks):
            return False
        if any(len(self.cache.tables[c.seq_id]) > self.width for c in chunks):
            return False  # never under the engine's scheduler (max_model_len bounds every table)
        virtual = self.runner.virtual
        if virtual is not None and any(c.token_ids[0] >= virtual.vocab_size for c in chunks):
            return False  # a prompt's last chunk of one virtual token: embedded (and a prefix's K/V) eagerly
        own = getattr(self.runner.model, "peft_config", None) or _own_adapters(self.runner.model)
        return not own and (self.pool is not None or all(c.adapter is None for c in chunks))

    @torch.no_grad()
    def forward(self, chunks: list[Chunk], cache: PagedKVCache) -> torch.Tensor:
        """The logits (B, vocab), float32, of the step: graphed where ``applies``, else ``runner.forward``.
        Graphed logits are a view of the shared buffer: the next graphed step overwrites them."""
        if not self.applies(chunks):
            return self.runner.forward(chunks, cache)
        rows = rows_bucket(len(chunks))
        names = [c.adapter for c in chunks] + [None] * (rows - len(chunks))
        pooled = self.pool is not None and any(n is not None for n in names)
        if pooled and getattr(self.pool, "generation", 0) != self._generation:
            self._drop_pooled()  # the pool reallocated its slots: the graphs over the old ones are stale
        # a step without adapters is captured without the pool's launches
        if self.mode == "one":
            width, key = self.width, (rows, pooled)
        else:
            width = blocks_bucket(max(len(cache.tables[c.seq_id]) for c in chunks))
            key = (rows, width, pooled)
        g = self.graphs.get(key)
        if g is None:
            g = _Graph(rows, width, self.runner.device)
            self._fill(g, chunks, cache)
            if not self.capture:
                self.graphs[key] = g
                return self._run(g, names, pooled)[: len(chunks)]
            try:
                self._capture(g, names, pooled)
            except Exception as e:  # an op that cannot be captured: run eagerly from now on, say why
                self.off = f"capture failed: {type(e).__name__}: {str(e)[:200]}"
                warnings.warn(f"deltatune serve: decode CUDA graphs off ({self.off})", stacklevel=2)
                torch.cuda.synchronize()
                return self.runner.forward(chunks, cache)
            self.graphs[key] = g
        else:
            self._fill(g, chunks, cache)
        if not self.capture:
            return self._run(g, names, pooled)[: len(chunks)]
        if pooled:
            self.pool.prepare(names)  # the rows' slots into the table the captured kernels read
        g.graph.replay()
        return self.logits[: len(chunks)]

    def _drop_pooled(self) -> None:
        """Forget the graphs captured with the pool's launches (they read the addresses of slots the pool has
        since dropped for larger ones); they are captured again on their next step. Their private memory stays
        in the graphs' pool for the new captures."""
        self.graphs = {k: g for k, g in self.graphs.items() if not k[-1]}
        self._generation = self.pool.generation

    def _fill(self, g: _Graph, chunks: list[Chunk], cache: PagedKVCache) -> None:
        """Copy the step's inputs into ``g``'s static tensors, padding rows after the real ones: every row's
        length and the first ``used`` columns of its table (the longest table's blocks; a shorter table
        padded with the scratch block). Later columns keep an earlier step's block ids, never read."""
        pad = g.rows - len(chunks)
        size, scratch = cache.block_size, self.scratch_block
        tables = [cache.tables[c.seq_id] for c in chunks]
        used = max(map(len, tables))
        longs = array("q", [c.token_ids[0] for c in chunks])  # ids, positions, KV slots (cache.slots' rule)
        longs.extend([0] * pad)
        longs.extend([c.start for c in chunks])
        longs.extend([0] * pad)
        longs.extend([t[c.start // size] * size + c.start % size for c, t in zip(chunks, tables)])
        longs.extend([scratch * size] * pad)
        ints = array("i")
        for c, t in zip(chunks, tables):
            ints.append(c.start + 1)
            ints.extend(t)
            ints.extend([scratch] * (used - len(t)))
        ints.extend(([1] + [scratch] * used) * pad)  # padding rows: length 1, the scratch block
        # arrays, not lists: torch.tensor of a list of B x (1 + used) ints took ~0.2 ms of a step's host time
        longs = torch.frombuffer(longs, dtype=torch.long).view(3, g.rows)
        ints = torch.frombuffer(ints, dtype=torch.int32).view(g.rows, 1 + used)
        if g.longs.is_cuda:
            longs, ints = longs.pin_memory(), ints.pin_memory()
        g.longs.copy_(longs, non_blocking=True)
        g.ints[:, : 1 + used].copy_(ints, non_blocking=True)

    def _routing(self, names: list[str | None], pooled: bool):
        """The step's routing context: the pool's (its gathered kernel for any rows, in two phases unless
        ``DELTATUNE_BGMV_PHASES=1``; the rows' slots uploaded on entry, outside any capture), or none."""
        return self.pool.routed(self.runner.model, names, gathered=True) if pooled else _no_routing()

    def _compute(self, g: _Graph) -> torch.Tensor:
        """The step on ``g``'s static inputs (inside the routing context): logits (rows, vocab), float32."""
        r = self.runner
        h = r.hidden(g.longs[0], g.longs[1], g.longs[2], g.decode, None, self.cache)
        out = self.logits[: g.rows]
        out.copy_(r.head(h))  # into the shared buffer (float32): the head's output is freed in the pool
        return out

    def _run(self, g: _Graph, names: list[str | None], pooled: bool) -> torch.Tensor:
        with self._routing(names, pooled):
            return self._compute(g)

    def _capture(self, g: _Graph, names: list[str | None], pooled: bool) -> None:
        """Warm up (Triton compiles, cuBLAS handles, the pool's per-layer kernel objects) on a side stream,
        then capture the step into ``g``. The routing context is entered outside the capture, so the
        upload of the rows' slots is not recorded (``AdapterPool.prepare`` does it before each replay)."""
        device = self.runner.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(g, names, pooled)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with self._routing(names, pooled):
            with torch.cuda.graph(graph, pool=self.mempool, stream=stream):
                self._compute(g)
        g.graph = graph


class _no_routing:
    """A context that routes nothing (the model without adapters)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _own_adapters(model) -> bool:
    """Whether ``model`` carries adapters of its own (routed by the PyTorch reference, not graphable)."""
    from deltatune.adapters import list_adapters

    return bool(list_adapters(model))
