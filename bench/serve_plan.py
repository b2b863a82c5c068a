"""What a ``bench_serve.py`` run needs, worked out before anything is built, and whether the machine has it.

A run of N registered adapters (ranks cycling through ``ranks``, LoRA on the seven projections of every
layer) with S resident needs, in the model's dtype (s bytes an element; E = the A and B elements of one
adapter per unit of rank, ``Geometry.rank_elements``):

* disk: one PEFT directory per distinct file, E x r x s bytes of safetensors each (plus a small header);
* host: every registered adapter's factors, E x r x s each (``AdapterPool.register`` keeps one host copy
  per name, also for names registered from the same file); pinned on a GPU, packed into blocks of 1 GiB
  (the pool's host arena; what a block's end cannot hold of the next adapter is lost);
* device: S slots of E x R x s + 8 bytes a layer each (R the largest rank: the pool pads every slot to
  it; ``AdapterPool.slot_bytes``), beside the weights, a step's activations (``Engine``'s reserve) and
  the KV cache, all within ``gpu_memory_fraction`` of the GPU.

``check_fit`` refuses a run that cannot fit (``PlanError`` naming each resource short, what it needs and
what there is) so that a long GPU call does not fail after writing gigabytes of adapters.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
HOST_HEADROOM = 4 * GiB  # the process itself: torch, the CUDA context, Python; not counted elsewhere
DISK_HEADROOM = 1 * GiB
ARENA_BLOCK = 1 * GiB  # deltatune.serve.pool_host.BLOCK_BYTES: pinned host blocks the pool packs adapters into

__all__ = ["Geometry", "Plan", "PlanError", "check_fit", "host_available_bytes", "disk_free_bytes", "GiB"]


class PlanError(ValueError):
    """The run cannot fit this machine; the message says which resource, what it needs and what there is."""


@dataclass(frozen=True)
class Geometry:
    """A Llama decoder's sizes (bench_serve's SHAPES tuple: hidden, intermediate, layers, heads, kv heads, vocab)."""

    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adapted projection of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def rank_elements(self) -> int:
        """Elements of A (r, in) and B (out, r) per unit of rank, over every projection of every layer."""
        return self.layers * sum(fan_in + fan_out for fan_in, fan_out in self.projections().values())

    def weight_elements(self) -> int:
        """The model's parameters (embeddings tied to the head, as bench_serve builds it; RMSNorm weights)."""
        per_layer = sum(fan_in * fan_out for fan_in, fan_out in self.projections().values()) + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_size


