"""What an HTTP generation request asks of the engine: its sampling fields as ``SamplingParams``, and
the engine's outputs as the request's choices.

The fields are OpenAI's and vLLM's extras, with vLLM's names and meanings (vLLM's ``SamplingParams``
and its OpenAI server's "extra parameters"): ``top_k`` (-1 or 0: off), ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``include_stop_str_in_output``, and beam search with
``use_beam_search``, the beam width ``best_of`` (default ``n``) and ``length_penalty``; the ``n`` best
hypotheses are the choices. A combination the engine cannot honour is a 400 naming the field, never
a silent change: sampling settings with beam search (its rule is transformers' ``do_sample=False``),
a stream of beams (the engine has the hypotheses only at the end), ``n`` over the beam width,
``best_of`` above ``n`` without beam search (no log-probabilities to rank sampled answers by), and
vLLM fields the engine does not have (``min_p``, ``min_tokens``, ``early_stopping``, ``logit_bias``).
"""

from __future__ import annotations

import dataclasses

from deltatune.serve.openai_api import ApiError
from deltatune.serve.sampling import SamplingParams

__all__ = ["sampling_params", "beam_choices", "with_stop_string"]


def sampling_params(req, max_new_tokens: int, vocab_size: int) -> list[SamplingParams]:
    """The engine requests of one prompt of ``req`` (a ChatRequest or CompletionRequest): ``req.n``
    sampled ones (seeds ``seed``, ``seed + 1``, ...), or one beam search whose hypotheses are the
    ``n`` choices. Raises ApiError(400) naming the field for what cannot be honoured."""
    _refuse_unsupported(req)
    stop_ids = list(req.stop_token_ids or [])
    bad = [t for t in stop_ids if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"stop_token_ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})",
                       "stop_token_ids")
    common = dict(max_new_tokens=max_new_tokens, stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
                  repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty)
    if req.use_beam_search:
        params = [_params(req, common, use_beam_search=True, beam_width=_beam_width(req), temperature=0.0,
                          length_penalty=req.length_penalty)]
    else:
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, f"best_of={req.best_of} with n={req.n}: ranking sampled answers needs their "
                                f"log-probabilities, which this server does not compute; give best_of = n, or "
                                f"use_beam_search", "best_of")
        if req.length_penalty != 1.0:
            raise ApiError(400, "length_penalty applies to beam search only: set use_beam_search or leave it 1.0",
                           "length_penalty")
        params = [_params(req, common, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          top_k=0 if req.top_k in (None, -1) else req.top_k, frequency_penalty=req.frequency_penalty,
                          presence_penalty=req.presence_penalty, stop=req.stop_strings(),
                          seed=None if req.seed is None else req.seed + i) for i in range(req.n)]
    return params


def _refuse_unsupported(req) -> None:
    """vLLM / OpenAI fields this engine does not have, at anything but their no-op value."""
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
    if req.min_p:
        raise ApiError(400, "min_p is not supported by this server (top_k and top_p are)", "min_p")
    if req.min_tokens:
        raise ApiError(400, "min_tokens is not supported by this server", "min_tokens")
    if req.early_stopping is not False:
        raise ApiError(400, "early_stopping: beam search here stops by transformers' default rule "
                            "(early_stopping=false) only", "early_stopping")


def _beam_width(req) -> int:
    """The beam width (``best_of``, else ``n``), after refusing what beam search cannot honour."""
    width = req.n if req.best_of is None else req.best_of
    if req.n > width:
        raise ApiError(400, f"n={req.n} is more than the beam width best_of={width}: beam search returns at "
                            f"most best_of hypotheses", "n")
    if req.stream:
        raise ApiError(400, "stream is not supported with use_beam_search: the hypotheses are known only when "
                            "the search ends", "stream")
    refused = [("temperature", bool(req.temperature), "must be 0 or unset"),
               ("top_p", req.top_p is not None and req.top_p < 1, "must be 1 or unset"),
               ("top_k", req.top_k not in (None, -1, 0), "must be -1, 0 or unset"),
               ("frequency_penalty", bool(req.frequency_penalty), "must be 0 (repetition_penalty applies)"),
               ("presence_penalty", bool(req.presence_penalty), "must be 0 (repetition_penalty applies)"),
               ("stop", bool(req.stop), "is not supported (stop_token_ids is)")]
    for name, bad, rule in refused:
        if bad:
            raise ApiError(400, f"{name} {rule} with use_beam_search: beam search is deterministic "
                                f"(transformers' num_beams with do_sample=false)", name)
    return width


def _params(req, common: dict, **fields) -> SamplingParams:
    try:
        return SamplingParams(**common, **fields)
    except ValueError as e:  # checked above already; a rule added to SamplingParams later still answers a 400
        raise ApiError(400, str(e))


def beam_choices(out, n: int, stop_ids: set[int], tokenizer) -> list:
    """The ``n`` best hypotheses of a finished beam-search output (``out.beams``, best first) as outputs
    of their own: token ids, text (special tokens skipped, as the engine's) and finish reason ("stop"
    when the hypothesis ends at an EOS or stop token, else "length")."""
    return [dataclasses.replace(out, token_ids=list(tokens), text=tokenizer.decode(tokens, skip_special_tokens=True),
                                finish_reason="stop" if tokens and tokens[-1] in stop_ids else "length")
            for tokens, _ in out.beams[:n]]


def with_stop_string(out, stops: list[str], tokenizer) -> str:
    """``out.text`` with the stop string that ended it put back (``include_stop_str_in_output``).

    The engine cuts its text, the decoded ``token_ids``, before the first stop string found, so the
    stop string is whichever one the full decoded text continues with there (the longest if several)."""
    if out.finish_reason != "stop" or not stops:
        return out.text
    rest = tokenizer.decode(out.token_ids, skip_special_tokens=True)[len(out.text):]
    found = [s for s in stops if rest.startswith(s)]
    return out.text + max(found, key=len) if found else out.text
