"""``create_app``: an OpenAI-compatible HTTP server (FastAPI) over ``deltatune.serve.Engine``.

The request's ``model`` names the base (``base_name``) or an adapter, as vLLM, LoRAX and NIM do;
``/v1/models`` lists the base and each adapter (``parent``: the base); adapters are loaded and
unloaded at run time through vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
when ``allow_adapter_loading`` is set, from directories under ``adapter_root`` only.

One ``EngineWorker`` thread owns the engine; the asyncio side tokenizes (with its own copy of the
tokenizer), checks, submits, and turns the worker's events into JSON or server-sent events.
FastAPI is imported by this module only (``deltatune serve`` and ``create_app`` need the ``serve`` extra).
Every refusal is an OpenAI error object with a 4xx status; a client that goes away has its request
aborted (its KV blocks freed).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from deltatune.serve.metrics import Metrics
from deltatune.serve.openai_api import (
    ApiError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, chat_chunk, chat_response,
    completion_chunk, completion_response, error_body, new_id, usage,
)
from deltatune.serve.request_params import beam_choices, sampling_params, with_stop_string
from deltatune.serve.worker import EngineWorker, WorkerStopped, to_queue

__all__ = ["create_app"]

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter", "/health", "/metrics")


@dataclass
class _State:
    """What the endpoints share (touched by the asyncio thread only)."""

    worker: EngineWorker
    tokenizer: object
    base_name: str
    api_key: str | None
    allow_adapter_loading: bool
    adapter_root: str | None
    max_concurrent_requests: int
    max_request_bytes: int
    max_tokens_limit: int | None
    max_model_len: int
    vocab_size: int
    eos_ids: frozenset
    """The engine's end-of-sequence ids (a beam hypothesis ending at one finished with "stop")."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapters requests may name (name -> directory)."""
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine, base_name: str, api_key: str | None = None, allow_adapter_loading: bool = False,
               adapter_root: str | None = None, max_concurrent_requests: int = 64, max_request_bytes: int = 1 << 20,
               max_tokens_limit: int | None = None):
    """The FastAPI app serving ``engine`` (its adapters already added are servable by name).

    Args:
        engine: a ``deltatune.serve.Engine`` with a tokenizer; owned by the app's worker thread from
            startup (the app's lifespan) to shutdown (which lets running requests finish).
        base_name: the ``model`` name of the base model.
        api_key: requests to /v1/* must send ``Authorization: Bearer <api_key>`` (None: no auth).
        allow_adapter_loading: offer /v1/load_lora_adapter and /v1/unload_lora_adapter.
        adapter_root: the directory that adapters loaded over HTTP must lie in (required with loading).
        max_concurrent_requests: generation requests in flight at once; more get a 429.
        max_request_bytes: larger request bodies get a 413.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for (None: the model's length).
    Returns the app; run it with uvicorn.
    """
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer")
    if allow_adapter_loading and not adapter_root:
        raise ValueError("adapter loading over HTTP needs an adapter_root: the directory adapters may be loaded from")
    try:
        tokenizer = copy.deepcopy(engine.tokenizer)  # the engine thread keeps its own: tokenizers are not shared
    except Exception:
        tokenizer = engine.tokenizer
    worker = EngineWorker(engine)
    state = _State(worker, tokenizer, base_name, api_key, allow_adapter_loading,
                   os.path.realpath(adapter_root) if adapter_root else None, max_concurrent_requests,
                   max_request_bytes, max_tokens_limit, engine.scheduler.max_model_len,
                   engine.model.config.vocab_size, frozenset(engine.eos_ids),
                   adapters={name: engine._adapters[name] for name in engine.adapters()})

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.shutdown, True)

    app = FastAPI(title="deltatune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.deltatune = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(_validation_body(e.errors()), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        gauges = {"deltatune_requests_running": ("Requests waiting or running in the engine.",
                                                 worker.num_requests()),
                  "deltatune_http_requests_in_flight": ("Generation requests being answered.", state.in_flight),
                  "deltatune_resident_adapters": ("Adapters servable by name.", len(state.adapters)),
                  "deltatune_engine_step_failures_total": ("Engine steps that raised.", worker.steps_failed)}
        return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": state.created, "owned_by": "deltatune",
                "max_model_len": state.max_model_len}
        data = [{"id": base_name, **card, "root": base_name, "parent": None}]
        data += [{"id": name, **card, "root": name, "parent": base_name} for name in state.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _read(request, state, ChatRequest)
        req.refuse_unsupported()
        adapter = _adapter_of(state, req.model)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # no chat template, or one that refuses these messages
            raise ApiError(400, f"messages: the model's chat template cannot render them: {e}", "messages")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
        return await _generate(request, state, req, adapter, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _read(request, state, CompletionRequest)
        req.refuse_unsupported()
        adapter = _adapter_of(state, req.model)
        prompts = [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else p for p in req.prompts()]
        return await _generate(request, state, req, adapter, prompts, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        _loading_allowed(state)
        req = await _read(request, state, LoadAdapterRequest)
        name = req.lora_name
        if name == base_name or name in state.adapters:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        path = _adapter_dir(state, req.lora_path)
        try:
            await asyncio.wrap_future(worker.call(lambda eng: eng.add_adapter(name, path)))
        except (ValueError, OSError, KeyError) as e:  # AdapterFileError is a ValueError
            raise ApiError(400, f"could not load adapter '{name}': {e}", "lora_path")
        state.adapters[name] = path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        _loading_allowed(state)
        req = await _read(request, state, UnloadAdapterRequest)
        name = req.lora_name
        if name not in state.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found")
        path = state.adapters.pop(name)  # new requests for it get a 404 from now on
        deadline = time.monotonic() + 60
        while True:  # requests already running with it finish first
            try:
                await asyncio.wrap_future(worker.call(lambda eng: eng.remove_adapter(name)))
                break
            except ValueError as e:
                if time.monotonic() > deadline:
                    state.adapters[name] = path
                    raise ApiError(409, f"adapter '{name}' is still in use: {e}", "lora_name")
                await asyncio.sleep(0.05)
            except KeyError:
                break
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


# -- one generation request ------------------------------------------------------------------------------
async def _generate(request, state: _State, req, adapter: str | None, prompts: list[list[int]], chat: bool):
    """Submit ``req.n`` requests per prompt (one beam search per prompt with ``use_beam_search``, its ``n``
    best hypotheses the choices); answer JSON, or server-sent events when ``req.stream``."""
    stops = req.stop_strings()
    requested, name = req.requested_max_tokens()
    if requested is not None and requested < 1:
        raise ApiError(400, f"{name} must be at least 1, got {requested}", name)
    limit = state.max_tokens_limit
    if requested is not None and limit is not None and requested > limit:
        raise ApiError(400, f"{name} is {requested}; this server allows at most {limit}", name)
    if state.in_flight >= state.max_concurrent_requests:
        raise ApiError(429, f"the server is answering {state.in_flight} requests, its limit; retry later",
                       code="rate_limit_exceeded")
    subs = []  # (prompt, SamplingParams) of each engine request, prompt-major
    for prompt in prompts:
        room = max(1, state.max_model_len - len(prompt))
        max_new = requested if requested is not None else min(room, limit or room)
        subs += [(prompt, params) for params in sampling_params(req, max_new, state.vocab_size)]
    state.in_flight += 1
    loop, queue, ids, done = asyncio.get_running_loop(), asyncio.Queue(), [], {}
    handed_off = False  # to the stream, which frees the requests and the slot when it ends
    try:
        for index, (prompt, params) in enumerate(subs):
            try:
                ids.append(await asyncio.wrap_future(
                    state.worker.submit(prompt, adapter, params, to_queue(loop, queue, index))))
            except KeyError:
                raise ApiError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
            except (ValueError, TypeError) as e:  # RequestRefused: a prompt that can never fit
                raise ApiError(400, str(e), "messages" if chat else "prompt")
            except WorkerStopped as e:
                raise ApiError(503, str(e))
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if not req.stream:
            checked = [time.monotonic()]
            while len(done) < len(subs):
                try:
                    index, event = await _next_event(request, queue, checked)
                except _Gone:  # nobody to answer; the finally aborts the requests
                    return Response(status_code=499)
                if event[0] == "error":
                    raise ApiError(event[1], event[2])
                if event[0] == "done":
                    done[index] = event[1]
            outs = _choices(state, req, [done[i] for i in range(len(subs))], stops)
            use = usage(prompt_tokens, sum(len(o.token_ids) for o in outs))
            state.metrics.tokens(use["prompt_tokens"], use["completion_tokens"])
            body = (chat_response if chat else completion_response)(rid, req.model, outs, use)
            return JSONResponse(body)
        handed_off = True  # the stream, or the background task if the stream never started (the client
        cleanup = _Cleanup(state, ids)  # left at once), frees them
        return StreamingResponse(_stream(request, state, req, queue, cleanup, len(subs), rid, created,
                                         prompt_tokens, chat, stops), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}, background=BackgroundTask(cleanup))
    finally:
        if not handed_off:
            for request_id in ids:  # finished ones are no-ops

                _abort(state, request_id)
            state.in_flight -= 1


def _choices(state: _State, req, outs: list, stops: list[str]) -> list:
    """The answer's choices from the engine's finished outputs: a beam search's ``n`` best hypotheses
    each; the stop string put back with ``include_stop_str_in_output``."""
    if req.use_beam_search:
        stop_ids = set(req.stop_token_ids or ()) | (set() if req.ignore_eos else set(state.eos_ids))
        return [c for o in outs for c in beam_choices(o, req.n, stop_ids, state.tokenizer)]
    if req.include_stop_str_in_output:
        return [dataclasses.replace(o, text=with_stop_string(o, stops, state.tokenizer)) for o in outs]
    return outs


async def _stream(request, state: _State, req, queue: asyncio.Queue, cleanup: "_Cleanup", count: int, rid: str,
                  created: int, prompt_tokens: int, chat: bool, stops: list[str]):
    """The server-sent events of a streamed answer, ending with ``data: [DONE]``."""
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    model, ended, generated = req.model, set(), 0

    def sse(chunk: dict) -> str:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        if chat:
            for i in range(count):
                yield sse(chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""},
                                     with_usage=with_usage))
        checked = [time.monotonic()]
        while len(ended) < count:
            index, event = await _next_event(request, queue, checked)
            if event[0] == "error":
                yield sse(error_body(event[1], event[2]))
                break
            if event[0] == "delta":
                yield sse(chat_chunk(rid, model, created, index, {"content": event[1]}, with_usage=with_usage)
                          if chat else completion_chunk(rid, model, created, index, event[1], with_usage=with_usage))
            else:
                out = event[1]
                tail = with_stop_string(out, stops, state.tokenizer)[len(out.text):] \
                    if req.include_stop_str_in_output else ""
                if tail:  # the stop string the engine held back and cut, sent as the last piece
                    yield sse(chat_chunk(rid, model, created, index, {"content": tail}, with_usage=with_usage)
                              if chat else completion_chunk(rid, model, created, index, tail, with_usage=with_usage))
                ended.add(index)
                generated += len(out.token_ids)
                yield sse(chat_chunk(rid, model, created, index, {}, out.finish_reason, with_usage=with_usage)
                          if chat else completion_chunk(rid, model, created, index, "", out.finish_reason,
                                                        with_usage=with_usage))
        if len(ended) == count:
            state.metrics.tokens(prompt_tokens, generated)
            if with_usage:
                use = usage(prompt_tokens, generated)
                yield sse(chat_chunk(rid, model, created, usage_=use, with_usage=True) if chat
                          else completion_chunk(rid, model, created, usage_=use, with_usage=True))
        yield "data: [DONE]\n\n"
    except _Gone:
        pass
    finally:  # also when the client went away (the task is cancelled): free what is still running
        cleanup()


