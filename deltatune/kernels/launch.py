"""Launching Triton kernels with less host time: Triton's specialization once, then the compiled kernel.

``launch(kernel, grid, *args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does. Triton's
``JITFunction.run`` binds and specializes every argument on each call, tens of microseconds of host
time, more than many of these kernels take on the GPU; a training step launches hundreds of them, and
the small-model step is bound by the host. Here the first launch of each specialization goes through
Triton and returns its ``CompiledKernel``; later launches call that directly (``CompiledKernel[grid]``,
with every argument positional, as ``JITFunction.run`` itself passes them), keyed on exactly what Triton
specializes on: a tensor's dtype and 16-byte alignment, an integer's width, ``== 1`` and ``% 16 == 0``,
and the value of every ``tl.constexpr`` parameter.
Under ``TRITON_INTERPRET=1`` (CPU tensors) every launch takes Triton's own path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["launch"]

_COMPILED: dict = {}  # (kernel, device, specialization, constexprs, options) -> CompiledKernel


def _specialization(arg) -> tuple:
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg), arg if isinstance(arg, bool) else None
    return not -2 ** 31 <= arg < 2 ** 31, arg == 1, arg % 16 == 0


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``triton.jit`` kernel; ``kwargs`` hold its constexprs and
    launch options (``num_warps``, ...)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or not first.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        kernel[grid](*args, **kwargs)
        return
    names = kernel.arg_names[len(args):]
    constexprs = tuple(kwargs[n] for n in names)  # the rest of the signature, in order
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    fixed = kernel.constexprs  # indices of constexpr parameters: their values are part of the kernel
    spec = tuple(("value", a) if i in fixed else _specialization(a) for i, a in enumerate(args))
    key = (kernel, first.device.index, spec, constexprs, options)
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **kwargs)
        return
    compiled[grid](*args, *constexprs, stream=torch.cuda.current_stream(first.device).cuda_stream)
