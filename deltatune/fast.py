"""The fast training path: fused LoRA autograd functions, Triton kernels, lean checkpointing, fused loss.

``enable_fast_path(model)`` changes a model in place (and ``disable_fast_path`` is its exact inverse):

* every plain-linear ``LoraLayer`` gets ``forward_impl``: the LoRA linear as one autograd node that
  computes in the activation dtype (bf16) from fp32 master adapter weights, folds the scale into the
  small matmuls and saves only x and the rank-sized ``x @ A.T`` (``deltatune.kernels.lora``);
* Llama-style attention blocks (``q_proj``/``k_proj``/``v_proj``/``o_proj``) run q/k/v as one node
  sharing the input, RoPE in Triton, and SDPA; gated MLPs run as one node that recomputes the SwiGLU
  output in backward; RMSNorms run the Triton kernel (fp32 statistics, saves only ``rstd``);
* with ``checkpoint=True`` each decoder layer keeps only its input for backward (on the CPU with
  ``offload=True``) and recomputes the rest.

Blocks whose configuration the fast forwards don't cover (an attention mask or a KV cache, LoRA
dropout while training, quantized or trainable base weights, other norms) take the model's own
forward at call time, so enabling the fast path never changes what a model computes, only how.

``fused_causal_lm_loss(model, input_ids, labels)`` is the causal-LM loss of the training loop with the
head and cross-entropy fused chunk by chunk (``deltatune.kernels.linear_cross_entropy``): the full
(tokens, vocab) logits never exist and the frozen head gets no weight gradient.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.graphs import _first
from deltatune.kernels import (add_rms_norm, apply_rope, linear_cross_entropy, lora_group, lora_mlp, rms_norm,
                               rms_norm_pass)
from deltatune.kernels.lora import recomputing
from deltatune.lora import LoraLayer

__all__ = ["enable_fast_path", "disable_fast_path", "fast_path_enabled", "fused_causal_lm_loss"]

# Classes whose forward the fast versions reproduce exactly (same math, no extra features).
_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
_MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
_RMSNORM = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
_SILU = {"silu", "swish"}
# Decoder layers whose MLP output feeds only the final residual add (see ``recomputing``).
_DECODER = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


# -- projections ------------------------------------------------------------------------------------------
def _projection(module: nn.Module):
    """``(W, bias, [(A, B, scale), ...])`` for the fused functions, or None where they don't apply."""
    if isinstance(module, LoraLayer):
        weight = module.kind.fused_weight(module)
        if weight is None or getattr(weight, "requires_grad", False):
            return None
        if module.pissa and (not module.enabled or any(n not in module.active for n in module.pissa)):
            return None  # an inactive PiSSA adapter gives its part of W back: the plain forward does that
        adapters = []
        if module.enabled:
            for name in module.active:
                if name in module.merged or name not in module.slots:
                    continue
                slot = module.slots[name]
                if slot.dropout and module.training:
                    return None
                adapters.append((module.lora_A[name], module.lora_B[name], slot.scale))
        return weight, getattr(module, "bias", None), adapters
    if type(module) is nn.Linear and not module.weight.requires_grad:
        return module.weight, module.bias, []
    return None


