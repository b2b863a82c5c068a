"""The serving engine against transformers and PEFT: runner logits, greedy tokens under continuous
batching and chunked prefill, mixed-adapter batches, sampling, stops, the KV cache's accounting."""

import copy

import pytest
import torch

import _models
from deltatune.serve.engine import Engine
from deltatune.serve.kv_cache import PagedKVCache
from deltatune.serve.model_runner import Chunk, ModelRunner, UnsupportedModelError
from deltatune.serve.sampling import SamplingParams, filter_top, penalize
from deltatune.serve.scheduler import RequestRefused

transformers = pytest.importorskip("transformers")

MODELS = {"llama": _models.llama, "qwen2": _models.qwen2}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.generation_config.eos_token_id = None  # random weights: run to max_new_tokens like the engine below
    return model


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, _models.VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt, n, **kw):
    """transformers' greedy continuation of one prompt (no padding, no batch: the reference)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def run_staggered(eng, prompts, adapters, n, join_after=2):
    """Half the requests first, the rest after ``join_after`` steps (requests join a running batch)."""
    half = len(prompts) // 2
    ids = [eng.add_request(p, a, max_new_tokens=n) for p, a in zip(prompts[:half], adapters[:half])]
    for _ in range(join_after):
        eng.step()
    assert eng.scheduler.running, "the first requests should still be running when the others join"
    ids += [eng.add_request(p, a, max_new_tokens=n) for p, a in zip(prompts[half:], adapters[half:])]
    while eng.has_unfinished():
        eng.step()
    return [eng.pop_output(i) for i in ids]


@pytest.mark.parametrize("name", list(MODELS))
def test_runner_logits_equal_the_model_in_chunks(name):
    model = _model(name)
    runner = ModelRunner(model, __import__("deltatune").routed)
    cache = runner.new_cache(num_blocks=8, block_size=4)  # blocks smaller than the chunks: tables matter
    ids = _prompts([11, 9])
    with torch.no_grad():
        ref = [model(torch.tensor([p])).logits[0] for p in ids]
    for s, p in enumerate(ids):
        cache.reserve(s, len(p))
    got_a = runner.forward([Chunk(0, ids[0][:6], 0), Chunk(1, ids[1][:1], 0)], cache)
    got_b = runner.forward([Chunk(0, ids[0][6:], 6), Chunk(1, ids[1][1:], 1)], cache)
    for got, want in ((got_a[0], ref[0][5]), (got_a[1], ref[1][0]), (got_b[0], ref[0][-1]), (got_b[1], ref[1][-1])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_hf_generate_with_continuous_batching_and_chunked_prefill(name):
    model = _model(name)
    prompts = _prompts([5, 23, 2, 14])
    want = [hf_greedy(model, p, 10) for p in prompts]
    eng = Engine(model, None, num_blocks=32, max_num_batched_tokens=7)  # prompts longer than a step's budget
    outs = run_staggered(eng, prompts, [None] * 4, 10)
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert eng.cache.num_free_blocks == eng.cache.num_blocks and not eng.cache.tables  # every block back


def test_a_full_cache_makes_requests_wait_or_preempts_them_and_results_stay_exact():
    model = _model("llama")
    prompts = _prompts([12, 9, 15, 6])
    want = [hf_greedy(model, p, 12) for p in prompts]
    eng = Engine(model, None, num_blocks=8, block_size=4, max_num_batched_tokens=16)  # 32 tokens: one or two fit
    outs = eng.generate(prompts, max_new_tokens=12)
    assert [o.token_ids for o in outs] == want
    assert eng.scheduler.num_preemptions > 0 and eng.cache.num_free_blocks == 8


def test_request_that_can_never_fit_is_refused_with_the_reason():
    eng = Engine(_model("llama"), None, num_blocks=2, block_size=16)
    with pytest.raises(RequestRefused, match=r"needs up to 40 tokens .* 3 KV blocks of 16; the cache holds 2 blocks"):
        eng.add_request(_prompts([20])[0], max_new_tokens=20)
    with pytest.raises(RequestRefused, match="prompt has 2048 tokens"):
        Engine(_model("llama"), None, num_blocks=200).add_request([5] * 2048)
    assert not eng.has_unfinished() and eng.cache.num_free_blocks == 2
    assert eng.generate([_prompts([20])[0]], max_new_tokens=12)[0].token_ids  # what fits still runs


def _peft_adapters(model, tmp_path):
    """Two PEFT LoRA adapters of different ranks and targets, saved; returns {name: dir}."""
    peft = pytest.importorskip("peft")
    settings = {"sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                "chat": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"])}
    dirs = {}
    for i, (name, kw) in enumerate(settings.items()):
        torch.manual_seed(10 + i)
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **kw))
        with torch.no_grad():
            for n, p in wrapped.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)  # big enough to change greedy tokens
        wrapped.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def _pool_or_none(kind, model):
    if kind == "routing":
        return None
    pool_module = pytest.importorskip("deltatune.serve.pool")
    return pool_module.AdapterPool(model, max_resident=4)


@pytest.mark.parametrize("routing", ["routing", "pool"])
@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_adapter_batch_equals_peft_single_adapter_models(name, routing, tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(name)
    dirs = _peft_adapters(model, tmp_path)
    prompts = _prompts([7, 13, 4, 10, 5, 9])
    rows = ["sql", "chat", None, "chat", "sql", None]
    references = {None: model}
    for adapter, path in dirs.items():
        references[adapter] = peft.PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
    want = [hf_greedy(references[a], p, 8) for p, a in zip(prompts, rows)]
    served = copy.deepcopy(model)
    eng = Engine(served, None, num_blocks=32, max_num_batched_tokens=16, pool=_pool_or_none(routing, served))
    for adapter, path in dirs.items():
        eng.add_adapter(adapter, str(path))
    outs = run_staggered(eng, prompts, rows, 8)
    assert [o.token_ids for o in outs] == want
    assert len({tuple(w) for w in want}) == len(want)  # the adapters do change the tokens
    # logits of one mixed step equal each adapter's model, row by row
    cache = eng.runner.new_cache(num_blocks=8)
    for s, p in enumerate(prompts[:3]):
        cache.reserve(s, len(p))
    logits = eng.runner.forward([Chunk(s, p, 0, a) for s, (p, a) in enumerate(zip(prompts[:3], rows[:3]))], cache)
    for s, (p, a) in enumerate(zip(prompts[:3], rows[:3])):
        with torch.no_grad():
            ref = references[a](input_ids=torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[s], ref, atol=1e-4, rtol=0)
    eng.remove_adapter("sql")
    with pytest.raises(KeyError, match="no adapter named 'sql'"):
        eng.add_request(prompts[0], "sql")


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    model = _model("llama")
    prompts = _prompts([6, 9])
    eng = Engine(model, None, num_blocks=32)
    greedy = [o.token_ids for o in eng.generate(prompts, max_new_tokens=10)]
    topk1 = [o.token_ids for o in eng.generate(prompts, max_new_tokens=10, temperature=1.5, top_k=1)]
    assert topk1 == greedy
    a = eng.generate(prompts, max_new_tokens=16, temperature=1.0, seed=7)
    b = eng.generate(prompts[::-1] + prompts, max_new_tokens=16, temperature=1.0, seed=7)  # other batch
    c = eng.generate(prompts, max_new_tokens=16, temperature=1.0, seed=8)
    assert [o.token_ids for o in a] == [o.token_ids for o in b[2:]] == [o.token_ids for o in b[1::-1]]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_repetition_penalty_equals_hf_generate():
    model = _model("llama")
    prompt = _prompts([8])[0]
    want = hf_greedy(model, prompt, 12, repetition_penalty=1.8)
    eng = Engine(model, None, num_blocks=16)
    assert eng.generate([prompt], max_new_tokens=12, repetition_penalty=1.8)[0].token_ids == want
    assert want != hf_greedy(model, prompt, 12)


def test_top_k_top_p_and_penalties_against_references():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in ((5, 1.0), (0, 0.7), (10, 0.5), (0, 0.05)):
        ref = logits[None].clone()
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(filter_top(logits, k, p)), torch.isinf(ref[0])), (k, p)
    output = [3, 3, 7, 3, 9]
    got = penalize(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [1, 2], output)
    want = logits.clone()
    for t in set(output):
        want[t] -= 0.5 * output.count(t) + 0.25
    torch.testing.assert_close(got, want)


def _char_engine(**kw):
    from test_train import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                                   bos_token_id=None, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    return Engine(transformers.LlamaForCausalLM(cfg), tok, num_blocks=32, **kw), tok


def test_stop_strings_stop_tokens_and_streaming():
    eng, tok = _char_engine()
    full = eng.generate(["hello"], max_new_tokens=24, ignore_eos=True)[0]
    assert len(full.text) >= 10 and full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[4:6]
    cut = eng.generate(["hello"], max_new_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    token = full.token_ids[3]
    by_id = eng.generate(["hello"], max_new_tokens=24, ignore_eos=True, stop_token_ids=[token])[0]
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(token) + 1] and by_id.finish_reason == "stop"
    pieces = list(eng.stream("hello", max_new_tokens=24, ignore_eos=True))
    assert "".join(pieces) == full.text and len(pieces) > 1
    assert "".join(eng.stream("hello", max_new_tokens=24, ignore_eos=True, stop=[stop])) == cut.text
    assert eng.cache.num_free_blocks == eng.cache.num_blocks
    stream = eng.stream("hello", max_new_tokens=24, ignore_eos=True)
    next(stream)
    stream.close()  # an abandoned stream frees its request's blocks
    assert eng.cache.num_free_blocks == eng.cache.num_blocks and not eng.has_unfinished()


def test_chat_uses_the_tokenizer_chat_template():
    eng, tok = _char_engine()
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        eng.chat(messages)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    prompt = tok("<user>hi\n<assistant>")["input_ids"]
    assert eng.chat_prompt(messages) == prompt
    answer = eng.chat(messages, max_new_tokens=6, ignore_eos=True)
    assert answer.token_ids == eng.generate([prompt], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert "".join(eng.chat(messages, stream=True, max_new_tokens=6, ignore_eos=True)) == answer.text


def test_bad_requests_and_models_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="Llama-family .* GPT2LMHeadModel has model_type 'gpt2'"):
        Engine(_models.gpt2(), None, num_blocks=4)
    eng = Engine(_model("llama"), None, num_blocks=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 2, 500])
    with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
        eng.add_request("hello")
    with pytest.raises(TypeError, match="unknown sampling settings \\['temprature'\\]"):
        eng.add_request([1, 2], temprature=0.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        eng.add_request([1, 2], adapter="x")


def test_paged_cache_hands_out_and_takes_back_blocks():
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=5, block_size=4)
    assert cache.reserve(0, 9) == [0, 1, 2] and cache.reserve(1, 4) == [3]
    with pytest.raises(Exception, match="needs 2 more blocks, 1 are free"):
        cache.reserve(1, 12)
    assert cache.tables[1] == [3]  # a failed reserve takes nothing
    assert cache.free(0) == 3 and cache.num_free_blocks == 4
    assert cache.slots(1, 2, 2) == [14, 15]


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate(smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):"]
    want = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        want.append(hf_greedy(model, ids, 16, eos_token_id=None))
    eng = Engine(model, tok, num_blocks=64, max_num_batched_tokens=8)
    outs = eng.generate(prompts, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in outs] == want


def test_mistral_sliding_window_logits_equal_the_model():
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=_models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5)).eval()  # a window shorter than the prompt
    prompt = _prompts([13])[0]
    runner = ModelRunner(model, __import__("deltatune").routed)
    cache = runner.new_cache(num_blocks=4, block_size=4)
    cache.reserve(0, 13)
    first = runner.forward([Chunk(0, prompt[:9], 0)], cache)
    last = runner.forward([Chunk(0, prompt[9:], 9)], cache)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(first[0], ref[8], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[0], ref[12], atol=1e-4, rtol=0)


def test_requests_for_more_adapters_than_pool_slots_wait_for_a_slot(tmp_path):
    """Four requests over two adapters and a one-slot pool: each step names one adapter at most (a batch
    naming more than the pool holds would raise PoolError), and the results stay exact."""
    peft = pytest.importorskip("peft")
    pool_module = pytest.importorskip("deltatune.serve.pool")
    model = _model("llama")
    dirs = _peft_adapters(model, tmp_path)
    prompts, rows = _prompts([6, 9, 5, 8]), ["sql", "chat", "chat", "sql"]
    references = {a: peft.PeftModel.from_pretrained(copy.deepcopy(model), p).eval() for a, p in dirs.items()}
    want = [hf_greedy(references[a], p, 6) for p, a in zip(prompts, rows)]
    served = copy.deepcopy(model)
    eng = Engine(served, None, num_blocks=32, pool=pool_module.AdapterPool(served, max_resident=1))
    for adapter, path in dirs.items():
        eng.add_adapter(adapter, str(path))
    assert [o.token_ids for o in eng.generate(prompts, max_new_tokens=6, adapters=rows)] == want
