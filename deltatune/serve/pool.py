"""``AdapterPool``: many LoRA adapters for one base model, held as stacked slots, each token its own adapter.

An adapter registered here is never added to the model: the pool keeps its factors and makes the
model's target layers compute with them inside ``pool.routed(model, rows)``:

* **register** reads a PEFT-format LoRA directory (PEFT's or ours; rank/alpha patterns, rsLoRA),
  resolves its ``target_modules`` on the model by PEFT's rules (``adapters.select_targets``: the same
  layers ``load_adapter`` would wrap), and checks every key, shape and value before accepting it; a bad
  file raises ``AdapterFileError`` naming the file and key, and the pool is unchanged. The factors stay
  on the host in the pool's dtype, one flat buffer an adapter, cut from large pinned blocks on a GPU
  (``serve.pool_host``).
* **slots**: per target layer, ``A`` (S, R, in), ``B`` (S, out, R), ``scales`` (S,) and each slot's rank
  (S,) int32 on the device (0 where the slot's adapter skips the layer), R the largest rank registered
  for that layer (smaller ranks padded with zeros, which add exact zeros).
  S = ``max_resident``, lowered to what ``max_bytes`` allows. An adapter is loaded into a free slot of
  every layer when a batch first needs it; when none is free the least recently used adapter not in
  the batch is evicted (its host copy stays: reloading is one batched host-to-device copy). ``prefetch``
  starts loads before the step that needs them, on a copy stream of its own on a GPU (``ready`` says when
  one has landed), so that a load does not hold up the steps of the requests already running.
* **routed(model, rows)**: ``rows`` names each token's adapter (None: the base model), per dimension-0
  row of the layer inputs as in ``adapters.routed`` (a (B, L, in) input: row b's L tokens), or per
  token of the flattened leading dimensions. Each target layer computes ``base(x) + scale_a B_a A_a x``
  for its tokens (``serve.lora_mixed``: SGMV/BGMV kernels on a GPU, the PyTorch reference elsewhere).
  Everything derived from ``rows`` is made once a call and shared by every layer. Decode (each adapter's
  tokens few): the rows' slots go to the device in one copy, into a buffer kept per row count (a CUDA
  graph of the step reads the next step's slots there), and each projection is one launch of the
  gathered kernel (``kernels.sgmv.Bgmv``, held per layer; two, a shrink and an expand, in a step captured
  as a CUDA graph: ``routed(..., gathered=True)``) and no other host work: no index arrays, no
  allocation, no host read of the device. Otherwise (prefill) the sorted index arrays of SGMV, built
  once per input layout (and set of slots present on a layer); base tokens are left out of them, so
  they cost nothing beyond the base layer. Names of adapters added to the
  model itself (``add_adapter``/``load_adapter``) may be routed too; those go through
  ``adapters.routing`` on their own layers.

Target layers are found by path: plain ``nn.Linear``-family modules get a forward hook adding the
terms; ``DeltaLayer``s get a routing object (their own unmerged adapters still apply only to the rows
that name them). Only LoRA on linear layers (incl. GPT-2 ``Conv1D`` and quantized linear layers) is
pooled, DoRA included (``use_dora``): its magnitude is held as the output scale ``f = m / ||W + s·BA||_c``
computed at ``register`` over the model's base weights, and a layer scales the outputs of its DoRA slots'
tokens, ``f ⊙ y + (1 - f) ⊙ b`` (``PoolCall.scaled``; the slots get an (S + 1, out) table of scales per
layer once a DoRA adapter is registered, 1 for every other slot). Embeddings, convolutions and
``modules_to_save`` are refused at ``register``.
Imports torch only (triton on the first kernel launch).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.adapters import DeltaLayer, Routing, geometry_for, list_adapters, select_targets
from deltatune.methods.lora import LORA, LoraConfig
from deltatune.kernels import backend
from deltatune.serve.pool_call import PoolCall, decode_phases, shrink_groups, shrink_groups_on, submodule
from deltatune.serve.pool_host import Adapter, Factors, HostArena, all_finite, read_adapter

__all__ = ["AdapterPool", "PoolError"]


class PoolError(RuntimeError):
    """The pool cannot do what was asked (capacity, budget, unknown names); it keeps serving."""


class _LayerSlots:
    """One target layer's slots on the device: A (S, R, in), B (S, out, R), scales (S,), and per slot its
    rank, 0 where the slot's adapter does not target this layer: on the host (``ranks``, the reference)
    and on the device (``rank_table``, int32, the gathered kernel's). ``scales`` and ``rank_table`` are rows
    of the pool's (layers, S) tables, so a load writes every layer's in one copy each (``AdapterPool._load``)."""

    def __init__(self, S: int, R: int, fan_in: int, fan_out: int, device: torch.device, dtype: torch.dtype,
                 scales: torch.Tensor, rank_table: torch.Tensor, workspace: dict[int, torch.Tensor] | None = None,
                 out_scale: torch.Tensor | None = None):
        self.A = torch.zeros(S, R, fan_in, device=device, dtype=dtype)
        self.B = torch.zeros(S, fan_out, R, device=device, dtype=dtype)
        self.scales, self.rank_table = scales, rank_table
        # DoRA (a pool holding a DoRA adapter): (S + 1, out) output scales, 1 for a LoRA slot, an empty one, a slot
        # whose adapter skips this layer and the last row (base tokens); a view of the pool's one buffer
        self.out_scale = out_scale
        self.dora_slots: set[int] = set()  # slots whose output this layer scales
        self.ranks = [0] * S
        self.filled = [0] * S  # per slot: rows of A (columns of B) that may hold nonzeros (a past occupant's rank)
        self._present = frozenset()
        self._gathered = None  # kernels.sgmv.Bgmv over these tensors, made on first use
        self._workspace = workspace  # the two-phase kernel's partials by token count, shared by the pool's layers

    def place(self, slot: int, factors: Factors | None, copies: list, zeros: list) -> None:
        """Book ``factors`` (None: absent here) into ``slot``; the device work is appended to ``copies``
        ((device view, host factor) pairs) and ``zeros`` (views to clear: a past occupant's rows beyond the
        new rank, which must add nothing)."""
        r = 0 if factors is None else factors.rank
        if self.filled[slot] > r:
            zeros += [self.A[slot, r:self.filled[slot]], self.B[slot, :, r:self.filled[slot]]]
        if factors is not None:
            copies += [(self.A[slot, :r], factors.A), (self.B[slot, :, :r], factors.B)]
        self.dora_slots.discard(slot)
        if factors is not None and factors.out_scale is not None:  # the row was set to ones by the load
            copies.append((self.out_scale[slot], factors.out_scale))
            self.dora_slots.add(slot)
        self.filled[slot] = r
        self.ranks[slot] = r
        self._present = self._present | {slot} if r else self._present - {slot}

    def gathered(self):
        """This layer's gathered kernel (``kernels.sgmv.Bgmv``), its checks done once."""
        if self._gathered is None:
            self._gathered = backend.load("deltatune.kernels.sgmv").Bgmv(self.A, self.B, self.scales, self.rank_table,
                                                                         workspace=self._workspace)
        return self._gathered

    def present(self) -> frozenset[int]:
        """The slots holding an adapter that targets this layer."""
        return self._present

    def nbytes(self) -> int:
        scaled = self.out_scale.nbytes if self.out_scale is not None else 0
        return self.A.nbytes + self.B.nbytes + self.scales.nbytes + self.rank_table.nbytes + scaled


class AdapterPool:
    """LoRA adapters for ``model`` by name, up to ``max_resident`` of them in device slots at a time.

    ``device``/``dtype``: where and in what the slots live (default: the model's first parameter's device,
    its first floating parameter's dtype). ``max_bytes``: a budget for the slots (all layers' A, B and
    scales); the slot count is lowered to fit it. ``max_rank``: fix each layer's padded rank (registering
    a larger rank is refused); by default it grows with the largest rank registered, which reallocates
    the slots (resident adapters reload on their next use).
    """

    def __init__(self, model: nn.Module, max_resident: int = 64, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_bytes: int | None = None, max_rank: int | None = None):
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        first = next(model.parameters(), None)
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self.model = model
        self.max_resident = max_resident
        self.device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.dtype = dtype or (floats[0] if floats else torch.float32)
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self._adapters: dict[str, Adapter] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}  # module path -> (R, in, out) of its slots
        self._slots: dict[str, _LayerSlots] | None = None  # allocated on first use
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._slot_tables: dict[int, torch.Tensor] = {}  # rows -> the device buffer of a step's row slots
        self._tables_in_use: set[int] = set()
        self._plans: dict[str, dict] = {}  # config -> the file keys and shapes it calls for (read_adapter)
        self._norms: dict[str, torch.Tensor] = {}  # layer -> ||W_i||² of its base weight (DoRA's output scale)
        self._dora = False  # whether the slots carry output scales (once a DoRA adapter is registered)
        self._out_scale: torch.Tensor | None = None  # (S + 1, sum of the layers' out) of the slots, with DoRA
        self._groups: tuple | None = None  # (the slots they were made for, shrink_groups())
        self._arena = HostArena(self.dtype, pin=self.device.type == "cuda")  # the adapters' packed host copies
        self._pending: dict[str, torch.cuda.Event] = {}  # name -> the event of its load still in flight
        self._stream = None  # the copy stream of prefetch (CUDA), made on first use
        self.loads = 0
        """Adapters loaded into slots so far (by a step or by ``prefetch``): reloads included."""
        self.generation = 0
        """Bumped whenever the slots are dropped for new ones (a new layer or a larger rank registered): a CUDA
        graph captured over the old slots' addresses must not be replayed after it (``serve.decode_graphs``)."""

    # -- registration ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered adapters' names, sorted."""
        return sorted(self._adapters)

    def resident(self) -> list[str]:
        """The adapters in device slots now, least recently used first."""
        return list(self._resident)

    def register(self, name: str, path: str | os.PathLike) -> None:
        """Read and check the LoRA adapter directory ``path`` and hold it as ``name``.

        Raises ``AdapterFileError`` (naming the file and key) for a file that cannot be served on this
        model, ``ValueError`` for a name already taken, ``PoolError`` if one slot would exceed
        ``max_bytes`` or the rank ``max_rank``; the pool is unchanged then.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already registered; unregister() it first or pick another name")
        if name in list_adapters(self.model):
            raise ValueError(f"adapter {name!r} is already an adapter of the model (add_adapter/load_adapter); "
                             f"a batch could not tell the two apart: pick another name")
        adapter = read_adapter(self.model, name, Path(path), self.dtype, self._arena, self._plans, self._norms)
        shapes = dict(self._shapes)
        try:
            for module, f in adapter.layers.items():
                R, fan_in, fan_out = shapes.get(module, (0, f.A.shape[1], f.B.shape[0]))
                if self.max_rank is not None and f.rank > self.max_rank:
                    raise PoolError(f"adapter {name!r} ({path}): module {module!r} has rank {f.rank}, over the "
                                    f"pool's max_rank={self.max_rank}")
                shapes[module] = (self.max_rank or max(R, f.rank), fan_in, fan_out)
            self._slot_count(shapes)  # raises if not one slot fits the budget
        except PoolError:
            self._arena.give_back(adapter.flat)
            raise
        dora = self._dora or adapter.dora
        if shapes != self._shapes or dora != self._dora:  # a new layer, a larger rank or DoRA's first output
            self._await(list(self._pending))  # scales: new slots, filled again on demand; no copy in flight into
            self._shapes, self._slots, self._dora = shapes, None, dora  # the slots dropped
            self._resident.clear()
            self.generation += 1
        self._adapters[name] = adapter

    def unregister(self, name: str) -> None:
        """Forget adapter ``name`` (its slot is freed; the slots keep their shapes)."""
        if name not in self._adapters:
            raise KeyError(f"no adapter {name!r} in the pool (have {len(self._adapters)}: {self.names()[:5]}...)")
        del self._adapters[name]
        self._await([name])
        slot = self._resident.pop(name, None)
        if slot is not None and self._slots is not None:
            self._load(slot, None)

    # -- memory ---------------------------------------------------------------------------------------
    def slot_bytes(self, shapes: dict[str, tuple[int, int, int]] | None = None) -> int:
        """Device bytes one slot takes over all target layers (A, B, scale, rank; DoRA's output scales once a
        DoRA adapter is registered)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum((R * (fan_in + fan_out) + self._dora * fan_out) * size + 8
                   for R, fan_in, fan_out in (shapes or self._shapes).values())

    def _slot_count(self, shapes: dict[str, tuple[int, int, int]]) -> int:
        """S: ``max_resident``, lowered to what ``max_bytes`` allows; PoolError if not one slot fits."""
        if self.max_bytes is None or not shapes:
            return self.max_resident
        per_slot = self.slot_bytes(shapes)
        if per_slot > self.max_bytes:
            raise PoolError(f"one slot needs {per_slot} bytes over {len(shapes)} layers, over the pool's budget "
                            f"max_bytes={self.max_bytes}")
        return min(self.max_resident, self.max_bytes // per_slot)

    def planned_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(R, in, out) of the slots of every layer an adapter may come to target: the layers registered so
        far and, with ``max_rank`` set, every linear layer that "all-linear" selects (in a Llama-family
        decoder the 7 projections of each layer, not the head) at rank ``max_rank``."""
        shapes = dict(self._shapes)
        if self.max_rank is None:
            return shapes
        cfg = LoraConfig(r=self.max_rank, alpha=self.max_rank, targets="all-linear")
        try:
            targets = select_targets(self.model, cfg, LORA.supports)
        except ValueError:  # no linear layer: nothing more to plan for
            targets = []
        for target in targets:
            module = self.model.get_submodule(target)
            geometry = geometry_for(module)
            if target in shapes or geometry.family != "linear":
                continue
            base = module.base_module if isinstance(module, DeltaLayer) else module
            roles = LORA.shapes(geometry, base, cfg, target)
            shapes[target] = (self.max_rank, roles["A"][1], roles["B"][0])  # A (r, in), B (out, r)
        return shapes

    def planned_bytes(self) -> int:
        """Device bytes the slots may come to take: ``max_resident`` slots over ``planned_shapes()``, at most
        ``max_bytes``. An engine's KV-cache plan sets this much aside. Without ``max_rank`` it covers the
        adapters registered so far only (a larger rank or a new layer registered later reallocates)."""
        total = self.max_resident * self.slot_bytes(self.planned_shapes())
        return total if self.max_bytes is None else min(total, self.max_bytes)

    @property
    def capacity(self) -> int:
        """How many adapters can be resident at once (S)."""
        return self._slot_count(self._shapes)

    def resident_bytes(self) -> int:
        """Device bytes the slots take now (0 before the first routed call)."""
        return sum(layer.nbytes() for layer in (self._slots or {}).values())

    def host_bytes(self) -> int:
        """Host bytes the registered adapters' factors take."""
        return sum(a.nbytes() for a in self._adapters.values())

    # -- residency ------------------------------------------------------------------------------------
    def _ensure_slots(self) -> dict[str, _LayerSlots]:
        if self._slots is None:
            S, L = self.capacity, len(self._shapes)
            self._scales = torch.zeros(L, S, device=self.device, dtype=torch.float32)  # (layers, S): one copy a load
            self._ranks = torch.zeros(L, S, device=self.device, dtype=torch.int32)
            workspace = {}  # the layers run one after another on one stream: one partials buffer per token count
            outs = [fan_out for _, _, fan_out in self._shapes.values()]
            self._out_scale = torch.ones(S + 1, sum(outs), device=self.device, dtype=self.dtype) if self._dora else None
            starts = [sum(outs[:i]) for i in range(len(outs))]
            self._slots = {m: _LayerSlots(S, R, fan_in, fan_out, self.device, self.dtype, self._scales[i],
                                          self._ranks[i], workspace, None if self._out_scale is None
                                          else self._out_scale[:, starts[i]:starts[i] + fan_out])
                           for i, (m, (R, fan_in, fan_out)) in enumerate(self._shapes.items())}
        return self._slots

    def _load(self, slot: int, adapter: Adapter | None) -> None:
        """Put ``adapter`` into ``slot`` of every layer (None: empty it) on the current stream: its factors in
        one batched host-to-device copy, every layer's scale and rank in one copy each, and a past occupant's
        rows beyond the new ranks cleared in one call: a handful of host calls a load, not ~6 a layer."""
        copies, zeros, scales, ranks = [], [], [], []
        if self._out_scale is not None:
            self._out_scale[slot].fill_(1.0)  # every layer's output scale of the slot; DoRA's layers copied below
        for module, layer in self._slots.items():
            f = adapter.layers.get(module) if adapter is not None else None
            layer.place(slot, f, copies, zeros)
            scales.append(f.scale if f is not None else 0.0)
            ranks.append(f.rank if f is not None else 0)
        if zeros:
            torch._foreach_zero_(zeros)
        if copies:
            # host to device: torch's per-tensor path inside one call (asynchronous from pinned memory)
            torch._foreach_copy_([d for d, _ in copies], [h for _, h in copies], non_blocking=True)
        pin = self.device.type == "cuda"
        for table, values, dtype in ((self._scales, scales, torch.float32), (self._ranks, ranks, torch.int32)):
            host = torch.tensor(values, dtype=dtype)
            table[:, slot].copy_(host.pin_memory() if pin else host, non_blocking=True)

    def _take_slot(self, keep: set[str]) -> int | None:
        """A slot for a new adapter: the lowest free one, else the least recently used adapter's that is not in
        ``keep`` (evicted; its host copy stays); None if every resident adapter is kept."""
        S = len(self._scales[0]) if self._slots else self.capacity
        if len(self._resident) < S:
            return min(set(range(S)) - set(self._resident.values()))
        victim = next((n for n in self._resident if n not in keep), None)
        if victim is None:
            return None
        self._await([victim])  # its load, if still in flight, lands before another is written over it
        return self._resident.pop(victim)

    def _await(self, names) -> None:
        """Make the current stream wait for the loads of ``names`` still in flight (a device-side wait)."""
        for name in names:
            event = self._pending.pop(name, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    def make_resident(self, names: list[str]) -> dict[str, int]:
        """Load ``names`` (registered adapters) into slots, evicting the least recently used others;
        returns {name: slot}. PoolError if they are more than the slots. Loads started by ``prefetch`` are
        waited for on the device (the current stream waits for the copy stream), never on the host."""
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self._adapters]
        if unknown:
            raise KeyError(f"adapters {unknown} are not registered in the pool")
        slots = self._ensure_slots()
        S = len(self._scales[0]) if slots else self.capacity
        if len(wanted) > S:
            raise PoolError(f"a batch names {len(wanted)} distinct pooled adapters; the pool holds {S} at once "
                            f"(max_resident={self.max_resident}"
                            + (f", max_bytes={self.max_bytes}" if self.max_bytes is not None else "") + ")")
        keep = set(wanted)
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            slot = self._take_slot(keep)
            self._load(slot, self._adapters[name])
            self._resident[name] = slot
            self.loads += 1
        if self._pending:
            self._await([n for n in wanted if n in self._pending])
        return {n: self._resident[n] for n in wanted}

    def prefetch(self, names: list[str], keep=()) -> list[str]:
        """Start loading ``names`` before the step that needs them, evicting only adapters in neither ``names``
        nor ``keep`` (an engine's running requests' adapters); returns the names whose loads were started
        (as many as slots allow, in order). On a GPU the copies run on the pool's own stream, after the work
        already queued (which may still read an evicted slot) and beside the steps queued later; ``ready(name)``
        says when one has landed, and a step naming it earlier waits for it on the device. Elsewhere the load
        is done on return. KeyError for a name not registered."""
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise KeyError(f"adapters {unknown} are not registered in the pool")
        self._ensure_slots()
        protect, started = set(keep) | set(names), []
        for name in dict.fromkeys(names):
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            slot = self._take_slot(protect)
            if slot is None:
                break
            if self.device.type == "cuda":
                if self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    self._load(slot, self._adapters[name])
                    self._pending[name] = torch.cuda.Event()
                    self._pending[name].record(self._stream)
            else:
                self._load(slot, self._adapters[name])
            self._resident[name] = slot
            self.loads += 1
            started.append(name)
        return started

    def ready(self, name: str) -> bool:
        """Whether adapter ``name`` is in a slot with its load finished: a step naming it waits for no copy."""
        if name not in self._resident:
            return False
        event = self._pending.get(name)
        if event is None:
            return True
        if event.query():  # landed: nothing left to wait for
            del self._pending[name]
            return True
        return False

    # -- serving --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def routed(self, model: nn.Module, rows: list[str | None], gathered: bool = False, phases: int | None = None):
        """Context in which ``model``'s calls apply adapter ``rows[i]`` to row (or token) ``i``.

        ``rows`` holds names of pooled adapters, of adapters on the model itself, or None for the base.
        Raises KeyError for a name neither has, PoolError for more distinct pooled adapters than slots.
        Whether the Triton kernels run (``kernels.backend``) is decided here, once for the context.
        ``gathered``: every projection takes the gathered kernel whatever the rows (what a
        captured decode step needs: ``serve.decode_graphs``), not SGMV where an adapter has many tokens.
        ``phases``: the gathered kernel's variant, 1 (one launch) or 2 (shrink, then expand); None: 2 when
        ``gathered`` (launches are free in a graph), else 1, unless ``DELTATUNE_BGMV_PHASES`` says
        (``serve.pool_call.decode_phases``). Yields ``model``.
        """
        phases = decode_phases(gathered, phases)  # ValueError before anything is loaded
        rows = list(rows)
        own = list_adapters(model)
        pooled = [n for n in dict.fromkeys(rows) if n is not None and n in self._adapters]
        both = [n for n in pooled if n in own]
        if both:
            raise ValueError(f"adapters {both} are both in the pool and on the model; rename one")
        unknown = sorted({n for n in rows if n is not None and n not in self._adapters and n not in own})
        if unknown:
            raise KeyError(f"routing names adapters {unknown} that neither the pool nor the model has")
        slot_of = self.make_resident(pooled) if pooled else {}
        token_slots = [slot_of.get(n, -1) if n is not None else -1 for n in rows]
        model_rows = None if not own else Routing(tuple(n if n in own else None for n in rows))
        table = self._slot_table(token_slots) if pooled else None
        groups = self.shrink_groups() if pooled and phases == 2 and shrink_groups_on() else None
        call = PoolCall(token_slots, model_rows, table, gathered, phases, groups)
        handles = []
        slots = self._slots if pooled else {}
        try:
            if model_rows is None:  # only the pooled layers take part: no walk over the whole model
                targets = [(path, module) for path in slots or () if (module := submodule(model, path)) is not None]
            else:
                targets = model.named_modules()
            for path, module in targets:
                layer = slots.get(path) if slots else None
                if isinstance(module, DeltaLayer):
                    if layer is None and model_rows is None:
                        continue
                    handles.append(module.register_forward_pre_hook(call.pass_routing(path, layer),
                                                                    with_kwargs=True))
                elif layer is not None:
                    handles.append(call.attach(path, module, layer))  # a forward hook, or the epilogue forward
            yield model
        finally:
            for handle in handles:
                handle.remove()
            if table is not None and table is self._slot_tables.get(len(token_slots)):
                self._tables_in_use.discard(len(token_slots))

    def shrink_groups(self) -> dict[int, list]:
        """id(layer slots) -> the later layers of its group, whose decode shrinks run as one launch
        (``DELTATUNE_BGMV_GROUPS=1``; ``pool_call.shrink_groups``). Made once per set of slots."""
        slots = self._ensure_slots()
        if self._groups is None or self._groups[0] is not slots:
            self._groups = (slots, shrink_groups(slots, self._shapes))
        return self._groups[1]

    def prepare(self, rows: list[str | None]) -> None:
        """Before the replay of a step captured inside ``routed(model, rows', gathered=True)`` with as many
        rows: make ``rows``' adapters resident and write their slots to the table of that row count, the
        buffer the captured kernels read. PoolError for more distinct adapters than slots."""
        pooled = [n for n in dict.fromkeys(rows) if n is not None]
        slot_of = self.make_resident(pooled) if pooled else {}
        token_slots = [slot_of.get(n, -1) if n is not None else -1 for n in rows]
        if len(token_slots) not in self._tables_in_use:
            self._slot_table(token_slots)
            self._tables_in_use.discard(len(token_slots))

    def _slot_table(self, token_slots: list[int]) -> torch.Tensor | None:
        """The step's row slots on the device (int32, -1: base) for the gathered kernel, or None where the
        kernels do not run. One buffer per row count, kept: the next step with as many rows writes its slots
        to the same address (what a captured CUDA graph of the step reads), in one host-to-device copy."""
        n = len(token_slots)
        table = self._slot_tables.get(n)
        if table is None or n in self._tables_in_use:  # a nested routed call keeps the outer one's slots
            fresh = torch.empty(n, dtype=torch.int32, device=self.device)
            if not backend.triton_enabled(fresh):
                return None
            if table is None:
                self._slot_tables[n] = fresh
            table = fresh
        elif not backend.triton_enabled(table):
            return None
        if table is self._slot_tables[n]:  # released when the call's context exits
            self._tables_in_use.add(n)
        host = torch.tensor(token_slots, dtype=torch.int32)
        table.copy_(host.pin_memory() if table.is_cuda else host, non_blocking=True)
        return table


_all_finite = all_finite  # the name the tests import
