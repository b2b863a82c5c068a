"""The fast training path: fused adapter autograd functions, Triton kernels, lean checkpointing, fused loss.

* ``path.py``: ``enable_fast_path`` / ``disable_fast_path`` and the record of what they changed;
* ``projections.py``: the one question asked of an adapter layer (its fused projection);
* ``blocks.py``: the Llama-family attention / MLP / RMSNorm / decoder forwards;
* ``checkpointing.py``: recompute-in-backward of decoder layers, optionally offloaded to the CPU;
* ``graphs.py``: CUDA graphs over the decoder layers that are not checkpointed;
* ``loss.py``: ``fused_causal_lm_loss``, the head and cross-entropy chunk by chunk.

Imports torch only (triton on the first kernel launch, transformers never).
"""

from deltatune.fast.loss import fused_causal_lm_loss
from deltatune.fast.path import (FastPath, disable_fast_path, enable_fast_path, fast_path_enabled, fast_path_of,
                                 fuses_blocks)

__all__ = ["FastPath", "disable_fast_path", "enable_fast_path", "fast_path_enabled", "fast_path_of",
           "fused_causal_lm_loss", "fuses_blocks"]
