"""Switching a model to the fast training path and back, and the record of what was switched.

``enable_fast_path(model)`` changes a model in place (and ``disable_fast_path`` is its exact inverse):

* every adapter layer whose geometry the fused functions take (``fast.projections.fusable``) gets
  ``forward_impl``: its projection as one autograd node that computes in the activation dtype (bf16)
  from fp32 master adapter weights, folds the scale into the small matmuls and saves only x and the
  rank-sized ``x @ A.T`` (``deltatune.kernels.lora``);
* Llama-style attention, MLP, RMSNorm and decoder modules get the forwards of ``fast.blocks``;
* with ``checkpoint`` each (or the first fraction of the) decoder layer keeps only its input for
  backward (on the CPU with ``offload``) and recomputes the rest (``fast.checkpointing``);
* with ``cuda_graphs`` the other decoder layers replay from CUDA graphs (``fast.graphs``).

Blocks whose configuration the fast forwards don't cover (an attention mask or a KV cache, dropout
while training, quantized or trainable base weights, other norms) take the model's own forward at call
time, so enabling the fast path never changes what a model computes, only how.

What was changed is kept in one ``FastPath`` record on the model (``fast_path_of``); the patched
modules themselves carry only their instance ``forward`` (or ``forward_impl``), which call their
class's forward for what they don't cover.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from deltatune.fast import blocks
from deltatune.fast.checkpointing import checkpointed
from deltatune.fast.projections import fast_layer_forward, fusable

__all__ = ["FastPath", "disable_fast_path", "enable_fast_path", "fast_path_enabled", "fast_path_of", "fuses_blocks"]

_RECORD = "_deltatune_fast_path"  # the one attribute the fast path sets on a model


@dataclass
class FastPath:
    """What ``enable_fast_path`` changed on a model, in order: what ``disable_fast_path`` undoes."""

    impl_layers: list[nn.Module] = field(default_factory=list)  # adapter layers given ``forward_impl``
    # modules given an instance ``forward``, each with the instance forward it had before (None: the class's)
    forwards: list[tuple[nn.Module, object]] = field(default_factory=list)
    graphs: object = None  # the ``fast.graphs.GraphedStack`` over the layers that are not checkpointed
    streams: dict = field(default_factory=dict)  # the offloading copies' side streams, by device


def fast_path_of(model: nn.Module) -> FastPath | None:
    """The record of ``enable_fast_path`` on ``model``, or None if it is not enabled."""
    return model.__dict__.get(_RECORD)


def fast_path_enabled(model: nn.Module) -> bool:
    """Whether ``enable_fast_path`` is in effect on ``model``."""
    return _RECORD in model.__dict__


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and type(m[0]).__name__.endswith("DecoderLayer"):
            return list(m)
    return []


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a transformers encoder (BERT's ``encoder.layer``): graphed where it has no decoder
    layers."""
    for m in model.modules():
        layers = getattr(m, "layer", None)
        if (type(m).__name__.endswith("Encoder") and isinstance(layers, nn.ModuleList) and len(layers)
                and type(layers[0]).__name__.endswith("Layer")):
            return list(layers)
    return []


def _set_forward(record: FastPath, module: nn.Module, forward) -> None:
    """Give ``module`` the instance ``forward`` (a function bound to it, or any callable), noting what it had."""
    record.forwards.append((module, module.__dict__.get("forward")))
    module.forward = forward


def _block_forward(module: nn.Module, attention: str):
    """The ``fast.blocks`` forward for ``module``'s class, or None. Modules that already carry an instance
    forward (someone else's) keep it: the fast forwards fall back to the class's own."""
    if "forward" in module.__dict__:
        return None
    cls = type(module).__name__
    if cls in blocks.ATTENTION and not hasattr(module, "q_norm") and getattr(module, "sliding_window", None) is None:
        return blocks.cudnn_attention_forward if attention == "cudnn" else blocks.attention_forward
    if cls in blocks.MLP:
        return blocks.mlp_forward
    if cls in blocks.RMSNORM and hasattr(module, "variance_epsilon"):
        return blocks.rmsnorm_forward
    return None


def _fused_decoder(layer: nn.Module) -> bool:
    """Whether the decoder forwards of ``fast.blocks`` reproduce ``layer``'s class forward."""
    return (type(layer).__name__ in blocks.DECODER and "forward" not in layer.__dict__
            and type(getattr(layer, "post_attention_layernorm", None)).__name__ in blocks.RMSNORM)


