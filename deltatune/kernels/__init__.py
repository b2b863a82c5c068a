"""Fused training kernels: RMSNorm (alone or after the residual add), RoPE, SwiGLU, linear + cross-entropy, and the LoRA linear functions.

Each op is a ``torch.autograd.Function`` that runs its Triton kernel on CUDA tensors and an equivalent
PyTorch computation elsewhere (CPU, or where triton is missing), so the fast path runs anywhere and the
kernels are checked against the same math. Triton is imported only when a kernel first runs on CUDA;
the kernel files (``triton_*.py``) import it at the top,
so import them only through here. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors (tests).
"""

from deltatune.kernels.functional import (add_rms_norm, apply_rope, linear_cross_entropy, rms_norm, rms_norm_pass,
                                         swiglu, triton_enabled)
from deltatune.kernels.lora import lora_group, lora_mlp

__all__ = ["add_rms_norm", "apply_rope", "linear_cross_entropy", "lora_group", "lora_mlp", "rms_norm", "rms_norm_pass",
           "swiglu", "triton_enabled"]
