"""deltatune: parameter-efficient fine-tuning (LoRA, QLoRA, adapters) for PyTorch models.

The facade: the verbs and the method configs. The core imports torch only; transformers, triton and
friends load where they are used, and the heavier subpackages load on first use.
"""

from deltatune.adapters import (
    GEOMETRIES, AdapterModule, DeltaLayer, FullCopies, Geometry, adapter_modules, adapter_params, add_adapter,
    disabled, list_adapters, merge, register_geometry, remove_adapter, routed, set_active, unmerge,
)
from deltatune.formats.files import AdapterFileError, load_adapter, save_adapter
from deltatune.methods import (
    BlockExpansionConfig, BottleneckConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PatternConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig, register_method,
)
from deltatune.methods.lora_combine import combine

__version__ = "0.1.0"

_LAZY = ("quant", "train", "kernels", "fast", "benchmark", "methods", "formats", "adapters", "hub")


def __getattr__(name):  # lazy subpackages keep `import deltatune` light
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"deltatune.{name}")
    if name == "quantize_model":
        return importlib.import_module("deltatune.quant").quantize_model
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
