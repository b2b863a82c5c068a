"""Fast forwards of Llama-family blocks (Llama, Mistral, Qwen2): attention, gated MLP, RMSNorm, decoder layer.

``enable_fast_path`` binds these as the modules' instance ``forward`` (``deltatune.fast.path``). Each
reproduces its class's forward exactly (same math, no extra features) for the training case and calls
the class's own forward (``type(self).forward``) for anything else, so enabling the fast path never
changes what a model computes, only how:

* attention: q/k/v as one fused node sharing the input, RoPE in Triton, SDPA (or cuDNN's attention);
  packed rows (``cu_seq_lens_q``/``max_length_q`` given) by PyTorch's variable-length FlashAttention;
* MLP: one node that recomputes the SwiGLU output in backward;
* RMSNorm: the Triton kernel (fp32 statistics, saves only ``rstd``);
* decoder layer: the residual adds fused into the norms, and each norm's output handed to the fused
  node that takes it as ``norm=(x, weight, eps)``, so that node saves the norm's input (kept anyway)
  instead of its output and recomputes it in backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.fast.projections import projection
from deltatune.kernels import add_rms_norm, apply_rope, lora_group, lora_mlp, rms_norm, rms_norm_pass

__all__ = ["ATTENTION", "DECODER", "MLP", "RMSNORM", "attention_forward", "cudnn_attention_forward",
           "decoder_forward", "hidden_states_of", "mlp_forward", "patched_with", "rmsnorm_forward",
           "sequential_decoder_forward"]

# Classes whose forward the fast versions reproduce exactly (same math, no extra features).
ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
RMSNORM = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
_SILU = {"silu", "swish"}
# Decoder layers whose MLP output feeds only the final residual add (``kernels.lora.recomputing``).
DECODER = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def hidden_states_of(out):
    """The hidden states of a decoder layer's output (transformers < 5 returned a tuple)."""
    if isinstance(out, tuple):
        if any(o is not None for o in out[1:]):
            raise RuntimeError("the fast path's checkpoint and CUDA graphs need decoder layers that return only "
                               "hidden states")
        return out[0]
    return out


def patched_with(module: nn.Module):
    """The function ``module``'s instance forward runs (one of this file's, once patched), or None."""
    return getattr(module.__dict__.get("forward"), "__func__", None)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) would run on a call of ``module``."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def _ours(module: nn.Module, fast) -> bool:
    """Whether ``module``'s forward is the fast path's ``fast`` with no hook to see its call."""
    return patched_with(module) is fast and not _hooked(module)


# -- attention ----------------------------------------------------------------------------------------------
def _varlen_attention():
    """PyTorch's variable-length FlashAttention (``torch.nn.attention.varlen.varlen_attn``) and whether it
    takes ``window_size`` (newer) or ``is_causal`` (older), or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


_VARLEN = _varlen_attention()


def _packed(kwargs, hidden_states) -> bool:
    """Whether this call carries packed rows' boundaries (``cu_seq_lens_q``, as transformers' flattening
    collators give them) that the variable-length kernel can take here (CUDA, fp16/bf16)."""
    return (kwargs.get("cu_seq_lens_q") is not None and kwargs.get("max_length_q") is not None
            and _VARLEN is not None and hidden_states.is_cuda
            and hidden_states.dtype in (torch.float16, torch.bfloat16))


def _varlen(q, k, v, cu_seq_lens, max_length, scale):
    """Causal attention within each packed example: q (B, T, Hq, D), k/v (B, T, Hkv, D) -> (B, T, Hq*D).

    The rows are one token stream of B*T tokens cut at ``cu_seq_lens`` (int32, (segments + 1,));
    a row's trailing padding is a segment of its own."""
    b, t, hq, d = q.shape
    fn, windowed, gqa = _VARLEN
    q, k, v = q.reshape(b * t, hq, d), k.reshape(b * t, k.shape[2], d), v.reshape(b * t, v.shape[2], d)
    if not gqa and k.shape[1] != hq:
        k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    extra = {"enable_gqa": k.shape[1] != hq} if gqa else {}
    if windowed:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    out = fn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale, **extra)
    return out.reshape(b, t, hq * d)


