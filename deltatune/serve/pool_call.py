"""One ``AdapterPool.routed`` call: what it derives from the rows once, and the hooks that add the pooled terms.

``PoolCall`` holds the rows' slots (host list; device table, int32, when the kernels run) and, per input
layout seen by a layer, whether the gathered kernel runs (decode: every adapter's tokens few) or else the
slot batches of SGMV / the PyTorch reference (``serve.lora_mixed``). A layer's hook then does no more than
look its layout up and launch. A layer here is the pool's per-layer slots: ``A``, ``B``, ``scales``, host
``ranks``, ``present()`` and ``gathered()`` (its ``kernels.sgmv.Bgmv``).

The gathered kernel runs in one launch or in two phases (``decode_phases``): one launch in eager decode,
where each launch costs ~20 us of host time and the one-launch kernel saves one a projection at the price
of recomputing a token's shrink in each of its programs; two phases (a split-K shrink, then an expand)
when the call is forced gathered, i.e. a decode step being captured as a CUDA graph, where a launch costs
nothing on replay and the GPU time is all that counts. The same bits either way (``kernels.bgmv_split``).

Prefill on a plain ``nn.Linear`` (issue 18): adding the terms to the finished output reads and writes it again in
the memory-bound SGMV expand. So, for the call, such a layer's forward is replaced (``attach``): where more than
half its tokens are adapted, the terms and the bias are written into a fresh buffer and the base GEMM adds into it
in place (``lora_mixed.linear_mixed_lora``); decode, quantized or other layers keep the hook. Off by default:
on an H200 (docs/benchmarks.md, session 14) the 1B prefill of 16x512 tokens with 16 adapters took 46.3 ms
with it against 35.9 ms with the hook; ``DELTATUNE_SGMV_EPILOGUE=1`` turns it on for A/B runs.
Imports torch only.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.nn as nn

from deltatune.adapters import DeltaLayer, Routing
from deltatune.serve.lora_mixed import GATHERED_MAX_SEGMENT, SlotBatch, linear_mixed_lora, mixed_lora, slot_batch

__all__ = ["PoolCall", "LayerRouting", "SIBLINGS", "submodule", "decode_phases", "sgmv_epilogue", "shrink_groups",
           "shrink_groups_on"]

PHASES_ENV = "DELTATUNE_BGMV_PHASES"
"""Environment variable forcing the gathered kernel's variant, 1 or 2, over the default (for A/B runs)."""

EPILOGUE_ENV = "DELTATUNE_SGMV_EPILOGUE"
"""Environment variable: 1 turns the prefill epilogue path on where it applies, 0 or unset leaves the terms
added to the base output by a forward hook (the default: measured faster; for A/B runs)."""