@dataclass(frozen=True)
class Plan:
    """The bytes of one run (see the module docstring); ``pool``: a mode with adapters runs (files, host copies,
    slots; the base modes alone need none of them)."""

    geometry: Geometry
    element_size: int
    adapters: int
    files: int
    ranks: tuple[int, ...]
    resident: int
    max_num_seqs: int
    max_num_batched_tokens: int
    seq_len: int
    pool: bool = True
    pinned: bool = False  # the host copies are pinned (a GPU run): blocks rounded up to powers of two

    def __post_init__(self):
        if self.adapters < 1 or not 1 <= self.files <= self.adapters:
            raise PlanError(f"--adapters must be >= 1 and --adapter-files between 1 and --adapters; got "
                            f"{self.adapters} adapters from {self.files} files")
        if not self.ranks or min(self.ranks) < 1:
            raise PlanError(f"--ranks must be positive integers, got {list(self.ranks)}")
        if self.resident < 1:
            raise PlanError(f"--resident must be >= 1, got {self.resident}")

    def file_rank(self, file: int) -> int:
        """Rank of adapter file ``file`` (ranks cycle over the files)."""
        return self.ranks[file % len(self.ranks)]

    def adapter_file(self, adapter: int) -> int:
        """Which file adapter ``adapter`` is registered from (names cycle over the files)."""
        return adapter % self.files

    def adapter_bytes(self, rank: int) -> int:
        """Bytes of one adapter's factors at ``rank`` (on disk, without the header; on the host)."""
        return self.geometry.rank_elements() * rank * self.element_size

    def file_bytes(self, files: list[int] | None = None) -> int:
        """Bytes of the adapter files ``files`` (default: all of them)."""
        return sum(self.adapter_bytes(self.file_rank(f)) for f in (range(self.files) if files is None else files))

    def host_bytes(self) -> int:
        """Host bytes of every registered adapter's own copy (``AdapterPool.host_bytes`` once registered)."""
        return sum(self.adapter_bytes(self.file_rank(self.adapter_file(a))) for a in range(self.adapters))

    def host_memory_bytes(self) -> int:
        """Host memory the registered adapters take: ``host_bytes``, or pinned, the blocks of the pool's host
        arena (``deltatune.serve.pool_host.HostArena``): adapters packed in registration order into blocks of
        ``ARENA_BLOCK`` bytes (a power of two, which the pinned allocator does not round further), one that
        does not fit a block's rest starting the next; 0 when no mode registers adapters (``pool`` False)."""
        if not self.pool:
            return 0
        if not self.pinned:
            return self.host_bytes()
        total = used = size = 0
        for a in range(self.adapters):
            n = self.adapter_bytes(self.file_rank(self.adapter_file(a)))
            if not size or used + n > size:
                size = max(ARENA_BLOCK, 1 << (n - 1).bit_length())
                total, used = total + size, 0
            used += n
        return total

    def slot_bytes(self) -> int:
        """Device bytes of one pool slot: every projection padded to the largest rank, + scale and rank."""
        return self.adapter_bytes(max(self.ranks)) + 8 * self.layer_count()

    def layer_count(self) -> int:
        return self.geometry.layers * len(self.geometry.projections())

    def slots_bytes(self) -> int:
        """Device bytes of the pool's ``resident`` slots (``AdapterPool.planned_bytes``)."""
        return self.resident * self.slot_bytes() if self.pool else 0

    def weights_bytes(self) -> int:
        return self.geometry.weight_elements() * self.element_size

    def activation_bytes(self) -> int:
        """What ``Engine`` sets aside for a step's activations (its formula: float32 projections of the
        batched tokens, float32 logits of the running rows, 256 MiB)."""
        g = self.geometry
        return (4 * self.max_num_batched_tokens * (6 * g.hidden + 3 * g.inter)
                + 4 * self.max_num_seqs * g.vocab + (256 << 20))

    def kv_bytes(self, sequences: int | None = None) -> int:
        """KV cache for ``sequences`` (default ``max_num_seqs``) sequences at their full length."""
        n = self.max_num_seqs if sequences is None else sequences
        return n * self.seq_len * self.geometry.kv_bytes_per_token(self.element_size)

    def as_dict(self) -> dict:
        g = self.geometry
        return {"rank_elements": g.rank_elements(), "element_size": self.element_size,
                "adapter_bytes": {str(r): self.adapter_bytes(r) for r in sorted(set(self.ranks))},
                "adapters": self.adapters, "files": self.files, "disk_bytes": self.file_bytes(),
                "host_bytes": self.host_bytes(), "host_memory_bytes": self.host_memory_bytes(),
                "slot_bytes": self.slot_bytes(), "resident": self.resident,
                "slots_bytes": self.slots_bytes(), "weights_bytes": self.weights_bytes(),
                "activation_bytes": self.activation_bytes(), "kv_bytes_all_running": self.kv_bytes()}

    def lines(self) -> list[str]:
        """The plan in words, for printing before the run."""
        per = ", ".join(f"r{r} {self.adapter_bytes(r) / 2**20:.1f} MiB" for r in sorted(set(self.ranks)))
        shared = (f"; each file registered under {self.adapters / self.files:.1f} names on average, every name its own "
                  f"host copy" if self.files < self.adapters else "")
        if not self.pool:
            return [f"plan (no adapters): weights {self.weights_bytes() / GiB:.2f} GiB, a step's activations "
                    f"{self.activation_bytes() / GiB:.2f} GiB, KV for {self.max_num_seqs} sequences of {self.seq_len} "
                    f"tokens {self.kv_bytes() / GiB:.2f} GiB"]
        out = [f"plan: one adapter (7 projections x {self.geometry.layers} layers, {self.element_size}-byte "
               f"elements): {per}",
               f"  disk: {self.files} adapter files, {self.file_bytes() / GiB:.2f} GiB{shared}",
               f"  host: {self.adapters} registered adapters, {self.host_bytes() / GiB:.2f} GiB"
               + (f" ({self.host_memory_bytes() / GiB:.2f} GiB pinned in blocks of 1 GiB)" if self.pinned else "")]
        out.append(f"  device: {self.resident} slots x {self.slot_bytes() / 2**20:.1f} MiB (padded to rank "
                   f"{max(self.ranks)}) = {self.slots_bytes() / GiB:.2f} GiB")
        out.append(f"  device: weights {self.weights_bytes() / GiB:.2f} GiB, a step's activations "
                   f"{self.activation_bytes() / GiB:.2f} GiB, KV for {self.max_num_seqs} sequences of {self.seq_len} "
                   f"tokens {self.kv_bytes() / GiB:.2f} GiB")
        return out