def fuses_blocks(model: nn.Module, attention: str = "sdpa") -> bool:
    """Whether ``enable_fast_path`` would give any module of ``model`` a fused block forward (attention, MLP,
    RMSNorm or decoder layer), that is, more than its adapter layers' fused projections. Where it would
    not (an encoder such as BERT), the fused projections alone save a few kernels a layer and cost more
    Python a call than they save (docs/speed_notes.md, session 12)."""
    if any(_block_forward(m, attention) is not None for m in model.modules()):
        return True
    return any(_fused_decoder(layer) for layer in _decoder_layers(model))


def enable_fast_path(model: nn.Module, kernels: bool = True, checkpoint: bool | float = False,
                     offload: bool = False, attention: str = "sdpa", cuda_graphs: bool = False) -> nn.Module:
    """Switch ``model`` (in place) to the fast training path; returns ``model``.

    Args:
        model: a model with LoRA adapters added (``add_adapter`` first: layers added later run the
            plain path).
        kernels: also swap in the fused attention (q/k/v in one node, RoPE kernel), MLP and RMSNorm
            forwards for Llama-style blocks; False keeps only the fused LoRA linears.
        checkpoint: recompute each decoder layer in backward, keeping only its input; a float in (0, 1]
            recomputes that fraction of the layers (the first ones), a knob between memory and speed:
            each layer left out keeps its activations (about 40 bytes per token per hidden unit for a
            Llama block in bf16) and saves its recomputation (about a quarter of its time).
        offload: keep those inputs in pinned CPU memory between forward and backward (with
            ``checkpoint``).
        attention: "sdpa" (PyTorch's choice of fused attention, GQA native) or "cudnn" (cuDNN's fused
            attention, k and v repeated per query head).
        cuda_graphs: replay the decoder layers that are not checkpointed (an encoder's layers where the model
            has no decoder layers) from CUDA graphs in training
            (``deltatune.fast.graphs``): one launch per layer and direction instead of ~100 from Python, for
            steps the host would otherwise hold back. Captured on the first step (and again when shapes
            or adapters change); call backward before the next forward.
    Raises ValueError if the fast path is already enabled on ``model``, or ``cuda_graphs`` finds no
    decoder or encoder layers to graph.
    """
    if attention not in ("sdpa", "cudnn"):
        raise ValueError(f"attention must be 'sdpa' or 'cudnn', got {attention!r}")
    if not isinstance(checkpoint, bool) and not 0.0 < checkpoint <= 1.0:
        raise ValueError(f"checkpoint must be a bool or a fraction in (0, 1], got {checkpoint!r}")
    if fast_path_enabled(model):
        raise ValueError("the fast path is already enabled on this model; disable_fast_path() it first")
    layers = _decoder_layers(model)
    recomputed = math.ceil(float(checkpoint) * len(layers)) if checkpoint else 0
    graphed = layers[recomputed:] if layers else _encoder_layers(model)
    if cuda_graphs and not graphed:
        raise ValueError("cuda_graphs applies to decoder or encoder layers without checkpointing; this model has "
                         + ("none" if not layers else "all of them checkpointed (use a fraction below 1)"))
    record = FastPath()
    for m in model.modules():
        if fusable(m):
            m.forward_impl = fast_layer_forward
            record.impl_layers.append(m)
        forward = _block_forward(m, attention) if kernels else None
        if forward is not None:
            _set_forward(record, m, types.MethodType(forward, m))
    for layer in layers[recomputed:] if kernels else []:  # (checkpointed layers are wrapped below)
        if _fused_decoder(layer):
            _set_forward(record, layer, types.MethodType(blocks.decoder_forward, layer))
    if checkpoint:
        anchor = torch.empty(0, requires_grad=True)
        for layer in layers[:recomputed]:
            mlp = getattr(layer, "mlp", None)
            # a Llama-family MLP's output feeds only the last residual add: the recomputation may skip it
            skip = (kernels and type(layer).__name__ in blocks.DECODER and mlp is not None
                    and blocks.patched_with(mlp) is blocks.mlp_forward)
            forward = (types.MethodType(blocks.sequential_decoder_forward, layer) if kernels and _fused_decoder(layer)
                       else layer.forward)
            _set_forward(record, layer, checkpointed(forward, record.streams if offload else None, skip, anchor))
    if cuda_graphs:
        from deltatune.fast.graphs import graph_layers

        record.graphs = graph_layers(graphed)
    model.__dict__[_RECORD] = record
    return model


def disable_fast_path(model: nn.Module) -> nn.Module:
    """Undo ``enable_fast_path`` on ``model`` (in place); returns ``model``. No-op if not enabled."""
    record = model.__dict__.pop(_RECORD, None)
    if record is None:
        return model
    if record.graphs is not None:
        from deltatune.fast.graphs import ungraph_layers

        ungraph_layers(record.graphs)
    for module, previous in reversed(record.forwards):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    for layer in record.impl_layers:
        layer.forward_impl = None
    return model
