"""Decode steps replayed from CUDA graphs: one launch for the whole model where Python launched hundreds.

A decode step (every scheduled chunk one token of a running sequence) is launch-bound: on an H200 the
1B projections of 64 rows take 2.7 ms of GPU time, while the step spends far more in Python. A step
of ``B`` rows runs instead as the replay of a graph captured for a bucket of rows (the next power of
two, ``rows_bucket``) and of block-table width (``blocks_bucket``): the step's ids, positions, KV
slots, context lengths and block tables are copied into the graph's static inputs (one host-to-device
copy), the adapter pool writes the rows' slots into the table its kernels read (``AdapterPool.prepare``,
the same buffer the capture saw), and the graph replays. Rows beyond ``B`` are padding: token 0 at
position 0, its key and value written to a scratch block the cache keeps for them, attending to that
one key; their logits are dropped.

Where a step is not graphed (it runs through ``ModelRunner.forward`` as before): a step with a prefill
chunk, more rows than the largest bucket, adapters on the model itself (routed by the PyTorch
reference, whose shapes follow the rows), a device that is not CUDA (``capture=False`` runs the same
static path eagerly: what the CPU tests compare), or after a capture failed (turned off, with a
warning). A graph reads the pool's stacked slots in place; loading another adapter into a slot copies
into them, so graphs stay valid while adapters come and go. The pool's decode kernel is one gathered
launch per projection for any mix of rows (``PoolCall`` forced to it), so a replay never meets a layout
it was not captured with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from deltatune.serve.kv_cache import PagedKVCache
from deltatune.serve.model_runner import Chunk, ModelRunner, blocks_bucket

__all__ = ["DecodeGraphs", "rows_bucket"]

SCRATCH = -1
"""The cache's sequence id of the scratch block that padding rows write to."""


def rows_bucket(rows: int) -> int:
    """The rows a decode graph is captured for: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class _StaticDecode:
    """What ``ModelRunner._attention`` reads of the decode rows (``_Decode``'s fields), as static tensors."""

    tokens: torch.Tensor
    lens: torch.Tensor
    tables: torch.Tensor


class _Graph:
    """One captured decode step: its static inputs and output."""

    def __init__(self, rows: int, width: int, device: torch.device):
        self.rows, self.width = rows, width
        self.longs = torch.zeros(3, rows, dtype=torch.long, device=device)  # ids, positions, KV slots
        self.ints = torch.zeros(rows + rows * width, dtype=torch.int32, device=device)  # lengths, tables
        self.decode = _StaticDecode(torch.arange(rows, device=device), self.ints[:rows],
                                    self.ints[rows:].view(rows, width))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    """Runs decode steps of ``runner`` through graphs per (rows bucket, width bucket); other steps through
    ``runner.forward``. ``pool``: the engine's adapter pool (None: base model and no adapters); ``max_rows``:
    the largest batch the scheduler makes; ``capture``: False runs the static path without graphs."""

    def __init__(self, runner: ModelRunner, cache: PagedKVCache, pool=None, max_rows: int = 256,
                 capture: bool | None = None):
        self.runner, self.cache, self.pool = runner, cache, pool
        self.max_rows = rows_bucket(max_rows)
        self.capture = runner.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.off: str | None = None
        cache.reserve(SCRATCH, 1)  # one block, never freed: where padding rows write
        self.scratch_block = cache.tables[SCRATCH][0]

    def applies(self, chunks: list[Chunk]) -> bool:
        """Whether this step runs graphed: decode rows only, few enough, routed by the pool or no adapters."""
        if self.off or not chunks or len(chunks) > self.max_rows:
            return False
        if any(len(c.token_ids) != 1 or not c.want_logits for c in chunks):
            return False
        own = getattr(self.runner.model, "peft_config", None) or _own_adapters(self.runner.model)
        return not own and (self.pool is not None or all(c.adapter is None for c in chunks))

    @torch.no_grad()
    def forward(self, chunks: list[Chunk], cache: PagedKVCache) -> torch.Tensor:
        """The logits (B, vocab), float32, of the step: graphed where ``applies``, else ``runner.forward``."""
        if not self.applies(chunks):
            return self.runner.forward(chunks, cache)
        rows = rows_bucket(len(chunks))
        width = blocks_bucket(max(len(cache.tables[c.seq_id]) for c in chunks))
        names = [c.adapter for c in chunks] + [None] * (rows - len(chunks))
        pooled = self.pool is not None and any(n is not None for n in names)
        key = (rows, width, pooled)  # a step without adapters is captured without the pool's launches
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
        return g.logits[: len(chunks)]

    def _fill(self, g: _Graph, chunks: list[Chunk], cache: PagedKVCache) -> None:
        """Copy the step's inputs into ``g``'s static tensors, padding rows after the real ones."""
        pad = g.rows - len(chunks)
        size = cache.block_size
        ids = [c.token_ids[0] for c in chunks] + [0] * pad
        positions = [c.start for c in chunks] + [0] * pad
        slots = [cache.slots(c.seq_id, c.start, 1)[0] for c in chunks] + [self.scratch_block * size] * pad
        lens = [c.start + 1 for c in chunks] + [1] * pad
        tables = []
        for c in chunks:
            t = cache.tables[c.seq_id]
            tables += t + [0] * (g.width - len(t))
        tables += ([self.scratch_block] + [0] * (g.width - 1)) * pad
        longs = torch.tensor([ids, positions, slots], dtype=torch.long)
        ints = torch.tensor(lens + tables, dtype=torch.int32)
        if g.longs.is_cuda:
            longs, ints = longs.pin_memory(), ints.pin_memory()
        g.longs.copy_(longs, non_blocking=True)
        g.ints.copy_(ints, non_blocking=True)

    def _routing(self, names: list[str | None], pooled: bool):
        """The step's routing context: the pool's (its one gathered launch per projection for any rows; the
        rows' slots uploaded on entry, outside any capture), or none."""
        return self.pool.routed(self.runner.model, names, gathered=True) if pooled else _no_routing()

    def _compute(self, g: _Graph) -> torch.Tensor:
        """The step on ``g``'s static inputs (inside the routing context): logits (rows, vocab), float32."""
        r = self.runner
        h = r.hidden(g.longs[0], g.longs[1], g.longs[2], g.decode, None, self.cache)
        return r.head(h).float()

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
                g.logits = self._compute(g)
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
