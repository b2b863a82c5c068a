"""The one place that decides whether a Triton kernel runs, and the one lazy loader of kernel modules.

Every dispatcher (the fused training ops in ``functional.py``, NF4 dequantization, the fused
dequantize-matmul) asks ``triton_enabled(t)`` and loads its kernels with ``load(module)``, so
``import deltatune`` never imports triton, and the policy below is stated once:

* Triton runs on CUDA tensors when ``import triton`` works;
* ``DELTATUNE_TRITON=0`` turns every kernel off (the PyTorch branches run instead);
* ``DELTATUNE_TRITON=interpret`` together with ``TRITON_INTERPRET=1`` runs them on CPU tensors too,
  through Triton's interpreter (slowly; this is how the tests check the kernels without a GPU).

Imports torch only. The kernel modules (``triton_*.py`` here and in ``deltatune.quant``) import triton
at the top: import them only through ``load``.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["interpreted", "load", "triton_enabled", "triton_importable"]


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether Triton can be imported here (the GPU paths fall back to PyTorch otherwise)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): numpy arithmetic, so the
    kernels round bf16 by hand and multiply bf16 dots in fp32 there, and never fuse multiply-adds."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_enabled(t: torch.Tensor) -> bool:
    """True when ops on ``t`` should run the Triton kernels: a CUDA tensor and triton importable.

    ``DELTATUNE_TRITON=0`` turns the kernels off; ``DELTATUNE_TRITON=interpret`` together with
    ``TRITON_INTERPRET=1`` runs them on CPU tensors too (slowly; for tests).
    """
    mode = os.environ.get("DELTATUNE_TRITON", "1")
    if mode == "0":
        return False
    if not t.is_cuda and not (mode == "interpret" and interpreted()):
        return False
    return triton_importable()


@functools.lru_cache(maxsize=None)
def load(module: str):
    """The kernel module ``module`` (a dotted name), imported on first use (which imports triton)."""
    return importlib.import_module(module)
