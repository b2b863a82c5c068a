"""CUDA graphs over a model's decoder (or encoder) layers for training: one graph launch per layer and direction.

A training step of the fast path launches about a hundred kernels per decoder layer from Python
autograd functions. On a fast GPU the host cannot keep up (docs/speed_notes.md): the 1B step was
busy on the GPU for 95 ms of 113, and on a slower host even an 8B step waits for Python. A graphed
stack records each layer's forward and backward once and replays them with one launch each.

How (the scheme of ``torch.cuda.make_graphed_callables``, with the layers chained):

* On the first call of the stack's first layer (and again whenever what it records would change:
  shapes, dtypes, the adapters in use, a parameter moved or frozen) every layer is warmed up eagerly
  on a side stream, then its forward is captured with the previous layer's static output as its
  static input, then every backward in reverse order with the next layer's static input gradient as
  its static output gradient. All graphs share one memory pool and replay in capture order, so the
  pool holds what one eager step would.
* Captures are cached by their inputs' shapes and settings (at most ``max_cached``, least recently used
  freed first), each in its own memory pool: rows padded to a few widths (an encoder's one-example rows,
  ``train.objective.width_buckets``) replay the capture of their width without recapturing. A change of
  the layers' state drops them all.
* A call replays the layer's forward graph inside a ``torch.autograd.Function`` whose backward
  replays the backward graph. That graph adds the parameter gradients into buffers that serve as the
  parameters' ``.grad`` (one launch per layer where AccumulateGrad would copy each gradient): a
  ``.grad`` reset to None is zeroed first, so gradient accumulation and ``zero_grad`` work as in eager
  mode. Gradient hooks on the parameters would be skipped, so a stack with them stays eager.
* Inputs are copied into the static buffers only where they are not already them: the first layer's
  hidden states and the shared tensor arguments (RoPE's cos/sin) once per step, the last layer's
  output gradient once per step.

A layer runs eagerly instead (same results, no graph) when grad is off, the model is in eval mode,
the inputs are not on a CUDA device, a layer is called out of order or with other arguments than
the first layer got, or a non-tensor argument is not a plain value (a KV cache). Hooks registered on
the layers would run at capture only, so a stack with hooks stays eager.

Contract: call ``backward`` of a step before the next graphed forward (the buffers are reused; a late
backward raises), and the hidden states the layers return are overwritten by the next step.
Parameters are read in place, so optimizers that update them in place (all of torch's) are fine;
replacing a parameter's storage (``.to()``, ``.data =``) is noticed and triggers a recapture.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import warnings

import torch
import torch.nn as nn

from deltatune.fast.blocks import hidden_states_of
from deltatune.kernels.functional import add_many_

__all__ = ["GraphedStack", "graph_layers", "ungraph_layers"]

# The layer at whose call a step's state check runs (``GraphedStack.call``): by then the GPU has
# the first layers' replays to run while the host checks.
VERIFY_AT = 2

# Captures a stack keeps (``GraphedStack.max_cached``): one per input shape, so an encoder's rows padded
# to up to this many widths replay without recapturing.
MAX_CACHED = 8


def _rng_states(device: torch.device) -> list:
    """(generator, copy of its state) of the CUDA generator a capture on ``device`` registers."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return [(gen, gen.clone_state())]


def _restore_rng(states: list) -> None:
    """Put back the generators' states from before a capture that failed. A capture registers the CUDA
    generator and counts the random offsets it hands out inside the graph; a failed capture never
    closes that count, and every later random op outside a capture then fails ("Offset increment
    outside graph capture encountered unexpectedly"), which would end the eager training the failure
    falls back to."""
    for gen, state in states:
        gen.graphsafe_set_state(state)


