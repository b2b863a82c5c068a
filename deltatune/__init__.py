"""deltatune: parameter-efficient fine-tuning (LoRA, QLoRA, adapters) for PyTorch models.

The core imports torch only; transformers, triton and friends load where they are used.
"""

from deltatune.config import LoraConfig
from deltatune.lora import LAYER_KINDS, LayerKind, LoraLayer, register_layer_kind
from deltatune.model import (
    adapter_params,
    add_adapter,
    combine,
    disabled,
    list_adapters,
    merge,
    remove_adapter,
    set_active,
    unmerge,
)
from deltatune.io import AdapterFileError, load_adapter, save_adapter

__version__ = "0.1.0"


def __getattr__(name):  # lazy subpackages keep `import deltatune` light
    import importlib

    if name in ("quant", "train", "kernels", "data", "fast", "benchmark", "optim"):
        return importlib.import_module(f"deltatune.{name}")
    if name == "quantize_model":
        return importlib.import_module("deltatune.quant").quantize_model
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
