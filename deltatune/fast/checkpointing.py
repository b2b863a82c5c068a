"""The fast path's own activation checkpointing: a decoder layer keeps only its input (in pinned CPU
memory with ``offload``) and is recomputed in backward.

Reentrant style (as Unsloth's offloaded checkpoint), which lets the recomputation tell the fused nodes
(``deltatune.kernels.lora.recomputing``) that the layer's output values are never read (only its
graph: the down projection's base matmul is skipped) and that its backward follows at once (quantized
weights dequantized for the recomputation are kept for it).
"""

from __future__ import annotations

import functools

import torch

from deltatune.fast.blocks import hidden_states_of
from deltatune.kernels.lora import recomputing

__all__ = ["checkpointed"]


def _to_cpu(t: torch.Tensor, streams: dict):
    """Start copying ``t`` into pinned host memory on a side stream (one per device, kept in ``streams``);
    returns (host tensor, event)."""
    stream = streams.setdefault(t.device, torch.cuda.Stream(t.device))
    stream.wait_stream(torch.cuda.current_stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # keep t's memory from reuse until the copy is done
    event = torch.cuda.Event()
    event.record(stream)
    return host, event


class _Checkpoint(torch.autograd.Function):
    """Run ``fn(x)`` without saving activations; in backward, restore x, recompute and backpropagate.

    Gradients of the parameters used inside ``fn`` accumulate into ``.grad`` during this node's backward,
    so train with ``loss.backward()``. ``anchor`` (an empty tensor that requires grad) keeps the node in
    the graph when x needs no grad. ``streams``: the side streams of the offloading copies, or None.
    """

    @staticmethod
    def forward(ctx, fn, streams, skip_mlp_output, anchor, x):
        ctx.fn, ctx.device, ctx.skip = fn, x.device, skip_mlp_output
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            out = fn(x)
        if streams is not None and x.is_cuda:
            ctx.host = _to_cpu(x, streams)
            ctx.save_for_backward()
        else:
            ctx.host = None
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.host is not None:
            host, event = ctx.host
            torch.cuda.current_stream(ctx.device).wait_event(event)
            x = host.to(ctx.device, non_blocking=True)
            ctx.host = None
        else:
            (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[4])
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with recomputing(skip_mlp_output=ctx.skip):  # with ctx.skip only the graph of the output is used
                out = ctx.fn(x)
        torch.autograd.backward(out, dout)
        return None, None, None, None, x.grad if ctx.needs_input_grad[4] else None


def checkpointed(forward, streams: dict | None, skip_mlp_output: bool, anchor: torch.Tensor):
    """A decoder layer's forward that runs ``forward`` checkpointed while grad is on (as is otherwise).

    Args:
        forward: the layer's forward ``(hidden_states, *args, **kwargs) -> hidden_states``.
        streams: where the offloading side streams live (one dict per ``enable_fast_path``), or None to
            keep the inputs on the device.
        skip_mlp_output: the MLP output feeds only the layer's last residual add (see ``recomputing``).
        anchor: the empty tensor that requires grad, shared by a model's checkpointed layers.
    """
    @functools.wraps(forward)
    def run(hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        return _Checkpoint.apply(lambda h: hidden_states_of(forward(h, *args, **kwargs)), streams, skip_mlp_output,
                                 anchor, hidden_states)
    return run