def _flat(kwargs: dict):
    """(path, value) pairs of the keyword arguments, tuples and lists opened one level (RoPE's (cos, sin))."""
    items = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, (tuple, list)):
            items += [((name, j), v) for j, v in enumerate(value)]
        else:
            items.append(((name,), value))
    return items


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _state(layers) -> tuple[tuple, bool]:
    """What captures of ``layers`` depend on besides their inputs (module identities, parameter and buffer
    storages, grad flags, and what adapter layers say in ``state_signature()``), and whether any hook is set that a replay would skip
    (module hooks would run at capture only; gradient hooks would not see the gradients the graphs write).

    Runs before every graphed step, while the GPU waits for the first layer (transformers synchronises
    just before it), so it is written for speed: one walk over ``_modules`` and flat comprehensions
    (``nn.Module.modules()``/``parameters()`` build prefix strings and memo sets: ~4x the time), and
    ``state_signature`` looked up on the class (a miss through ``nn.Module.__getattr__`` raises).
    """
    mods, stack = [], list(reversed(layers))
    while stack:
        m = stack.pop()
        mods.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    params = [p for m in mods for p in m._parameters.values() if p is not None]
    hooked = (any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in mods)
              or any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params))
    sig = ([(id(m), m.training) for m in mods] + [(id(p), p.data_ptr(), p.dtype, p.requires_grad) for p in params]
           + [(b.data_ptr(), b.dtype) for m in mods for b in m._buffers.values() if b is not None]
           + [state(m) for m in mods for state in (getattr(type(m), "state_signature", None),) if state is not None])
    return tuple(sig), hooked


def _signature(layer: nn.Module) -> tuple:
    """``_state`` of one layer: what a capture of it depends on."""
    return _state([layer])[0]


class _Captured:
    """One layer's graphs and static tensors."""

    __slots__ = ("fwd", "bwd", "x", "out", "params", "grad_out", "grad_in", "used", "grads")

    def __init__(self, fwd, x, out, params):
        self.fwd, self.x, self.out, self.params = fwd, x, out, params
        self.bwd = self.grad_out = self.grad_in = None
        self.used, self.grads = [], []  # the parameters the layer uses, and their gradient buffers


