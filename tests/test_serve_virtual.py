"""The serving engine with prompt-method adapters (prompt tuning, P-tuning, prefix tuning): virtual tokens as ids
past the vocabulary; greedy tokens equal the model's own generate with the adapter active, and PEFT's."""

import pytest
import torch

import deltatune as dt
from deltatune.adapters import virtual_tokens
from deltatune.serve import Engine

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 7], [3, 99, 120, 4, 60, 61, 62]]
CONFIGS = {"prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=4),
           "ptuning": lambda: dt.PTuningConfig(num_virtual_tokens=3),
           "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=5)}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=257, max_position_embeddings=128,
                                   initializer_range=0.5)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model and a directory per adapter (random virtual tokens, a LoRA), with each one's greedy reference."""
    model, root = tiny_llama(), tmp_path_factory.mktemp("adapters")
    configs = {**CONFIGS, "lora": lambda: dt.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random")}
    refs = {None: [greedy(model, p) for p in PROMPTS]}
    for name, make in configs.items():
        dt.add_adapter(model, make(), name=name)
        with torch.no_grad():
            for p in dt.adapter_params(model, name):
                p.normal_(0, 1.0 if name != "lora" else 0.3)
        dt.set_active(model, name)
        refs[name] = [greedy(model, p) for p in PROMPTS]
        dt.save_adapter(model, root / name, name)
        dt.remove_adapter(model, name)
    assert virtual_tokens(model) is None or not virtual_tokens(model).encoders
    return model, root, refs


def greedy(model, prompt, n=8):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


@pytest.mark.parametrize("pool, graphs", [(None, False), (True, False), (True, True)])
def test_virtual_token_adapters_match_the_model_with_the_adapter(saved, pool, graphs):
    """One generate call mixing prompt tuning, P-tuning, prefix tuning, a LoRA (pooled or on the model) and the
    base model: every row's greedy tokens equal the model's own generate with that adapter active; chunked
    prefill (4 tokens a step) cuts through the virtual tokens; with the pool, also through the decode graphs'
    static path (on by default on a GPU; here run without capture)."""
    model, root, refs = saved
    eng = Engine(model, None, pool=pool, max_num_batched_tokens=4, max_resident_adapters=4, cuda_graphs=graphs)
    for name in (*CONFIGS, "lora"):
        eng.add_adapter(name, str(root / name))
    names = [*CONFIGS, "lora", None]
    jobs = [(p, n) for n in names for p in range(len(PROMPTS))]
    outs = eng.generate([PROMPTS[p] for p, _ in jobs], adapters=[n for _, n in jobs], max_new_tokens=8,
                        temperature=0.0)
    for (p, name), out in zip(jobs, outs):
        assert out.token_ids == refs[name][p], (name, p)
        assert out.prompt_token_ids == PROMPTS[p] and out.adapter == name
    if graphs:
        assert eng.graphs.graphs  # decode steps (of virtual-token rows among them) ran the static path
    assert virtual_tokens(model) is None or not virtual_tokens(model).encoders  # the model is left as it was
    for name in (*CONFIGS, "lora"):
        eng.remove_adapter(name)  # the LoRA was loaded onto the shared model without a pool


def test_virtual_adapters_differ_from_the_base_and_are_removed_cleanly(saved):
    """The references differ from the base model's (the test can fail); a removed adapter is refused while
    a request uses it and unknown after; penalties ignore the virtual ids."""
    model, root, refs = saved
    assert all(refs[name] != refs[None] for name in CONFIGS)
    eng = Engine(model, None)
    eng.add_adapter("p", str(root / "prefix"))
    with pytest.raises(ValueError, match="already added"):
        eng.add_adapter("p", str(root / "prompt"))
    rid = eng.add_request(PROMPTS[0], "p", max_new_tokens=4, repetition_penalty=1.3, presence_penalty=0.5)
    with pytest.raises(ValueError, match="in use"):
        eng.remove_adapter("p")
    while eng.has_unfinished():
        eng.step()
    assert len(eng.output(rid).token_ids) == 4
    eng.remove_adapter("p")
    with pytest.raises(KeyError):
        eng.add_request(PROMPTS[0], "p")
    eng.add_adapter("p", str(root / "prompt"))  # the name again, new ids
    assert eng.generate([PROMPTS[1]], adapters=["p"], max_new_tokens=8, temperature=0.0)[0].token_ids == refs["prompt"][1]


def test_a_peft_prompt_tuning_adapter_serves_as_peft_computes(tmp_path):
    """A prompt-tuning adapter made and saved by PEFT: each greedy token the engine picks is the argmax of PEFT's
    own forward over the prompt and the tokens before it (PEFT's training computation: virtual tokens at
    positions 0..n-1, the input from n). PEFT's ``generate`` is not the oracle: here (peft 0.21, transformers 5.24) it
    agrees on the first token and then departs from its own forward's argmax; its cause is not studied."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    with torch.no_grad():
        for p in wrapped.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    wrapped.save_pretrained(str(tmp_path / "pt"))
    eng = Engine(tiny_llama(), None)
    eng.add_adapter("pt", str(tmp_path / "pt"))
    base = eng.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    for prompt, plain in zip(PROMPTS, base):
        got = eng.generate([prompt], adapters=["pt"], max_new_tokens=8, temperature=0.0)[0].token_ids
        ids = torch.tensor([prompt + got[:-1]])
        with torch.no_grad():
            logits = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(got):]
        assert logits.argmax(-1).tolist() == got
        assert got != plain.token_ids


def test_a_block_expansion_adapter_is_refused_with_a_reason(tmp_path):
    """Block expansion adds decoder layers: the engine refuses it by name (it raised an IndexError mid-step)."""
    model = tiny_llama()
    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=1), name="b")
    dt.save_adapter(model, tmp_path / "b", "b")
    eng = Engine(tiny_llama(), None)
    with pytest.raises(ValueError, match="adds decoder layers.*merge"):
        eng.add_adapter("b", str(tmp_path / "b"))
    assert eng.adapters() == []
