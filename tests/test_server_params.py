"""The HTTP server's vLLM-style sampling fields: beam search, top_k, repetition_penalty, stop_token_ids,
ignore_eos, include_stop_str_in_output, through the real ``openai`` client (``extra_body=``) and raw JSON.

Oracle: ``Engine.generate`` with the same settings, run on the server's own engine thread
(``worker.call``). Every combination the engine cannot honour is a 400 in OpenAI's error schema whose
``param`` names the field.
"""

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from test_server import BASE, KEY, PROMPTS, Server, make_adapters, post, tiny_engine  # noqa: E402

from deltatune.serve.server import create_app  # noqa: E402

NEW = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = tiny_engine()
    engine.add_adapter("alpha", str(make_adapters(engine.model, tmp_path_factory.mktemp("a"), ["alpha"])["alpha"]))
    # an EOS that the greedy answer to PROMPTS[1] reaches at its third token (the tiny model has none)
    eos = engine.generate(PROMPTS[1], max_new_tokens=NEW)[0].token_ids[2]
    engine.eos_ids = {eos}
    app = create_app(engine, BASE, api_key=KEY)
    server = Server(app)
    server.state = app.state.deltatune
    server.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield server
    server.close()


def engine_generate(served, prompt, adapter=None, chat=False, **sampling):
    """``Engine.generate`` of one prompt (text, or a user message through the chat template) on the
    server's engine thread."""
    def run(engine):
        ids = engine.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        return engine.generate([ids] if chat else ids, adapter, max_new_tokens=NEW, **sampling)[0]
    return served.state.worker.call(run).result(60)


def test_beam_search_answers_the_n_best_hypotheses_of_the_engine(served):
    c, tok = served.client, served.state.tokenizer
    wide = engine_generate(served, PROMPTS[0], use_beam_search=True, beam_width=4)
    stop = wide.beams[1][0][4]  # a token the search considers: hypotheses through it end there ("stop")
    want = engine_generate(served, PROMPTS[0], use_beam_search=True, beam_width=4, stop_token_ids=[stop])
    body = {"use_beam_search": True, "best_of": 4, "stop_token_ids": [stop]}
    out = c.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=NEW, n=3, extra_body=body)
    assert [ch.text for ch in out.choices] == [tok.decode(t) for t, _ in want.beams[:3]]
    assert out.choices[0].text == want.text and len({ch.text for ch in out.choices}) == 3
    assert [ch.finish_reason for ch in out.choices] == ["stop" if t[-1] == stop else "length"
                                                        for t, _ in want.beams[:3]]
    assert {ch.finish_reason for ch in out.choices} == {"stop", "length"}
    assert out.usage.completion_tokens == sum(len(t) for t, _ in want.beams[:3])
    short = engine_generate(served, PROMPTS[0], use_beam_search=True, beam_width=4, stop_token_ids=[stop],
                            length_penalty=0.5)  # favours short hypotheses: other answers
    out = c.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=NEW, n=4,
                               extra_body={**body, "length_penalty": 0.5})
    assert [ch.text for ch in out.choices] == [tok.decode(t) for t, _ in short.beams] != \
        [tok.decode(t) for t, _ in want.beams]
    # two prompts: n choices each, prompt-major; the beam width defaults to n
    out = c.completions.create(model=BASE, prompt=PROMPTS[1:], max_tokens=NEW, n=2,
                               extra_body={"use_beam_search": True})
    wants = [engine_generate(served, p, use_beam_search=True, beam_width=2) for p in PROMPTS[1:]]
    assert [ch.text for ch in out.choices] == [tok.decode(t) for w in wants for t, _ in w.beams]
    assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
    # chat, with an adapter and the repetition penalty that beam search takes
    want = engine_generate(served, PROMPTS[2], "alpha", chat=True, use_beam_search=True, beam_width=3,
                           repetition_penalty=1.3)
    chat = c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPTS[2]}],
                                     max_tokens=NEW, n=3, temperature=0,
                                     extra_body={"use_beam_search": True, "repetition_penalty": 1.3})
    assert [ch.message.content for ch in chat.choices] == [tok.decode(t) for t, _ in want.beams]
    assert want.beams != engine_generate(served, PROMPTS[2], chat=True, use_beam_search=True, beam_width=3,
                                         repetition_penalty=1.3).beams  # the adapter was in use