class GraphedStack:
    """CUDA graphs over consecutive decoder layers (see the module docstring).

    Args:
        layers: the layers, in call order; each is called as ``layer(hidden_states, **kwargs)``.
        forwards: the callables that run each layer (its forward without this wrapper).
        max_recaptures: after this many captures for changed shapes or settings the stack stays
            eager (each capture costs a warm-up step; inputs whose length changes every step would
            recapture every step).
        max_cached: captures kept for reuse (least recently used freed first).

    ``check_every`` (attribute, default 1): the layers' state is checked on every this-many-th step only.
    A caller that owns the model between steps (``deltatune train``) may raise it: a check costs about half
    a millisecond of Python, a tenth of a small encoder's graphed step, and a change made between checks
    is replayed stale until the next one (``torch.cuda.make_graphed_callables`` never checks).
    """

    def __init__(self, layers, forwards, max_recaptures: int = 16, max_cached: int = MAX_CACHED):
        self.layers, self.forwards = list(layers), list(forwards)
        self.max_recaptures, self.max_cached = max_recaptures, max_cached
        self.check_every = 1  # check the layers' state on every this-many-th step (1: every step)
        self.unchecked = 0  # steps replayed since the last check
        self.captures = 0
        self.cache: collections.OrderedDict = collections.OrderedDict()  # key -> (caps, static kwargs), LRU last
        self.caps: list[_Captured] | None = None  # the graphs in use (the cache's entry for ``key``)
        self.key = None  # the inputs' shapes and settings those graphs were captured for
        self.signature = None  # the layers' state (``_state``) every cached capture saw; None: check it first
        self.pending = None  # (x, kwargs) of this step's first layer while its state check is pending
        self.storages = []  # the captured parameters' and buffers' storages, kept for stale replays
        self.kwargs = None  # the static keyword arguments the graphs in use read
        self.sources = None  # the tensors the current step's first layer got, by path
        self.generation = 0
        self.prepared = -1  # the generation whose gradient buffers the first backward made ready
        self.next = -1  # the layer expected next in this step (-1: none; eager until the first layer)
        self.off = None  # why the stack runs eagerly for good
        self.anchor = torch.empty(0, requires_grad=True)
        self.previous = [None] * len(self.layers)  # the layers' instance forwards before ``graph_layers``

    # -- calls ------------------------------------------------------------------------------------------
    def call(self, i: int, hidden_states, *args, **kwargs):
        """Layer ``i``'s output: replayed from its graph where that applies, else from its forward."""
        applies = self._applies(i, hidden_states, args, kwargs)
        if self.pending is not None and i > 0 and (i >= VERIFY_AT or not applies):  # the chain ends or it is time
            (x, first_kwargs), self.pending = self.pending, None
            signature, hooked = _state(self.layers)
            if hooked or signature != self.signature:
                hidden_states = self._redo(i, x, first_kwargs)
                applies = self._applies(i, hidden_states, args, kwargs)
        if not applies:
            self.next = -1  # the rest of this step runs eagerly
            return self.forwards[i](hidden_states, *args, **kwargs)
        self.next = i + 1
        # The anchor (a leaf that requires grad) makes the output require grad when only parameters do.
        return _Replay.apply(self, i, hidden_states, *([self.anchor] if self.caps[i].used else []))

    def _applies(self, i, x, args, kwargs) -> bool:
        if (self.off or args or not torch.is_grad_enabled() or not x.is_cuda or torch.cuda.is_current_stream_capturing()
                or torch.compiler.is_compiling() or not self.layers[i].training):
            return False
        flat = _flat(kwargs)
        if any(not (isinstance(v, torch.Tensor) or _plain(v)) for _, v in flat):
            return False
        if i != 0:  # the rest of a step: the previous layer's static output and the first layer's arguments
            same = dict(flat).keys() == self.sources.keys() if self.sources is not None else False
            return (same and self.next == i and x.data_ptr() == self.caps[i - 1].out.data_ptr()
                    and all((v is self.sources[p]) if isinstance(v, torch.Tensor) else (v == self.sources[p])
                            for p, v in flat))
        if any(isinstance(v, torch.Tensor) and v.requires_grad for _, v in flat):
            return False
        key = self._key(x, flat)
        cached = self.cache.get(key) if self.signature is not None else None
        if cached is not None and self.unchecked + 1 < self.check_every:  # trusted: no state check this step
            self._use(key, cached)
            self.unchecked += 1
        elif cached is not None and len(self.layers) > VERIFY_AT:
            # Replay at once and check the layers' state (``_state``, milliseconds of Python) when layer
            # VERIFY_AT is called, while the GPU runs the first layers. A forward replay writes only the
            # graphs' own buffers, so if the state changed, ``_redo`` discards those and redoes them.
            self._use(key, cached)
            self.pending = (x, kwargs)
            self.unchecked = 0
        else:
            signature, hooked = _state(self.layers)
            if hooked:  # checked every step: hooks may come after a capture
                return self._turn_off("a layer has hooks, which would not run in the replays")
            if signature != self.signature:  # every cached capture read the old state
                self._release()
            cached = self.cache.get(key)
            if cached is None:
                if self.captures >= self.max_recaptures:
                    return self._turn_off(f"{self.captures} captures: shapes or settings change between steps "
                                          "(pad inputs to a few fixed lengths to graph them)")
                rng = _rng_states(x.device)
                try:
                    cached = self._capture(x, kwargs)
                except Exception as e:  # an op that can't be captured: train eagerly, say why
                    self._release()
                    _restore_rng(rng)
                    return self._turn_off(f"capture failed: {type(e).__name__}: {str(e)[:200]}")
                self._remember(key, cached)
            self._use(key, cached)
            self.signature = signature
            self.unchecked = 0
        self.generation += 1
        self.sources = dict(flat)
        return True

    def _redo(self, i: int, x, kwargs):
        """Layers 0 to i - 1 again from the first layer's input ``x``, after the step's state check (at layer
        VERIFY_AT, or where the chain of replays broke) found the layers changed since the capture: the
        first call checks in full, then recaptures, or runs eagerly if hooks came. Their output."""
        self.signature = None
        self.next = -1
        for j in range(i):
            x = self.call(j, x, **kwargs)
        return x

    def _key(self, x, flat):
        args = tuple((p, tuple(v.shape), v.dtype, v.device, v.stride()) if isinstance(v, torch.Tensor) else (p, v)
                     for p, v in flat)
        amp = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return tuple(x.shape), x.dtype, x.device, x.stride(), x.requires_grad, args, amp

    def _turn_off(self, why: str) -> bool:
        self.off = why
        warnings.warn(f"deltatune: CUDA graphs off for this model ({why}); training continues without them",
                      stacklevel=4)
        return False

    # -- capture ----------------------------------------------------------------------------------------
    def _release(self):
        """Forget every capture (the layers changed, or a capture failed)."""
        if self.cache:  # a replay of the graphs may still run (``_redo``)
            torch.cuda.synchronize(next(iter(self.cache.values()))[0][0].x.device)
        self.cache.clear()
        self.caps = self.key = self.signature = self.kwargs = self.sources = self.pending = None
        self.storages = []
        self.next = -1

    def _use(self, key, cached):
        """Make the cached capture for ``key`` the one the step replays."""
        self.caps, self.kwargs = cached
        self.key = key
        self.cache.move_to_end(key)

    def _remember(self, key, cached):
        """Cache a capture for ``key``; beyond ``max_cached`` the least recently used one is freed (inputs
        padded to a few widths, one capture each, replay without recapturing)."""
        self.cache[key] = cached
        while len(self.cache) > self.max_cached:
            _, (caps, _) = self.cache.popitem(last=False)
            torch.cuda.synchronize(caps[0].x.device)  # its last replay may still run

    def _static_kwargs(self, kwargs):
        """Copies of the tensor arguments (the graphs' static inputs), in the structure of ``kwargs``."""
        out = {}
        for name, value in kwargs.items():
            if isinstance(value, (tuple, list)):
                out[name] = type(value)(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in value)
            else:
                out[name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return out

    def _capture(self, x, kwargs):
        """Warm up, then capture every layer's forward (in order) and backward (in reverse); returns the
        layers' captures and the static keyword arguments they read. Each capture has its own memory pool."""
        self.captures += 1
        device = x.device
        stream = torch.cuda.Stream(device)
        pool = torch.cuda.graph_pool_handle()
        static_x = torch.empty_like(x)
        static_x.copy_(x)
        static = self._static_kwargs(kwargs)
        # The captures differentiate fresh leaves over the parameters' storage: a parameter's own
        # AccumulateGrad node may belong to an older step on another stream, which breaks a capture.
        named = [[(n, p) for n, p in layer.named_parameters() if p.requires_grad] for layer in self.layers]
        # What the graphs read stays allocated while they exist: a replay before the state check notices a
        # replaced storage reads the old one, never freed (or unmapped) memory.
        self.storages = [t.untyped_storage() for layer in self.layers
                         for t in (*layer.parameters(), *layer.buffers())]
        leaves = [[p.detach().requires_grad_(True) for _, p in ps] for ps in named]

        def run(i, xi):
            with _swapped(self.layers[i], [n for n, _ in named[i]], leaves[i]):
                return hidden_states_of(self.forwards[i](xi, **static))

        amp = _amp_without_cache()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), amp, torch.enable_grad():
            for _ in range(2):  # lazy initialisation (cuBLAS handles, Triton compiles, cuDNN plans) happens here
                for i in range(len(self.layers)):
                    xi = static_x.detach().requires_grad_(i > 0 or x.requires_grad)
                    out = run(i, xi)
                    inputs = ([xi] if xi.requires_grad else []) + leaves[i]
                    if out.requires_grad and inputs:
                        torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
                    del out
        torch.cuda.current_stream(device).wait_stream(stream)
        caps, h, needs = [], static_x, x.requires_grad
        with amp, torch.enable_grad():
            for i in range(len(self.layers)):
                xi = h.detach().requires_grad_(needs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = run(i, xi)
                caps.append(_Captured(graph, xi, out, [p for _, p in named[i]]))
                h, needs = out, out.requires_grad
            for i in reversed(range(len(caps))):
                cap = caps[i]
                if not cap.out.requires_grad:  # no adapter up to here: nothing to differentiate
                    cap.out = cap.out.detach()
                    continue
                grad_out = caps[i + 1].grad_in if i + 1 < len(caps) else torch.empty_like(cap.out)
                inputs = ([cap.x] if cap.x.requires_grad else []) + leaves[i]
                buffers = [torch.zeros_like(p) for p in cap.params]  # outside the pool: they outlive the step
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    grads = torch.autograd.grad(cap.out, inputs, grad_out, allow_unused=True)
                    param_grads = grads[1:] if cap.x.requires_grad else grads
                    used = [j for j, g in enumerate(param_grads) if g is not None]
                    if used:  # accumulate in the graph: one launch, where AccumulateGrad would copy each
                        add_many_([buffers[j] for j in used], [param_grads[j] for j in used])
                cap.bwd, cap.grad_out = graph, grad_out
                cap.grad_in = grads[0] if cap.x.requires_grad else None
                cap.used, cap.grads = [cap.params[j] for j in used], [buffers[j] for j in used]
                cap.out = cap.out.detach()  # the autograd graph is spent; keep the static output only
                del grads, param_grads
        return caps, static

    # -- replay -----------------------------------------------------------------------------------------
    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cap = self.caps[i]
        if i == 0:
            if x.data_ptr() != cap.x.data_ptr():
                cap.x.copy_(x)
            for path, value in _flat(self.kwargs):
                if isinstance(value, torch.Tensor):
                    value.copy_(self.sources[path])
        cap.fwd.replay()
        return cap.out

    def backward(self, i: int, generation: int, grad: torch.Tensor):
        if generation != self.generation or self.caps is None:
            raise RuntimeError("a CUDA-graphed layer's backward ran after a later forward reused its buffers: "
                               "call backward() before the next forward, or enable the fast path without cuda_graphs")
        cap = self.caps[i]
        if cap.bwd is None:  # only unused parameters needed a gradient
            return None
        if grad.data_ptr() != cap.grad_out.data_ptr():
            cap.grad_out.copy_(grad)
        # The graph adds into the buffers, which serve as .grad: zero one whose .grad was reset (set to
        # None), take over one the caller assigned; zero_grad(set_to_none=False) zeroes them in place. The
        # step's first backward (its last replayed layer) does this for every layer replayed before it: one
        # launch zeroes them all.
        if self.prepared != generation:
            self.prepared = generation
            caps = self.caps[:i + 1]
        else:
            caps = (cap,)
        fresh = [(p, b) for c in caps for p, b in zip(c.used, c.grads) if p.grad is not b]
        if fresh:
            reset = [b for p, b in fresh if p.grad is None]
            if reset:
                torch._foreach_zero_(reset)
            for p, b in fresh:
                if p.grad is not None:
                    b.copy_(p.grad)
                p.grad = b
        cap.bwd.replay()
        return cap.grad_in


@contextlib.contextmanager
def _swapped(layer: nn.Module, names, tensors):
    """``layer`` with its parameters ``names`` (qualified) replaced by ``tensors`` for the duration."""
    saved = []
    try:
        for name, tensor in zip(names, tensors):
            owner, _, leaf = name.rpartition(".")
            module = layer.get_submodule(owner) if owner else layer
            saved.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = tensor
        yield
    finally:
        for module, leaf, param in reversed(saved):
            module._parameters[leaf] = param


def _amp_without_cache():
    """The caller's CUDA autocast, with its cast cache off (a cached cast made in a capture would be stale)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stack, i, x, *anchor):
        ctx.stack, ctx.i, ctx.generation, ctx.n_anchor = stack, i, stack.generation, len(anchor)
        return stack.forward(i, x).detach()  # a fresh tensor object over the static output

    @staticmethod
    def backward(ctx, grad):
        # The parameters' gradients are added to their .grad inside the backward graph (GraphedStack.backward).
        grad_in = ctx.stack.backward(ctx.i, ctx.generation, grad)
        return (None, None, grad_in if ctx.needs_input_grad[2] else None) + (None,) * ctx.n_anchor


def graph_layers(layers) -> GraphedStack:
    """Route calls of ``layers`` (consecutive decoder or encoder layers) through CUDA graphs;
    ``ungraph_layers`` undoes it."""
    layers = list(layers)
    stack = GraphedStack(layers, [layer.forward for layer in layers])
    stack.previous = [layer.__dict__.get("forward") for layer in layers]  # instance forwards (patched), or None
    for i, layer in enumerate(layers):
        layer.forward = _bind(stack, i, _positional_names(layer.forward))
    return stack


def _positional_names(forward) -> tuple[str, ...]:
    """The names of ``forward``'s parameters after the hidden states that a caller may pass by position
    (BERT's encoder passes the attention mask so): the graphs take every other argument by keyword."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind is not p.POSITIONAL_OR_KEYWORD:
            break
        names.append(p.name)
    return tuple(names)


def _bind(stack: GraphedStack, i: int, names: tuple[str, ...]):
    def forward(hidden_states, *args, **kwargs):
        if args and len(args) <= len(names) and not kwargs.keys() & set(names[:len(args)]):
            kwargs, args = {**dict(zip(names, args)), **kwargs}, ()
        return stack.call(i, hidden_states, *args, **kwargs)
    return forward


def ungraph_layers(stack: GraphedStack) -> None:
    """Restore the layers' own forwards and free the graphs."""
    for layer, previous in zip(stack.layers, stack.previous):
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous
    stack._release()
