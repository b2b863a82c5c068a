"""The paged KV cache: fixed-size blocks of keys and values, a block table per sequence.

A sequence's keys and values live in blocks of ``block_size`` token slots (16 by default) taken
from one free list; its block table lists them in order, so token ``p`` of the sequence sits in
slot ``table[p // block_size] * block_size + p % block_size`` (the vLLM / PagedAttention layout,
Kwon et al. 2023, Sec. 4.1). Blocks return to the free list when the sequence ends, so memory is
never fragmented and a finished request frees exactly what it held.

How many blocks exist is decided once, from a memory budget (``plan_num_blocks``): an explicit
``num_blocks``, or on a GPU a fraction of its memory less what is already allocated (weights,
resident adapters). Requests that can never fit are refused by the scheduler, never by an OOM.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CacheFullError", "PagedKVCache", "plan_num_blocks", "bytes_per_block"]


class CacheFullError(RuntimeError):
    """No free block is left for a sequence that needs one (the scheduler preempts or waits)."""


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes that one block of keys and values takes over all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def plan_num_blocks(per_block: int, device: torch.device, num_blocks: int | None = None,
                    gpu_memory_fraction: float = 0.9, cpu_cache_bytes: int = 1 << 30,
                    reserve_bytes: int = 0, adapter_bytes: int = 0, graph_bytes: int = 0) -> int:
    """How many cache blocks to allocate.

    ``num_blocks`` given: that many. On CUDA: ``gpu_memory_fraction`` of the device's memory, less
    what this process has allocated (weights, adapter slots already allocated), ``reserve_bytes``
    (activations of a step), ``adapter_bytes`` (adapter-pool slots still to be allocated) and
    ``graph_bytes`` (decode CUDA graphs still to be captured), divided by ``per_block``. Elsewhere:
    ``cpu_cache_bytes`` less the same three, so cache, activations, pool and graphs fit that budget
    together. Raises ValueError when the budget leaves no block.
    """
    if num_blocks is not None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return int(num_blocks)
    if device.type == "cuda":
        if not 0.0 < gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
        _, total = torch.cuda.mem_get_info(device)
        budget = (gpu_memory_fraction * total - torch.cuda.memory_reserved(device) - reserve_bytes - adapter_bytes
                  - graph_bytes)
        where = (f"gpu_memory_fraction={gpu_memory_fraction} of {total / 2**30:.1f} GiB, "
                 f"{torch.cuda.memory_reserved(device) / 2**30:.1f} GiB already in use")
    else:
        budget = cpu_cache_bytes - reserve_bytes - adapter_bytes - graph_bytes
        where = f"cpu_cache_bytes={cpu_cache_bytes}"
    where += (f", {reserve_bytes / 2**20:.0f} MiB for a step's activations"
              + (f", {adapter_bytes / 2**20:.0f} MiB for adapter-pool slots" if adapter_bytes else "")
              + (f", {graph_bytes / 2**20:.0f} MiB for decode CUDA graphs" if graph_bytes else ""))
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(f"no memory is left for the KV cache ({where}; one block takes {per_block} bytes): "
                         f"raise the budget or pass num_blocks")
    return blocks


class PagedKVCache:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size`` tokens, and the
    block tables of the sequences that hold them.

    ``keys[layer]`` and ``values[layer]`` have shape (num_blocks, block_size, num_kv_heads, head_dim).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block is handed out first
        self._refs = [0] * num_blocks  # sequences whose tables hold each block (beams share full blocks)
        self.tables: dict[int, list[int]] = {}
        self.held = 0  # blocks taken for the cache's lifetime (``hold``): no request can ever use them

    # -- block accounting ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        """Blocks that sequences can ever have: all but the ``held`` ones."""
        return self.num_blocks - self.held

    @property
    def capacity_tokens(self) -> int:
        """Tokens the usable blocks hold (one sequence alone can use all of them)."""
        return self.usable_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks sequence ``seq_id`` still has to take to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_hold(self, seq_id: int, num_tokens: int) -> bool:
        return self.extra_blocks(seq_id, num_tokens) <= len(self._free)

    def reserve(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table.
        Raises CacheFullError (taking nothing) when too few blocks are free."""
        need = self.extra_blocks(seq_id, num_tokens)
        if need > len(self._free):
            raise CacheFullError(f"sequence {seq_id} needs {need} more blocks, {len(self._free)} are free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            block = self._free.pop()
            self._refs[block] = 1
            table.append(block)
        return table

    def hold(self, seq_id: int, num_blocks: int = 1) -> list[int]:
        """Give ``seq_id`` ``num_blocks`` more blocks for the cache's lifetime (the decode graphs' scratch block):
        they leave ``usable_blocks``, so the scheduler never admits a request that could only fit with them.
        Raises CacheFullError (taking nothing) when too few are free."""
        table = self.reserve(seq_id, (len(self.tables.get(seq_id, ())) + num_blocks) * self.block_size)
        self.held += num_blocks
        return table

    def free(self, seq_id: int) -> int:
        """Drop ``seq_id``'s blocks (to the free list once no other sequence shares them); returns how many
        its table held (0 for an unknown id)."""
        table = self.tables.pop(seq_id, [])
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        return len(table)

    def fork(self, parent: int, child: int, num_tokens: int) -> int:
        """Give ``child`` (no blocks yet) the keys and values of ``parent``'s first ``num_tokens`` tokens:
        full blocks are shared (they are never written again), a partly filled last block is copied
        into a free block, or left out when none is free. Returns how many tokens ``child`` now holds."""
        if child in self.tables:
            raise ValueError(f"sequence {child} already holds blocks")
        size, table = self.block_size, self.tables.get(parent, [])
        full = min(num_tokens // size, len(table))
        shared = table[:full]
        for block in shared:
            self._refs[block] += 1
        self.tables[child] = list(shared)
        held = full * size
        if num_tokens > held and full < len(table) and self._free:
            src, dst = table[full], self._free.pop()
            self._refs[dst] = 1
            for layer in range(len(self.keys)):
                self.keys[layer][dst].copy_(self.keys[layer][src])
                self.values[layer][dst].copy_(self.values[layer][src])
            self.tables[child].append(dst)
            held = num_tokens
        return held

    # -- reading and writing ---------------------------------------------------------------------------
    def slots(self, seq_id: int, start: int, count: int) -> list[int]:
        """Flat slot indices of tokens ``start .. start+count-1`` of ``seq_id`` (its blocks reserved)."""
        table, size = self.tables[seq_id], self.block_size
        return [table[p // size] * size + p % size for p in range(start, start + count)]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values (T, num_kv_heads, head_dim) of T tokens at flat ``slots`` (T,)."""
        flat = (-1,) + tuple(self.keys[layer].shape[2:])
        self.keys[layer].view(flat).index_copy_(0, slots, k.to(self.keys[layer].dtype))
        self.values[layer].view(flat).index_copy_(0, slots, v.to(self.values[layer].dtype))

    def block_table_tensor(self, seq_ids: list[int], device: torch.device) -> torch.Tensor:
        """(S, max blocks) block tables of ``seq_ids``, padded with block 0 (masked out by the reader)."""
        width = max(len(self.tables[s]) for s in seq_ids)
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sequences whose block tables are ``tables`` (S, B), each
        (S, B * block_size, num_kv_heads, head_dim), in token order (padding past each length)."""
        k, v = self.keys[layer][tables], self.values[layer][tables]  # (S, B, block, kvh, d)
        return k.flatten(1, 2), v.flatten(1, 2)