class _Cleanup:
    """Aborts a streamed answer's requests (finished ones are no-ops) and ends it in flight, once."""

    def __init__(self, state: _State, ids: list[int]):
        self.state, self.ids, self.done = state, ids, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            for request_id in self.ids:
                _abort(self.state, request_id)
            self.state.in_flight -= 1


async def _next_event(request, queue: asyncio.Queue, checked: list[float]) -> tuple:
    """The next ``(index, event)``; raises ``_Gone`` if the client disconnects meanwhile. Whether it did
    is asked every half second (``checked[0]``: when it was last asked), also while events keep coming:
    a non-streamed answer receives every token as an event, so asking only when none came for half a
    second would let a client that gave up keep its request generating to the end."""
    while True:
        now = time.monotonic()
        if now - checked[0] >= 0.5:
            checked[0] = now
            if await request.is_disconnected():
                raise _Gone()
        try:
            return await asyncio.wait_for(queue.get(), 0.5)
        except asyncio.TimeoutError:
            pass


class _Gone(Exception):
    """The client disconnected."""


def _abort(state: _State, request_id: int) -> None:
    try:
        state.worker.abort(request_id)
    except WorkerStopped:  # the worker fails what is left when it stops
        pass


# -- checks -----------------------------------------------------------------------------------------------
async def _read(request, state: _State, model_cls):
    """The JSON body parsed into ``model_cls``; 413 past the size limit, 400 naming a bad field."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > state.max_request_bytes:
        raise ApiError(413, f"the request body has {size} bytes; this server takes at most {state.max_request_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_request_bytes:
            raise ApiError(413, f"the request body is over {state.max_request_bytes} bytes, this server's limit")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        body = _validation_body(e.errors())
        raise ApiError(400, body["error"]["message"], body["error"]["param"])


def _validation_body(errors: list) -> dict:
    """OpenAI's error object naming the first bad field of pydantic ``errors``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's failed branches add their type names to the location ("stop.str"): keep the field's path
    loc = [part for part in loc if part not in ("str", "int", "list[str]", "list[int]", "function-after")]
    param = ".".join(loc) or None
    return error_body(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param)


