"""QLoRA quantization: NF4/FP4 in bitsandbytes' format (with double quantization), int8, the
quantized linear layer that LoRA wraps, and loading of transformers' bitsandbytes checkpoints.

```python
q = dt.quant.quantize(w, kind="nf4", blocksize=64, double_quant=True)   # QuantizedTensor
q.packed                     # uint8 codes, bitsandbytes' byte layout
w2 = q.dequantize(dtype=torch.bfloat16)
dt.quantize_model(model, kind="nf4")                                     # nn.Linear -> QuantLinear
dt.quant.store_as_float(model, torch.bfloat16)   # codes as frozen bf16 parameters, so FSDP shards them
```
Everything here needs torch only; Triton is imported on the first dequantization of a CUDA tensor
(``deltatune.kernels.backend`` decides and loads). Layering, downward: ``codes`` (tables) <-
``triton_dequant`` / ``triton_matmul`` (kernel launchers) <- ``nf4`` (format, reference quantizer and
dequantizer) <- ``qlinear`` / ``hf_bnb``; quant imports kernels, never the other way.
"""

from deltatune.quant.int8 import Int8Tensor, dequantize_int8, quantize_int8
from deltatune.quant.codes import FP4_CODE, NF4_CODE, code_table, dynamic_map
from deltatune.quant.nf4 import (
    BLOCKSIZES,
    QuantizedTensor,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from deltatune.quant.qlinear import (
    QuantLinear,
    QuantLinearGeometry,
    export_merged,
    merge_errors,
    quantize,
    quantize_model,
)
from deltatune.quant.hf_bnb import load_bnb_4bit, quant_state_from_keys
from deltatune.quant.storage import store_as_buffers, store_as_float

__all__ = [
    "quantize", "QuantizedTensor", "Int8Tensor", "quantize_model", "QuantLinear", "QuantLinearGeometry",
    "export_merged", "merge_errors", "load_bnb_4bit", "quant_state_from_keys", "quantize_4bit",
    "dequantize_4bit", "quantize_int8", "dequantize_int8", "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit", "code_table", "dynamic_map", "NF4_CODE", "FP4_CODE", "BLOCKSIZES",
    "store_as_float", "store_as_buffers",
]
