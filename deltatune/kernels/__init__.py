"""Fused training kernels: RMSNorm (alone or after the residual add), RoPE, SwiGLU, linear +
cross-entropy, and the LoRA linear functions.

Each op is a ``torch.autograd.Function`` that runs its Triton kernel on CUDA tensors and an equivalent
PyTorch computation elsewhere (CPU, or where triton is missing), so the fast path runs anywhere and the
kernels are checked against the same math. Whether a kernel runs, and the import of its module (which
imports triton), is decided in one place, ``backend.py``; the kernel files (``triton_*.py``) import
triton at the top, so load them only through it. Under ``TRITON_INTERPRET=1`` (with
``DELTATUNE_TRITON=interpret``) they also run on CPU tensors (tests).

Layering: kernels import torch and triton only, never ``deltatune.quant`` (quant imports kernels).
"""

from deltatune.kernels.functional import (add_rms_norm, apply_rope, linear_cross_entropy, rms_norm, rms_norm_pass,
                                         swiglu, triton_enabled)
from deltatune.kernels.lora import lora_group, lora_mlp

__all__ = ["add_rms_norm", "apply_rope", "linear_cross_entropy", "lora_group", "lora_mlp", "rms_norm", "rms_norm_pass",
           "swiglu", "triton_enabled"]
