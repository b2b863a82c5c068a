"""The OpenAI API's shapes: request bodies (pydantic models) and the JSON the server answers with.

Shapes follow OpenAI's API reference (Chat Completions, Completions, the streaming chunk objects,
the error object ``{"error": {"message", "type", "param", "code"}}``); adapter loading follows vLLM's
``/v1/load_lora_adapter`` bodies, and both generation bodies take vLLM's extra sampling fields
(``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``use_beam_search``,
``best_of``, ``length_penalty``, ``include_stop_str_in_output``; vLLM's ``SamplingParams`` and OpenAI
server docs give their names and meanings). Fields the engine cannot honour are refused with a 400
(``logprobs``, ``echo``, ``logit_bias``, ``min_p``, ...: see ``request_params``), never silently
ignored; ``user`` and other unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "LoadAdapterRequest", "UnloadAdapterRequest",
           "error_body", "usage", "chat_response", "chat_chunk", "completion_response", "completion_chunk",
           "new_id"]


class ApiError(Exception):
    """An error answered in OpenAI's schema with HTTP ``status``; ``param`` names the request field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object for an HTTP ``status``."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                                 "invalid_request_error"),
                      "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    """The sampling fields both endpoints take: OpenAI's, then vLLM's extras (checked against each
    other and mapped to ``SamplingParams`` by ``request_params.sampling_params``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN / Infinity (Python's json reads them): 400

    model: str
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    user: Optional[str] = None
    logit_bias: Optional[dict] = None
    # vLLM's extra sampling fields (in the JSON body; the openai client sends them through extra_body=)
    top_k: Optional[int] = Field(None, ge=-1)
    """The k most likely tokens only; -1 or 0: all (vLLM's -1)."""
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    use_beam_search: bool = False
    best_of: Optional[int] = Field(None, ge=1, le=16)
    """With use_beam_search: the beam width (default n); n <= best_of."""
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    include_stop_str_in_output: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings", "stop")
        return stops


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(_Request):
    role: str
    content: Union[str, list[dict], None] = None

    def text(self, index: int) -> str:
        """The message's text (content parts of type "text" joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported by this server, "
                                    f"got type {part.get('type')!r}", f"messages.{index}.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None

    def requested_max_tokens(self) -> tuple[Optional[int], str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def refuse_unsupported(self) -> None:
        if self.logprobs or self.top_logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None

    def requested_max_tokens(self) -> tuple[Optional[int], str]:
        return self.max_tokens, "max_tokens"

    def refuse_unsupported(self) -> None:
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs")
        if self.echo:
            raise ApiError(400, "echo is not supported by this server", "echo")

    def prompts(self) -> list:
        """One prompt (text or token ids) per entry."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return list(self.prompt)


class LoadAdapterRequest(_Request):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Request):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1)


_Sampling.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


# -- responses --------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, outputs: list, usage_: dict) -> dict:
    """A ``chat.completion`` object from finished outputs (GenerationOutput), one choice each."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                         "finish_reason": o.finish_reason} for i, o in enumerate(outputs)],
            "usage": usage_, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, index: int | None = None, delta: dict | None = None,
               finish_reason: str | None = None, usage_: dict | None = None, with_usage: bool = False) -> dict:
    """A ``chat.completion.chunk``: one choice's ``delta`` (or its ``finish_reason``), or, with
    ``index`` None, the last chunk carrying ``usage`` and no choices."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                         "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def completion_response(rid: str, model: str, outputs: list, usage_: dict) -> dict:
    """A ``text_completion`` object: one choice per output (prompt-major, then ``n``)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                        for i, o in enumerate(outputs)],
            "usage": usage_, "system_fingerprint": None}


def completion_chunk(rid: str, model: str, created: int, index: int | None = None, text: str = "",
                     finish_reason: str | None = None, usage_: dict | None = None, with_usage: bool = False) -> dict:
    """A streamed ``text_completion`` chunk (``index`` None: the last one, with ``usage`` only)."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk

