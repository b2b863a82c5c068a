"""deltatune serve: the OpenAI-compatible HTTP server, driven by the real ``openai`` client over loopback.

A tiny character-level Llama with two PEFT LoRA adapters (random, large enough to change the greedy
answers) serves on a free port; the expected answers come from ``Engine.generate`` before the
server owns the engine.
"""

import copy
import json
import os
import socket
import sys
import threading
import time

import pytest
import torch
import transformers

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
peft = pytest.importorskip("peft")

from test_train import char_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)

from deltatune.serve.engine import Engine  # noqa: E402
from deltatune.serve.server import create_app  # noqa: E402

KEY = "sk-test-key"
BASE = "tiny"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
PROMPTS = ["Hello there", "SELECT name", "abc"]


class Server:
    """uvicorn serving ``app`` in a background thread on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def tiny_engine(**kw):
    """A 2-layer Llama over printable characters, with a chat template and no EOS (answers run to max_tokens)."""
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                                   bos_token_id=None, pad_token_id=tok.pad_token_id, initializer_range=0.2,
                                   max_position_embeddings=2048)
    engine = Engine(transformers.LlamaForCausalLM(cfg), tok, num_blocks=256, max_model_len=2048, **kw)
    engine.eos_ids = set()
    return engine


def make_adapters(model, root, names, seed=10):
    """PEFT LoRA adapters of ``model`` with random B (they change the greedy answer), saved under ``root``."""
    dirs = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
        with torch.no_grad():
            for n, p in wrapped.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        wrapped.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    engine = tiny_engine()
    dirs = make_adapters(engine.model, root, ["alpha", "beta", "gamma"])
    for name in ("alpha", "beta"):
        engine.add_adapter(name, str(dirs[name]))
    expected = {}  # (model, kind, prompt) -> greedy text of 12 tokens
    for model, adapter in ((BASE, None), ("alpha", "alpha"), ("beta", "beta")):
        for prompt in PROMPTS:
            expected[model, "text", prompt] = engine.generate(prompt, adapter, max_new_tokens=12)[0].text
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            expected[model, "chat", prompt] = engine.generate([ids], adapter, max_new_tokens=12)[0].text
    engine.add_adapter("gamma", str(dirs["gamma"]))  # loaded over HTTP later
    expected["gamma", "text", PROMPTS[0]] = engine.generate(PROMPTS[0], "gamma", max_new_tokens=12)[0].text
    engine.remove_adapter("gamma")
    app = create_app(engine, BASE, api_key=KEY, allow_adapter_loading=True, adapter_root=str(root),
                     max_request_bytes=64 << 10, max_tokens_limit=4000)
    server = Server(app)
    server.engine, server.expected, server.state, server.root = engine, expected, app.state.deltatune, root
    server.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield server
    server.close()
    assert not engine.has_unfinished()


def post(served, path, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(served.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=timeout)


def idle(served, timeout=10.0):
    """True once the engine has no requests left (asked on the engine's own thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.state.worker.num_requests() == 0 and \
                not served.state.worker.call(lambda e: e.has_unfinished()).result(10):
            return True
        time.sleep(0.05)
    return False


def test_chat_and_completions_equal_the_engine_for_the_base_and_each_adapter(served):
    c, got = served.client, {}
    for model in (BASE, "alpha", "beta"):
        for prompt in PROMPTS:
            chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=12, temperature=0)
            assert chat.object == "chat.completion" and chat.model == model
            assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
            assert chat.usage.completion_tokens == 12 and chat.usage.total_tokens == chat.usage.prompt_tokens + 12
            got[model, "chat", prompt] = chat.choices[0].message.content
            text = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            assert text.object == "text_completion" and text.usage.prompt_tokens == len(prompt)
            got[model, "text", prompt] = text.choices[0].text
    assert got == {k: v for k, v in served.expected.items() if k[0] != "gamma"}
    # the adapters answer recognisably differently from each other and from the base
    assert len({served.expected[m, "text", PROMPTS[0]] for m in (BASE, "alpha", "beta")}) == 3