def host_available_bytes() -> int:
    """Memory the system can give this process now (MemAvailable: free memory and reclaimable caches)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/meminfo has no MemAvailable line and psutil is not installed")


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_fit(plan: Plan, host_available: int, disk_free: int, disk_to_write: int,
              device_budget: int | None = None, host_extra: int = 0) -> dict:
    """Raise ``PlanError`` if ``plan`` does not fit: the registered adapters (plus ``host_extra``: on a CPU the
    model, slots and cache) in ``host_available`` less ``HOST_HEADROOM``; ``disk_to_write`` bytes of new
    adapter files in ``disk_free`` less ``DISK_HEADROOM``; on a GPU (``device_budget``: its memory times
    ``gpu_memory_fraction``) the weights, slots, activations and one full-length sequence's KV cache.
    Returns what is left: {"host_spare", "disk_spare", "kv_sequences" (full-length sequences the KV cache
    can hold, None without a device budget)}."""
    short = []
    host_need = plan.host_memory_bytes() + host_extra
    host_spare = host_available - HOST_HEADROOM - host_need
    if host_spare < 0:
        short.append(f"host memory: {plan.adapters} registered adapters take {plan.host_memory_bytes() / GiB:.2f} GiB"
                     + (" pinned" if plan.pinned else "")
                     + (f" (+ {host_extra / GiB:.2f} GiB of model, slots and cache on the CPU)" if host_extra else "")
                     + f", {host_available / GiB:.2f} GiB is available less {HOST_HEADROOM / GiB:.0f} GiB for the "
                     f"process: register fewer (--adapters) or smaller ranks (--ranks)")
    disk_spare = disk_free - DISK_HEADROOM - disk_to_write
    if disk_spare < 0:
        short.append(f"disk: the adapter files still to write take {disk_to_write / GiB:.2f} GiB, "
                     f"{disk_free / GiB:.2f} GiB is free less {DISK_HEADROOM / GiB:.0f} GiB: write fewer files "
                     f"(--adapter-files; each is registered under several names) or use another --adapter-dir")
    kv_sequences = None
    if device_budget is not None:
        fixed = plan.weights_bytes() + plan.slots_bytes() + plan.activation_bytes()
        kv_sequences = max(0, (device_budget - fixed) // max(1, plan.kv_bytes(1)))
        if kv_sequences < 1:
            short.append(f"device memory: weights {plan.weights_bytes() / GiB:.2f} GiB + {plan.resident} adapter "
                         f"slots {plan.slots_bytes() / GiB:.2f} GiB + activations {plan.activation_bytes() / GiB:.2f} "
                         f"GiB + one sequence's KV cache {plan.kv_bytes(1) / GiB:.3f} GiB exceed the budget of "
                         f"{device_budget / GiB:.2f} GiB (--gpu-memory-fraction): fewer --resident, a smaller "
                         f"largest rank (--ranks) or a larger --gpu-memory-fraction")
    if short:
        raise PlanError("this run does not fit the machine:\n  " + "\n  ".join(short))
    return {"host_spare": host_spare, "disk_spare": disk_spare, "kv_sequences": kv_sequences}
