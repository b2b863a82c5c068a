"""Beam search in the serving engine against transformers' ``generate(num_beams=k, do_sample=False)``.

Oracle: transformers on a tiny random Llama, one prompt at a time, every returned hypothesis
(``num_return_sequences=k``) and its score; with an adapter, PEFT's model. The engine runs the beam
requests together, beside greedy ones, with chunked prefill, and under a cache so small that beams
are preempted, parked and recomputed. The EOS token is one the model often picks, so hypotheses end
at different lengths and the length penalty and the early-stop rule matter.
"""

import copy
from collections import Counter

import pytest
import torch

import _models
from deltatune.serve.engine import Engine
from deltatune.serve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, _models.VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts([5, 17, 3, 9])
NEW = 10


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with peaked logits (no near-ties between beams) whose EOS is a token its greedy
    continuations pick often."""
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=_models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, max_position_embeddings=256)).eval()
    m.generation_config.eos_token_id = None
    with torch.no_grad():
        greedy = [m.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):]
                  for p in PROMPTS]
    eos = Counter(torch.cat(greedy).tolist()).most_common(1)[0][0]
    m.config.eos_token_id = m.generation_config.eos_token_id = eos
    return m


def hf_beams(model, prompt, k, length_penalty=1.0, repetition_penalty=1.0):
    """transformers' k hypotheses (generated ids, cut after EOS) and their scores, best first."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, do_sample=False,
                             max_new_tokens=NEW, length_penalty=length_penalty, early_stopping=False,
                             repetition_penalty=repetition_penalty, eos_token_id=eos, pad_token_id=eos,
                             output_scores=True, return_dict_in_generate=True)
    beams = []
    for row in out.sequences[:, len(prompt):].tolist():
        beams.append(row[: row.index(eos) + 1] if eos in row else row)
    return beams, out.sequences_scores.tolist()


def _check(outs, wants):
    for out, (beams, scores) in zip(outs, wants):
        assert [b for b, _ in out.beams] == beams
        torch.testing.assert_close(torch.tensor([s for _, s in out.beams]), torch.tensor(scores), atol=1e-4, rtol=0)
        assert out.token_ids == beams[0]
        assert out.finish_reason == ("stop" if beams[0][-1] == _eos(out) else "length")


_EOS = {}


def _eos(out):
    return _EOS["id"]


@pytest.mark.parametrize("k, length_penalty", [(2, 1.0), (4, 1.0), (3, 0.3), (4, 2.0)])
def test_beams_equal_transformers_in_one_continuous_batch(model, k, length_penalty):
    _EOS["id"] = model.generation_config.eos_token_id
    wants = [hf_beams(model, p, k, length_penalty) for p in PROMPTS]
    if length_penalty <= 1.0:  # (2.0 favours long hypotheses enough that none ending at EOS is returned)
        assert any(b[-1] == _EOS["id"] for bs, _ in wants for b in bs)  # some hypotheses end at EOS
    assert any(len(b) == NEW for bs, _ in wants for b in bs)  # and some run to the length limit
    eng = Engine(model, None, num_blocks=64, block_size=4, max_num_batched_tokens=12)  # chunked prefill
    beam = SamplingParams(max_new_tokens=NEW, use_beam_search=True, beam_width=k, length_penalty=length_penalty)
    ids = [eng.add_request(p, params=beam) for p in PROMPTS[:2]]
    greedy = eng.add_request(PROMPTS[2], max_new_tokens=NEW, ignore_eos=True)  # a sampled request beside them
    eng.step()
    ids += [eng.add_request(p, params=beam) for p in PROMPTS[2:]]  # joining a running batch
    while eng.has_unfinished():
        eng.step()
    _check([eng.pop_output(i) for i in ids], wants)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPTS[2]):].tolist()
    assert eng.pop_output(greedy).token_ids == ref
    assert eng.cache.num_free_blocks == eng.cache.num_blocks and not eng.cache.tables  # every block back
    assert not eng._beam_of and not eng._groups


@pytest.mark.parametrize("graphs", [False, True])
def test_beams_exact_under_a_tiny_cache_with_preemption_and_repetition_penalty(model, graphs):
    """Also through the decode graphs' static path (on by default on a GPU; here run without capture)."""
    _EOS["id"] = model.generation_config.eos_token_id
    k = 4
    wants = [hf_beams(model, p, k, 1.0, 1.3) for p in PROMPTS]
    # 12 blocks of 4 tokens: not even one request's beams fit together, so beams are parked and recomputed
    # (13 with graphs: they keep one for their padding rows)
    eng = Engine(model, None, num_blocks=12 + graphs, block_size=4, max_num_batched_tokens=16, max_num_seqs=6,
                 cuda_graphs=graphs)
    outs = eng.generate(PROMPTS, params=SamplingParams(max_new_tokens=NEW, use_beam_search=True, beam_width=k,
                                                       repetition_penalty=1.3))
    _check(outs, wants)
    assert eng.scheduler.num_preemptions > 0
    assert eng.cache.num_free_blocks == 12 and set(eng.cache.tables) <= {-1}  # the graphs' scratch block stays
    if graphs:
        assert eng.graphs.graphs  # decode steps ran the static path


@pytest.mark.parametrize("routing", ["routing", "pool"])
def test_beams_with_an_adapter_equal_peft(model, routing, tmp_path):
    peft = pytest.importorskip("peft")
    _EOS["id"] = model.generation_config.eos_token_id
    torch.manual_seed(7)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    wrapped.save_pretrained(tmp_path / "a")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
    k = 3
    wants = [hf_beams(reference, p, k) for p in PROMPTS[:2]] + [hf_beams(model, PROMPTS[2], k)]
    assert wants[0] != hf_beams(model, PROMPTS[0], k)  # the adapter changes the beams
    served = copy.deepcopy(model)
    pool = None
    if routing == "pool":
        from deltatune.serve.pool import AdapterPool

        pool = AdapterPool(served, max_resident=2)
    eng = Engine(served, None, num_blocks=64, block_size=4, pool=pool)
    eng.add_adapter("a", str(tmp_path / "a"))
    outs = eng.generate(PROMPTS[:3], ["a", "a", None], max_new_tokens=NEW, use_beam_search=True, beam_width=k)
    _check(outs, wants)


def test_beam_settings_are_checked_and_abort_frees_the_beams(model):
    with pytest.raises(ValueError, match="temperature must be 0"):
        SamplingParams(use_beam_search=True, temperature=0.7)
    with pytest.raises(ValueError, match="not stop strings"):
        SamplingParams(use_beam_search=True, stop=["x"])
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        SamplingParams(use_beam_search=True, beam_width=0)
    eng = Engine(model, None, num_blocks=32, block_size=4)
    rid = eng.add_request(PROMPTS[1], max_new_tokens=NEW, use_beam_search=True, beam_width=4)
    for _ in range(4):
        eng.step()
    assert len(eng.scheduler.running) > 1  # several beams run
    eng.abort(rid)
    out = eng.pop_output(rid)
    assert out.finish_reason == "abort" and not eng.has_unfinished()
    assert eng.cache.num_free_blocks == 32 and not eng.cache.tables and not eng._beam_of
