"""The causal-LM loss of the training loop with the output head and cross-entropy fused chunk by chunk
(``deltatune.kernels.linear_cross_entropy``): the full (tokens, vocab) logits never exist and a frozen
head gets no weight gradient."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.kernels import linear_cross_entropy

__all__ = ["fused_causal_lm_loss"]


def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, ignore_index: int = -100,
                         **model_kwargs) -> torch.Tensor:
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
        model_kwargs: more inputs of the decoder: for packed rows ``position_ids`` restarting per example and
            their boundaries (``cu_seq_lens_q``, ``max_length_q``, ...), with no attention_mask.
    Returns:
        the scalar loss (fp32).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    rescaled = any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    model_kwargs["use_cache"] = False
    if type(head) is not nn.Linear or head.bias is not None or rescaled or not hasattr(model, "get_decoder"):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs).loss
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, d)
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # position t is scored on token t + 1
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shifted.reshape(-1),
                                ignore_index)