def sgmv_epilogue() -> bool:
    """Whether prefill calls of plain ``nn.Linear`` layers take the epilogue path (``DELTATUNE_SGMV_EPILOGUE``:
    1 yes; 0 or unset no). ValueError for any other value."""
    value = os.environ.get(EPILOGUE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{EPILOGUE_ENV} must be 0 (terms added to the base output) or 1 (terms first, the base "
                         f"GEMM adds into them), got {value!r}")
    return value == "1"


GROUPS_ENV = "DELTATUNE_BGMV_GROUPS"
"""Environment variable: 1 runs the two-phase decode shrinks of layers that read one input (q, k, v; gate, up) as
one launch (``Bgmv.shrink_group``); 0 or unset, a launch a layer (the default until measured on a GPU)."""


def shrink_groups_on() -> bool:
    """``DELTATUNE_BGMV_GROUPS``: 1 yes; 0 or unset no. ValueError for any other value."""
    value = os.environ.get(GROUPS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{GROUPS_ENV} must be 0 (a shrink launch a layer) or 1 (one for the layers sharing an "
                         f"input), got {value!r}")
    return value == "1"


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
"""Layers of one parent that a transformer block calls on one input, in the order it calls them."""


def shrink_groups(slots: dict, shapes: dict[str, tuple[int, int, int]]) -> dict[int, list]:
    """id(layer slots) -> the later layers of its group: layers of one parent named as in ``SIBLINGS`` (q, k, v;
    gate, up), in call order, whose ``shapes`` (R, in, out) share the padded rank and input width. Names, not
    fan-in, pick them: o_proj has q_proj's fan-in and another input."""
    groups = {}
    for path, layer in slots.items():
        parent, _, name = path.rpartition(".")
        family = next((f for f in SIBLINGS if name in f), ())
        present = [p for p in (f"{parent}.{n}" if parent else n for n in family) if p in slots]
        if not present or present[0] != path:
            continue  # not the first layer of its family here
        later = [slots[p] for p in present[1:] if shapes[p][:2] == shapes[path][:2]]
        if later:
            groups[id(layer)] = later
    return groups


def decode_phases(gathered: bool, phases: int | None = None) -> int:
    """Which variant of the gathered kernel a routed call runs: ``phases`` when given (1 or 2), else
    ``DELTATUNE_BGMV_PHASES`` when set (1 or 2), else 2 for a call forced gathered (a decode step captured as a
    CUDA graph) and 1 otherwise (eager decode). ValueError for any other value, naming where it came from."""
    if phases is None:
        value = os.environ.get(PHASES_ENV, "").strip()
        if not value:
            return 2 if gathered else 1
        if value not in ("1", "2"):
            raise ValueError(f"{PHASES_ENV} must be 1 (the one-launch gathered kernel) or 2 (shrink, then expand), "
                             f"got {value!r}")
        return int(value)
    if isinstance(phases, bool) or phases not in (1, 2):
        raise ValueError(f"phases must be 1 (the one-launch gathered kernel) or 2 (shrink, then expand), "
                         f"got {phases!r}")
    return phases


class PoolCall:
    """One ``routed`` context: the token slots, and what is derived from them once and shared by every
    layer: per input layout, whether the gathered kernel runs (then a projection is one launch reading
    ``table``, or two with ``phases`` 2) or else the slot batches (per layout and per set of slots present
    on a layer)."""

    def __init__(self, token_slots: list[int], model_rows: Routing | None, table: torch.Tensor | None,
                 gathered: bool = False, phases: int = 1, groups: dict | None = None):
        self.token_slots, self.model_rows, self.table, self.gathered = token_slots, model_rows, table, gathered
        self.phases = phases
        # two-phase decode: layer -> the later layers reading the same input, shrunk with it in one launch
        # (``AdapterPool.shrink_groups``; None: each layer its own), and the partials waiting for those layers
        self.groups = groups if phases == 2 else None
        self._waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epilogue = sgmv_epilogue()  # read once a call (ValueError before any layer changes)
        self.used = frozenset(s for s in token_slots if s >= 0)
        self._gathered: dict[torch.Size, int | None] = {}  # x's shape -> tokens per row when BGMV runs, else None
        self._batches: dict[tuple, SlotBatch] = {}
        self._scale_rows: dict[torch.Size, torch.Tensor] = {}  # x's shape -> each token's row of DoRA's scales

    def _tokens_per_row(self, x: torch.Tensor) -> int:
        """How many of ``x``'s tokens each entry of the rows covers: a dim-0 row's, or one token each."""
        tokens = x.shape[:-1].numel()
        n = len(self.token_slots)
        if x.dim() > 1 and x.shape[0] == n:
            return tokens // n
        if tokens == n:
            return 1
        raise ValueError(f"routing gives {n} rows; the layer input {tuple(x.shape)} has {x.shape[0]} rows "
                         f"and {tokens} tokens")

    def _layout(self, x: torch.Tensor) -> int | None:
        """For inputs shaped like ``x``: tokens per row if the gathered kernel runs (every adapter's tokens
        few: decode), else None (SGMV or the reference)."""
        per_row = self._tokens_per_row(x)
        if self.table is None:
            return None
        if self.gathered:  # asked for whatever the rows (a captured step replays with other rows)
            return per_row
        counts = Counter(s for s in self.token_slots if s >= 0)
        longest = max(counts.values(), default=0) * per_row
        return per_row if longest <= GATHERED_MAX_SEGMENT else None

    def batch(self, x: torch.Tensor, present: frozenset[int]) -> SlotBatch:
        """The slot batch for input ``x`` (rows per dim-0 row, or per token of the leading dimensions) on a
        layer where the slots ``present`` hold adapters (tokens of other slots take the base there)."""
        key = (x.shape, present)
        batch = self._batches.get(key)
        if batch is not None:
            return batch
        here = self.used & present
        shared = (x.shape, here)
        if shared not in self._batches:
            per_row = self._tokens_per_row(x)
            per_token = [s if s in here else -1 for s in self.token_slots for _ in range(per_row)]
            self._batches[shared] = slot_batch(per_token, x.device)
        batch = self._batches[key] = self._batches[shared]
        return batch

    def _per_row(self, x: torch.Tensor) -> int | None:
        """``_layout(x)``, once per input shape."""
        per_row = self._gathered.get(x.shape, _UNSEEN)
        if per_row is _UNSEEN:
            per_row = self._gathered[x.shape] = self._layout(x)
        return per_row

    def terms(self, layer, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` (the base layer's output, ``bias`` included) plus the pooled adapters' terms for ``x``'s tokens,
        scaled per token where the layer holds DoRA adapters (``scaled``)."""
        per_row = self._per_row(x)
        if per_row is not None and not y.requires_grad:  # decode: the launch(es), nothing else (no backward)
            h = self._group_partials(layer, x, per_row) if self.groups is not None else None
            if h is not None:  # shrunk already, with the layers sharing its input: the expand alone
                return self.scaled(layer, x, layer.gathered().expand(h, x, y, self.table, per_row), bias)
            return self.scaled(layer, x, layer.gathered()(x, y, self.table, per_row, self.phases), bias)
        batch = self.batch(x, layer.present())
        if not batch.segments:
            return y
        out = mixed_lora(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), layer.A, layer.B, layer.scales,
                         batch, layer.ranks)
        return self.scaled(layer, x, out.view(y.shape), bias)

    def _group_partials(self, layer, x: torch.Tensor, per_row: int) -> torch.Tensor | None:
        """This layer's shrink partials for ``x`` if one launch made them with its group's (``shrink_group``): an
        earlier layer's launch, when ``x`` is the very tensor that layer read, or this layer's, which also makes
        the later members' (each checks its input is ``x`` in turn; a member reading another input shrinks
        alone). None: shrink as usual."""
        waiting = self._waiting.pop(id(layer), None)
        if waiting is not None and waiting[0] is x:
            return waiting[1]
        later = self.groups.get(id(layer))
        if not later:
            return None
        hs = layer.gathered().shrink_group([m.gathered() for m in later], x, self.table, per_row)
        if hs is None:
            return None
        for member, h in zip(later, hs[1:]):
            self._waiting[id(member)] = (x, h)
        return hs[0]

    def scaled(self, layer, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """DoRA's output of each token whose slot holds a DoRA adapter on this layer: ``f ⊙ (W x + s·B A x) + b``
        from ``y`` = ``W x + b + s·B A x``, as ``f ⊙ y + (1 - f) ⊙ b`` (PEFT's DoRA forward at inference, f =
        m / ||W + s·BA||_c per slot, ``pool_host.dora_output_scale``); f is 1 for every other token, which keeps
        its y bit for bit. A call forced gathered (a decode step captured as a CUDA graph) scales always, where
        the layer has output scales at all: a replay may meet DoRA rows its capture did not."""
        if layer.out_scale is None or not (self.gathered or layer.dora_slots & self.used):
            return y
        rows = self._scale_rows.get(x.shape)
        if rows is None:
            base = layer.out_scale.shape[0] - 1  # the row of ones for base tokens
            per_row = self._tokens_per_row(x)
            if self.table is not None:  # the step's slots on the device (what a captured graph reads)
                rows = torch.where(self.table < 0, base, self.table).long()
                rows = rows.repeat_interleave(per_row) if per_row > 1 else rows
            else:
                rows = torch.tensor([s if s >= 0 else base for s in self.token_slots for _ in range(per_row)],
                                    device=y.device)
            self._scale_rows[x.shape] = rows
        f = layer.out_scale.index_select(0, rows).view(y.shape)
        out = y * f
        return out if bias is None else out.addcmul_(bias, 1 - f)

    def add_terms(self, path: str, layer):
        """A forward hook for a plain layer: its output plus the pooled terms."""
        def hook(module, args, output):
            return self.terms(layer, args[0], output, getattr(module, "bias", None))
        return hook

    def attach(self, path: str, module: nn.Module, layer):
        """Make the plain layer ``module`` add the pooled terms for this call; returns a handle whose
        ``remove()`` undoes it. A plain ``nn.Linear`` (its own forward, a float weight, no forward set on it
        already) gets its forward replaced (``epilogue_forward``) when ``sgmv_epilogue()``; any other layer
        (quantized, GPT-2 ``Conv1D``), or with the switch off, a forward hook (``add_terms``)."""
        if self.epilogue and _plain_linear(module):
            return _ForwardOverride(module, self.epilogue_forward(module, layer))
        return module.register_forward_hook(self.add_terms(path, layer))

    def epilogue_forward(self, module: nn.Linear, layer):
        """The forward of a plain ``nn.Linear`` inside this call. A prefill-shaped input (the SGMV path) whose
        tokens are more than half adapted on this layer runs ``linear_mixed_lora``: the terms (and the bias)
        written into a fresh buffer, which the base GEMM then adds into in its epilogue: no read-modify-write
        of the output. Byte count of the memory-bound work: N stores of the terms plus T - N of the base rows'
        bias, against 2N for the read-modify-write of the N adapted rows, so the epilogue pays off for
        N > T / 2 (the GEMM's read of the buffer hides under its compute). Any other input (decode's
        gathered kernel, few adapted tokens, gradients or autocast on) runs the base forward and ``terms``,
        as the hook does; no adapted token here: the base forward alone."""
        base_forward = module.forward  # the class's, bound

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self._per_row(x) is None and not torch.is_autocast_enabled(x.device.type) and not (
                    torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad)):
                batch = self.batch(x, layer.present())
                if not batch.segments:
                    return base_forward(x)
                if 2 * batch.num_adapted > batch.num_tokens:
                    flat = x.reshape(-1, x.shape[-1])
                    y = linear_mixed_lora(flat, module.weight, module.bias, layer.A, layer.B, layer.scales, batch,
                                          layer.ranks)
                    return self.scaled(layer, x, y.view(*x.shape[:-1], y.shape[-1]), module.bias)
            return self.terms(layer, x, base_forward(x), module.bias)
        return forward

    def pass_routing(self, path: str, layer):
        """A forward pre-hook for a DeltaLayer: passes it a routing that does both parts."""
        routing = LayerRouting(self, layer)

        def hook(module, args, kwargs):
            return args, {**kwargs, "routing": routing}
        return hook


_UNSEEN = object()


def _plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` computes exactly ``F.linear(x, weight, bias)`` with a float weight it holds (a
    quantized subclass of ``nn.Linear`` overrides forward) and has no forward set on the instance (a nested
    routed call's, kept)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in module.__dict__ and module.weight.is_floating_point() and module.weight.dim() == 2)


class _ForwardOverride:
    """A forward set on one module for a routed call; ``remove()`` restores the class's."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` in ``model``, or None (``get_submodule`` through the child dicts: a routed call
    resolves every pooled layer, and ``nn.Module.__getattr__`` costs microseconds a level)."""
    module = model
    for name in path.split(".") if path else ():
        module = module._modules.get(name)
        if module is None:
            return None
    return module


class LayerRouting:
    """What ``DeltaLayer.forward(x, routing=...)`` calls: the model's own adapters by rows (or the bare
    base), then the pooled terms."""

    def __init__(self, call: PoolCall, layer):
        self.call, self.layer = call, layer

    def forward(self, module: DeltaLayer, x: torch.Tensor) -> torch.Tensor:
        if self.call.model_rows is not None and len(module.deltas):
            y = self.call.model_rows.forward(module, x)
        else:
            if module.merged:
                raise ValueError(f"per-row routing needs unmerged adapters; {module.merged} are merged into this layer")
            y = module.geometry.base_forward(module, x)
        return y if self.layer is None else self.call.terms(self.layer, x, y, getattr(module, "bias", None))