def _adapter_of(state: _State, model: str) -> str | None:
    if model == state.base_name:
        return None
    if model in state.adapters:
        return model
    raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")


def _loading_allowed(state: _State) -> None:
    if not state.allow_adapter_loading:
        raise ApiError(404, "adapter loading over HTTP is off; start the server with --allow-adapter-loading")


def _adapter_dir(state: _State, path: str) -> str:
    """The real path of adapter directory ``path`` (relative to the root, or absolute) if it lies
    under the adapter root, with its files there too (no ``..``, no symlink out); else a 400."""
    root = state.adapter_root
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([real, root]) != root:
        raise ApiError(400, f"lora_path {path!r} is outside the adapter root; adapters load from under it only",
                       "lora_path")
    if not os.path.isdir(real):
        raise ApiError(400, f"lora_path {path!r} is not a directory under the adapter root", "lora_path")
    for name in os.listdir(real):
        inner = os.path.realpath(os.path.join(real, name))
        if os.path.commonpath([inner, root]) != root:
            raise ApiError(400, f"lora_path {path!r}: {name} links outside the adapter root", "lora_path")
    if not os.path.isfile(os.path.join(real, "adapter_model.safetensors")):
        raise ApiError(400, f"lora_path {path!r} has no adapter_model.safetensors (only safetensors adapters load)",
                       "lora_path")
    return real


class _Guard:
    """ASGI middleware: bearer-token auth on /v1/*, the body size limit by Content-Length, and the
    metrics of every request (endpoint, status, latency)."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]
        endpoint = path if path in _ENDPOINTS else "other"

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await JSONResponse(error_body(*refusal), status_code=refusal[0])(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.observe(endpoint, status[0], time.perf_counter() - start)

    def _refusal(self, scope, path: str) -> tuple | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.state.api_key
        if key and path.startswith("/v1/"):
            sent = headers.get("authorization", "")
            if not sent.startswith("Bearer "):
                return 401, "missing API key: send the header 'Authorization: Bearer <key>'", None, "invalid_api_key"
            if not secrets.compare_digest(sent[len("Bearer "):].encode(), key.encode()):
                return 401, "incorrect API key provided", None, "invalid_api_key"
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.state.max_request_bytes:
            return 413, (f"the request body has {size} bytes; this server takes at most "
                         f"{self.state.max_request_bytes}"), None, None
        return None
