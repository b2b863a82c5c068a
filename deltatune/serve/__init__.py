"""Serving many adapters on one base model (issue 18).

* ``pool.py``: ``AdapterPool``, trained LoRA adapters (PEFT-format directories) held as stacked,
  rank-padded slots per target module, LRU-resident on the device, and ``pool.routed(model, rows)``;
* ``lora_mixed.py``: the mixed-adapter layer math, ``base(x) + Σ scale_a · B_a(A_a x)`` per token,
  in PyTorch (the reference, any device) and through the SGMV/BGMV kernels (``kernels/sgmv.py``);
* ``engine.py``: ``Engine``, generation with continuous batching over a paged KV cache
  (``kv_cache.py``, ``scheduler.py``, ``model_runner.py``) and per-request sampling (``sampling.py``).

Nothing here is imported with ``deltatune``; each name below loads its module on first use, and the
modules import torch only (triton on the first kernel launch).
"""

from __future__ import annotations

import importlib

# public name -> the module defining it (loaded on first attribute access)
_EXPORTS = {
    "AdapterPool": "deltatune.serve.pool",
    "PoolError": "deltatune.serve.pool",
    "SlotBatch": "deltatune.serve.lora_mixed",
    "mixed_lora": "deltatune.serve.lora_mixed",
    "Engine": "deltatune.serve.engine",
    "GenerationOutput": "deltatune.serve.engine",
    "RequestRefused": "deltatune.serve.scheduler",
    "SamplingParams": "deltatune.serve.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltatune.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