def _fast_lora_forward(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    proj = _projection(layer)
    if proj is None or not x.is_floating_point():
        return layer.plain_forward(x)
    if not proj[2]:
        return F.linear(x, proj[0], proj[1])
    return lora_group(x, [proj])[0]


# -- blocks -----------------------------------------------------------------------------------------------
def _fast_attention(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                    **kwargs):
    """LlamaAttention.forward for training: no mask (causal), no cache, eval-free dropout."""
    uncovered = (position_embeddings is None or attention_mask is not None or past_key_values is not None
                 or (self.training and self.attention_dropout) or kwargs.get("output_attentions"))
    if uncovered:
        return self._deltatune_forward(hidden_states, position_embeddings=position_embeddings,
                                       attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    b, t, _ = hidden_states.shape
    projs = [_projection(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
    if all(p is not None for p in projs):
        q, k, v = lora_group(hidden_states, projs)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    d = self.head_dim
    cos, sin = position_embeddings
    # (B, T, H, D) each; v is copied only if it is a column block of a stacked q/k/v output, which SDPA
    # would otherwise keep alive whole for its backward. Their gradients come back as one tensor.
    q, k, v = apply_rope(q.view(b, t, -1, d), k.view(b, t, -1, d), cos, sin, v.view(b, t, -1, d))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views
    if self._deltatune_attention == "cudnn":  # cuDNN's fused attention; it takes no GQA, so repeat k, v
        from torch.nn.attention import SDPBackend, sdpa_kernel

        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])  # (B, H, T, D)
    out = out.transpose(1, 2).reshape(b, t, -1)
    return self.o_proj(out), None


def _fast_mlp(self, x):
    projs = [_projection(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if any(p is None for p in projs) or getattr(self.config, "hidden_act", "silu") not in _SILU:
        return self._deltatune_forward(x)
    return lora_mlp(x, *projs)


def _fast_rmsnorm(self, x):
    return rms_norm(x, self.weight, self.variance_epsilon)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) would run on a call of ``module``."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _ours(module: nn.Module, fast) -> bool:
    """Whether ``module``'s forward is the fast path's ``fast`` with no hook to see its call."""
    forward = module.__dict__.get("forward")
    return ("_deltatune_forward" in module.__dict__ and getattr(forward, "__func__", None) is fast
            and not _hooked(module))


def _fast_decoder(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward with the residual add before the second norm fused into it
    (``add_rms_norm``: one pass over the residual stream instead of two, and one in backward), and in
    backward the residual's gradient added in the first norm's backward (``rms_norm_pass``).

    The add after the MLP stays separate: folded into the down projection's low-rank matmul as its C
    (beta = 1), it cost a copy of the residual into that matmul's output (PyTorch's out-of-place addmm
    copies C first), as much as the add (38.4 against 37.5 us a layer on an H200)."""
    norm = self.post_attention_layernorm
    if args or not _ours(norm, _fast_rmsnorm):  # positional extras, the norm isn't ours, or a hook must see it
        return self._deltatune_forward(hidden_states, *args, **kwargs)
    first = self.input_layernorm
    if _ours(first, _fast_rmsnorm):
        residual, normed = rms_norm_pass(hidden_states, first.weight, first.variance_epsilon)
    else:
        residual, normed = hidden_states, first(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=normed, **kwargs)
    residual, hidden_states = add_rms_norm(residual, hidden_states, norm.weight, norm.variance_epsilon)
    return residual + self.mlp(hidden_states)


# -- checkpointing ----------------------------------------------------------------------------------------
_SIDE_STREAMS: dict = {}


def _to_cpu(t: torch.Tensor):
    """Start copying ``t`` into pinned host memory on a side stream; returns (host tensor, event)."""
    stream = _SIDE_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
    stream.wait_stream(torch.cuda.current_stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # keep t's memory from reuse until the copy is done
    event = torch.cuda.Event()
    event.record(stream)
    return host, event


class _Checkpoint(torch.autograd.Function):
    """Run ``fn(x)`` without saving activations; in backward, restore x, recompute and backpropagate.

    Reentrant style (as Unsloth's offloaded checkpoint): gradients of the parameters used inside ``fn``
    accumulate into ``.grad`` during this node's backward, so train with ``loss.backward()``.
    ``anchor`` (an empty tensor that requires grad) keeps the node in the graph when x needs no grad.
    """

    @staticmethod
    def forward(ctx, fn, offload, skip_mlp_output, anchor, x):
        ctx.fn, ctx.device, ctx.skip = fn, x.device, skip_mlp_output
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            out = fn(x)
        if offload and x.is_cuda:
            ctx.host = _to_cpu(x)
            ctx.save_for_backward()
        else:
            ctx.host = None
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.host is not None:
            host, event = ctx.host
            torch.cuda.current_stream(ctx.device).wait_event(event)
            x = host.to(ctx.device, non_blocking=True)
            ctx.host = None
        else:
            (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[4])
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            recomputing.skip_mlp_output = ctx.skip  # the layer's output values are not used, only its graph
            recomputing.active = True
            try:
                out = ctx.fn(x)
            finally:
                recomputing.skip_mlp_output = recomputing.active = False
        torch.autograd.backward(out, dout)
        return None, None, None, None, x.grad if ctx.needs_input_grad[4] else None


def _checkpointed(forward, offload: bool, skip_mlp_output: bool, anchor: torch.Tensor):
    @functools.wraps(forward)
    def run(hidden_states, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        return _Checkpoint.apply(lambda h: _first(forward(h, *args, **kwargs)), offload, skip_mlp_output, anchor,
                                 hidden_states)
    return run


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and type(m[0]).__name__.endswith("DecoderLayer"):
            return list(m)
    return []


# -- enable / disable -------------------------------------------------------------------------------------
def _patch(module: nn.Module, fn) -> None:
    module._deltatune_forward = module.forward
    module.forward = types.MethodType(fn, module)


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
        cuda_graphs: replay the decoder layers that are not checkpointed from CUDA graphs in training
            (``deltatune.graphs``): one launch per layer and direction instead of ~100 from Python, for
            steps the host would otherwise hold back. Captured on the first step (and again when shapes
            or adapters change); call backward before the next forward.
    Raises ValueError if the fast path is already enabled on ``model``, or ``cuda_graphs`` finds no
    decoder layers to graph.
    """
    if attention not in ("sdpa", "cudnn"):
        raise ValueError(f"attention must be 'sdpa' or 'cudnn', got {attention!r}")
    if not isinstance(checkpoint, bool) and not 0.0 < checkpoint <= 1.0:
        raise ValueError(f"checkpoint must be a bool or a fraction in (0, 1], got {checkpoint!r}")
    if fast_path_enabled(model):
        raise ValueError("the fast path is already enabled on this model; disable_fast_path() it first")
    layers = _decoder_layers(model)
    recomputed = math.ceil(float(checkpoint) * len(layers)) if checkpoint else 0
    if cuda_graphs and recomputed == len(layers):
        raise ValueError("cuda_graphs applies to decoder layers without checkpointing; this model has "
                         + ("none" if not layers else "all of them checkpointed (use a fraction below 1)"))
    patched = []
    for m in model.modules():
        if isinstance(m, LoraLayer) and m.kind.fused_weight(m) is not None:
            m.forward_impl = _fast_lora_forward
            patched.append(("impl", m))
        if not kernels:
            continue
        cls = type(m).__name__
        if cls in _ATTENTION and not hasattr(m, "q_norm") and getattr(m, "sliding_window", None) is None:
            _patch(m, _fast_attention)
            m._deltatune_attention = attention
        elif cls in _MLP:
            _patch(m, _fast_mlp)
        elif cls in _RMSNORM and hasattr(m, "variance_epsilon"):
            _patch(m, _fast_rmsnorm)
        else:
            continue
        patched.append(("forward", m))
    for layer in layers[recomputed:] if kernels else []:  # (checkpointed layers keep their own forward)
        if type(layer).__name__ in _DECODER and type(getattr(layer, "post_attention_layernorm", None)).__name__ \
                in _RMSNORM:
            _patch(layer, _fast_decoder)
            patched.append(("forward", layer))
    if checkpoint:
        anchor = torch.empty(0, requires_grad=True)
        patched_mlps = {id(m) for how, m in patched if type(m).__name__ in _MLP}
        for layer in layers[:recomputed]:
            layer._deltatune_forward = layer.forward
            skip = kernels and type(layer).__name__ in _DECODER and id(getattr(layer, "mlp", None)) in patched_mlps
            layer.forward = _checkpointed(layer._deltatune_forward, offload, skip, anchor)
            patched.append(("forward", layer))
    if cuda_graphs:
        from deltatune.graphs import graph_layers

        patched.append(("graphs", graph_layers(layers[recomputed:])))
    model.__dict__["_deltatune_fast"] = patched
    return model


def disable_fast_path(model: nn.Module) -> nn.Module:
    """Undo ``enable_fast_path`` on ``model`` (in place); returns ``model``. No-op if not enabled."""
    for how, m in reversed(model.__dict__.pop("_deltatune_fast", [])):
        if how == "impl":
            m.forward_impl = None
        elif how == "graphs":
            from deltatune.graphs import ungraph_layers

            ungraph_layers(m)
        else:
            del m.forward
            del m._deltatune_forward
            m.__dict__.pop("_deltatune_attention", None)
    return model


def fast_path_enabled(model: nn.Module) -> bool:
    """Whether ``enable_fast_path`` is in effect on ``model``."""
    return "_deltatune_fast" in model.__dict__


# -- loss -------------------------------------------------------------------------------------------------
def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM, as ``model(input_ids, labels=labels).loss``.

    Runs the decoder, then the output head and cross-entropy fused chunk by chunk, so the
    (tokens, vocab) logits are never materialised (in fp32 or at all) and a frozen head gets no
    weight gradient. Falls back to the model's own loss where the head is adapted or not a plain
    linear map, or the model rescales its logits.

    Args:
        model: a transformers causal LM (``get_decoder``/``get_output_embeddings``).
        input_ids: (B, T) token ids.
        labels: (B, T) targets, unshifted (position t predicts labels[t + 1]); ``ignore_index`` skipped.
        attention_mask: optional (B, T) padding mask passed to the decoder.
    Returns:
        the scalar loss (fp32).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    rescaled = any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    if type(head) is not nn.Linear or head.bias is not None or rescaled or not hasattr(model, "get_decoder"):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, d)
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # position t is scored on token t + 1
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1),
                                ignore_index)