def _attention(self, hidden_states, position_embeddings, attention_mask, past_key_values, norm, cudnn, kwargs):
    """LlamaAttention.forward for training: no mask (causal) or packed rows (variable-length), no cache,
    eval-free dropout."""
    packed = _packed(kwargs, hidden_states)
    uncovered = (position_embeddings is None or (attention_mask is not None and not packed)
                 or past_key_values is not None
                 or kwargs.get("cache") is not None  # transformers >= 5.2x passes the KV cache as ``cache``
                 or (self.training and self.attention_dropout) or kwargs.get("output_attentions"))
    if uncovered:
        if past_key_values is not None:  # (passed on only if given: newer transformers warn of it beside ``cache``)
            kwargs["past_key_values"] = past_key_values
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    b, t, _ = hidden_states.shape
    projs = [projection(m) for m in (self.q_proj, self.k_proj, self.v_proj)]
    if all(p is not None for p in projs):
        q, k, v = lora_group(hidden_states, projs, norm)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    d = self.head_dim
    cos, sin = position_embeddings
    # (B, T, H, D) each; v is copied only if it is a column block of a stacked q/k/v output, which SDPA
    # would otherwise keep alive whole for its backward. Their gradients come back as one tensor.
    q, k, v = apply_rope(q.view(b, t, -1, d), k.view(b, t, -1, d), cos, sin, v.view(b, t, -1, d))
    if packed:  # each example attends to itself only (the 4-D mask transformers built is not needed)
        out = _varlen(q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], self.scaling)
        return self.o_proj(out), None
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views
    if cudnn:  # cuDNN's fused attention; it takes no GQA, so repeat k, v
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


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                      norm=None, **kwargs):
    """The attention with PyTorch's choice of fused SDPA (GQA native). ``norm``: ``(x, weight, eps)`` when
    ``hidden_states`` is ``rms_norm(x, weight, eps)`` (the decoder forwards below pass it)."""
    return _attention(self, hidden_states, position_embeddings, attention_mask, past_key_values, norm, False, kwargs)


def cudnn_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                            past_key_values=None, norm=None, **kwargs):
    """``attention_forward`` with cuDNN's fused attention (k and v repeated per query head)."""
    return _attention(self, hidden_states, position_embeddings, attention_mask, past_key_values, norm, True, kwargs)


# -- MLP and norm -------------------------------------------------------------------------------------------
def mlp_forward(self, x, norm=None):
    """LlamaMLP.forward as one fused node where every projection has a fused form; ``norm`` as above."""
    projs = [projection(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    if any(p is None for p in projs) or getattr(self.config, "hidden_act", "silu") not in _SILU:
        return type(self).forward(self, x)
    return lora_mlp(x, *projs, norm=norm)


def rmsnorm_forward(self, x, record=None):
    """LlamaRMSNorm.forward by the Triton kernel. ``record``: a list that gets ``(x, output)``, for a caller
    that calls the module through its hooks and must learn whether the output it got back is still this
    norm of x (a forward hook may replace it, a pre-hook the input)."""
    y = rms_norm(x, self.weight, self.variance_epsilon)
    if record is not None:
        record.append((x, y))
    return y


# -- decoder layer ------------------------------------------------------------------------------------------
_FUSED_INPUT = {attention_forward, cudnn_attention_forward, mlp_forward}  # forwards that take ``norm=``


def _normed(module: nn.Module, x):
    """``module(x)`` for a decoder layer's norm, and the ``norm=`` that tells a fused node its output is
    ``rms_norm(x, weight, eps)`` (None where that is not known: not our forward, or a hook replaced it)."""
    if patched_with(module) is not rmsnorm_forward:
        return module(x), None
    weight, eps = module.weight, module.variance_epsilon
    if not _hooked(module):
        return rms_norm(x, weight, eps), (x, weight, eps)
    record = []
    y = module(x, record=record)
    return y, ((record[0][0], weight, eps) if record and record[0][1] is y else None)


def _with_norm(module: nn.Module, norm) -> dict:
    """``{"norm": norm}`` for a call of ``module`` whose forward takes it, else nothing."""
    return {"norm": norm} if norm is not None and patched_with(module) in _FUSED_INPUT else {}


def sequential_decoder_forward(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward op for op (the residual adds separate, as transformers does them), with each
    norm's output handed to the fused node after it. What checkpointed layers recompute."""
    if args:  # positional extras: the class's forward knows what they mean
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    normed, norm = _normed(self.input_layernorm, hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=normed, **_with_norm(self.self_attn, norm), **kwargs)
    residual = residual + hidden_states
    normed, norm = _normed(self.post_attention_layernorm, residual)
    return residual + self.mlp(normed, **_with_norm(self.mlp, norm))


def decoder_forward(self, hidden_states, *args, **kwargs):
    """LlamaDecoderLayer.forward with the residual add before the second norm fused into it
    (``add_rms_norm``: one pass over the residual stream instead of two, and one in backward), and in
    backward the residual's gradient added in the first norm's backward (``rms_norm_pass``).

    The add after the MLP stays separate: folded into the down projection's low-rank matmul as its C
    (beta = 1), it cost a copy of the residual into that matmul's output (PyTorch's out-of-place addmm
    copies C first), as much as the add (38.4 against 37.5 us a layer on an H200)."""
    second = self.post_attention_layernorm
    if args or not _ours(second, rmsnorm_forward):  # positional extras, the norm isn't ours, or a hook must see it
        return sequential_decoder_forward(self, hidden_states, *args, **kwargs)
    first = self.input_layernorm
    if _ours(first, rmsnorm_forward):
        norm = (hidden_states, first.weight, first.variance_epsilon)
        residual, normed = rms_norm_pass(*norm)
    else:
        residual = hidden_states
        normed, norm = _normed(first, hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=normed, **_with_norm(self.self_attn, norm), **kwargs)
    residual, normed = add_rms_norm(residual, hidden_states, second.weight, second.variance_epsilon)
    return residual + self.mlp(normed, **_with_norm(self.mlp, (residual, second.weight, second.variance_epsilon)))