def test_streaming_pieces_concatenate_to_the_answer(served):
    c, prompt = served.client, PROMPTS[1]
    chunks = list(c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(pieces) == served.expected["alpha", "chat", prompt] and len([p for p in pieces if p]) > 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    stream = c.completions.create(model="beta", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == served.expected["beta", "text", prompt]
    # n choices, each with its own index; stop strings cut the text (held back while streaming)
    full = served.expected[BASE, "text", prompt]
    stop = full[5:7]
    out = c.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0, n=2, stop=stop)
    assert [ch.text for ch in out.choices] == [full[: full.find(stop)]] * 2
    assert [ch.finish_reason for ch in out.choices] == ["stop", "stop"]
    stream = c.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0, stop=[stop], stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == full[: full.find(stop)]
    assert idle(served)


def test_models_lists_the_base_and_adapters_with_their_parent(served):
    listed = {m.id: m for m in served.client.models.list()}
    assert set(listed) >= {BASE, "alpha", "beta"}
    assert getattr(listed[BASE], "parent", None) is None
    assert listed["alpha"].parent == BASE and listed["beta"].parent == BASE


def test_bad_requests_get_4xx_in_openai_error_schema(served):
    c = served.client
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = post(served, "/v1/models", {}, key=None)
    assert r.status_code in (401, 405)
    r = post(served, "/v1/completions", {"model": BASE, "prompt": "x"}, key=None)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=-3)
    assert e.value.body["param"] == "max_tokens" and "max_tokens must be at least 1" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="at most 4000"):
        c.completions.create(model=BASE, prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="logprobs are not supported"):
        c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], logprobs=True)
    r = post(served, "/v1/chat/completions", '{"model": "tiny", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(served, "/v1/chat/completions", {"model": BASE, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(served, "/v1/completions", {"model": BASE, "prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(served, "/v1/completions", {"model": BASE, "prompt": "x" * (70 << 10)})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="the prompt has 3000 tokens"):  # RequestRefused
        c.completions.create(model=BASE, prompt="y" * 3000, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model=BASE, prompt=[1, 2, 100000], max_tokens=2)
    assert httpx.get(served.url + "/health").status_code == 200  # still serving
    assert idle(served)


def test_over_the_concurrency_limit_is_429(served):
    served.state.max_concurrent_requests = 1
    try:
        body = {"model": BASE, "prompt": "hold", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            with pytest.raises(openai.RateLimitError):
                served.client.completions.create(model=BASE, prompt="x", max_tokens=2)
    finally:
        served.state.max_concurrent_requests = 64
    assert idle(served)  # the closed stream's request was aborted
    assert served.client.completions.create(model=BASE, prompt="x", max_tokens=2).choices[0].text


def test_client_disconnect_aborts_the_request(served):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1800, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        assert served.state.worker.num_requests() == 1
    assert idle(served)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        post(served, "/v1/completions", {"model": BASE, "prompt": "go", "max_tokens": 1800}, timeout=0.5)
    assert idle(served)
    assert served.engine.cache.num_free_blocks == served.engine.cache.num_blocks


def test_adapters_load_and_unload_over_http_from_under_the_root_only(served, tmp_path):
    r = post(served, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma"})
    assert r.status_code == 200 and "gamma" in r.text
    out = served.client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == served.expected["gamma", "text", PROMPTS[0]]
    assert post(served, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma"}).status_code == 400
    outside = make_adapters(tiny_engine().model, tmp_path, ["evil"])["evil"]
    os.symlink(outside, served.root / "link")
    for path in ("../" + tmp_path.name + "/evil", str(outside), "link", "nowhere", "."):
        r = post(served, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    assert "evil" not in {m.id for m in served.client.models.list()}
    r = post(served, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert r.status_code == 200 and "removed" in r.text
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="gamma", prompt="x", max_tokens=2)
    assert post(served, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 404
    served.state.allow_adapter_loading = False
    try:
        r = post(served, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma"})
        assert r.status_code == 404 and "--allow-adapter-loading" in r.json()["error"]["message"]
    finally:
        served.state.allow_adapter_loading = True


def test_a_failing_engine_step_fails_its_requests_and_the_server_goes_on(served):
    engine, step = served.engine, served.engine.step
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()

    engine.step = broken
    try:
        with pytest.raises(openai.InternalServerError, match="boom"):
            served.client.completions.create(model=BASE, prompt="x", max_tokens=3)
        assert served.client.completions.create(model=BASE, prompt="x", max_tokens=3).choices[0].text
    finally:
        del engine.step
    assert idle(served)


def test_metrics_in_prometheus_text(served):
    served.client.completions.create(model=BASE, prompt="x", max_tokens=3)
    text = httpx.get(served.url + "/metrics").text
    assert 'deltatune_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "deltatune_generation_tokens_total" in text and "deltatune_resident_adapters 2" in text
    assert 'deltatune_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}' in text
    assert "deltatune_requests_running 0" in text


def test_small_load_run_mixes_adapters_bad_requests_and_adapter_loading(served):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from load_serve import run_load

    expected = {m: served.expected[m, "text", PROMPTS[0]] for m in (BASE, "alpha", "beta", "gamma")}
    report = run_load(served.url, KEY, expected, PROMPTS[0], requests=150, clients=8, max_tokens=12,
                      load=("gamma", "gamma"), unload="beta")
    assert report["crashes"] == 0 and report["wrong_answers"] == 0, report
    assert report["bad_not_4xx"] == 0 and report["status"].get("200", 0) > 60, report
    assert [e.split(":")[:2] for e in report["events"]] == [["load gamma", " 200 Success"], ["unload beta", " 200 Success"]]
    assert httpx.get(served.url + "/health").status_code == 200
    r = post(served, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "beta"})  # as it was
    assert r.status_code == 200, (r.text, report["events"])
    post(served, "/v1/unload_lora_adapter", {"lora_name": "gamma"})



@pytest.mark.slow
def test_smollm2_with_a_lora_adapter_answers_as_the_engine(smollm2, tmp_path):
    """The real SmolLM2-135M-Instruct and one random LoRA adapter behind the server: a chat completion and
    a streamed completion through the openai client give Engine.generate's greedy text."""
    import deltatune as dt

    model, tok = smollm2  # shared: the adapter is written with add/save/remove and served from a pool,
    torch.manual_seed(5)  # which never changes the model; A, B ~ N(0, 1) on q/v change the answer, not to noise
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=4, targets=["q_proj", "v_proj"], init="random"), name="t")
    try:
        dt.save_adapter(model, tmp_path / "tuned", "t")
    finally:
        dt.remove_adapter(model, "t")
    engine = Engine(model, tok, pool=True, max_resident_adapters=2, num_blocks=32, max_model_len=2048)
    engine.add_adapter("tuned", str(tmp_path / "tuned"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = "The three primary colors are"
    want_chat = engine.generate([engine.chat_prompt(messages)], "tuned", max_new_tokens=8)[0].text
    want_text = engine.generate(prompt, "tuned", max_new_tokens=8)[0].text
    base_text = engine.generate(prompt, None, max_new_tokens=8)[0].text
    assert want_chat.strip() and want_text != base_text  # the adapter is in use and changes the answer
    server = Server(create_app(engine, "smollm2", api_key=KEY))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        chat = client.chat.completions.create(model="tuned", messages=messages, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == want_chat
        stream = client.completions.create(model="tuned", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == want_text
    finally:
        server.close()