def test_vllm_sampling_fields_reach_the_engine(served):
    c, prompt = served.client, PROMPTS[0]
    greedy = engine_generate(served, prompt).text
    sampled = c.completions.create(model=BASE, prompt=prompt, max_tokens=NEW, temperature=1.0, seed=3)
    top1 = c.completions.create(model=BASE, prompt=prompt, max_tokens=NEW, temperature=1.0, seed=3,
                                extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy != sampled.choices[0].text  # top_k=1 at temperature 1 is greedy
    everything = c.completions.create(model=BASE, prompt=prompt, max_tokens=NEW, temperature=1.0, seed=3,
                                      extra_body={"top_k": -1})  # vLLM's "all tokens"
    assert everything.choices[0].text == sampled.choices[0].text
    want = engine_generate(served, prompt, repetition_penalty=1.5).text
    got = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": prompt}], max_tokens=NEW,
                                    temperature=0, extra_body={"repetition_penalty": 1.5})
    assert got.choices[0].message.content == engine_generate(served, prompt, chat=True, repetition_penalty=1.5).text
    out = c.completions.create(model=BASE, prompt=prompt, max_tokens=NEW, temperature=0,
                               extra_body={"repetition_penalty": 1.5})
    assert out.choices[0].text == want != greedy
    # stop_token_ids end the answer at that token (kept), as an EOS does; ignore_eos runs past the EOS
    ids = engine_generate(served, prompt).token_ids
    out = c.completions.create(model=BASE, prompt=prompt, max_tokens=NEW, temperature=0,
                               extra_body={"stop_token_ids": [ids[3]]})
    cut = ids[: ids.index(ids[3]) + 1]
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == len(cut) < NEW
    assert out.choices[0].text == served.state.tokenizer.decode(cut)
    stopped = c.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 3
    longer = c.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=NEW, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == NEW
    assert longer.choices[0].text == engine_generate(served, PROMPTS[1], ignore_eos=True).text


def test_include_stop_str_in_output_keeps_the_stop_string(served):
    c, prompt = served.client, PROMPTS[2]
    full = engine_generate(served, prompt).text
    stop = full[3:5]
    want = full[: full.find(stop) + len(stop)]
    kw = dict(model=BASE, prompt=prompt, max_tokens=NEW, temperature=0, stop=[stop, "@@@"])
    assert c.completions.create(**kw).choices[0].text == full[: full.find(stop)]
    out = c.completions.create(**kw, extra_body={"include_stop_str_in_output": True})
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    stream = c.completions.create(**kw, stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want
    chat_full = engine_generate(served, prompt, chat=True).text
    stop = chat_full[2:4]
    chat = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": prompt}], max_tokens=NEW,
                                     temperature=0, stop=stop, extra_body={"include_stop_str_in_output": True})
    assert chat.choices[0].message.content == chat_full[: chat_full.find(stop) + len(stop)]


BEAM = {"use_beam_search": True}
REFUSED = [  # (extra fields, the param named)
    ({**BEAM, "stream": True}, "stream"),
    ({**BEAM, "temperature": 0.7}, "temperature"),
    ({**BEAM, "n": 3, "best_of": 2}, "n"),
    ({**BEAM, "top_p": 0.9}, "top_p"),
    ({**BEAM, "top_k": 5}, "top_k"),
    ({**BEAM, "stop": ["x"]}, "stop"),
    ({**BEAM, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({**BEAM, "presence_penalty": -0.5}, "presence_penalty"),
    ({"n": 1, "best_of": 3}, "best_of"),
    ({"best_of": 17, **BEAM}, "best_of"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"early_stopping": True, **BEAM}, "early_stopping"),
    ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"stop_token_ids": [100000]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids.0"),
    ({"ignore_eos": "sometimes"}, "ignore_eos"),
    ({"use_beam_search": "maybe"}, "use_beam_search"),
]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("extra, param", REFUSED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(REFUSED)])
def test_combinations_that_cannot_be_honoured_are_400_naming_the_field(served, extra, param, chat):
    body = {"model": BASE, "max_tokens": 4, **extra}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    r = post(served, "/v1/chat/completions" if chat else "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param.split(".")[0] in error["message"]
    assert served.state.worker.num_requests() == 0 and served.state.in_flight == 0  # nothing was submitted


def test_refusals_through_the_openai_client_and_non_finite_numbers(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                              temperature=1.0, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "temperature" and "use_beam_search" in e.value.body["message"]
    r = post(served, "/v1/completions", '{"model": "tiny", "prompt": "x", "use_beam_search": true, '
                                        '"length_penalty": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "length_penalty", r.text
    ok = post(served, "/v1/completions", json.dumps({"model": BASE, "prompt": "x", "max_tokens": 2, "best_of": 1,
                                                     "top_k": 0, "min_p": 0, "early_stopping": False}))
    assert ok.status_code == 200, ok.text  # vLLM's fields at their no-op values are accepted
