"""Prompt tuning and P-tuning against PEFT: PEFT-made adapters load into deltatune with the same logits
and loss, and ours into PEFT; the three inits (random, vocab, text) equal PEFT's; greedy decoding with
the KV cache equals decoding by PEFT's forward; P-tuning files keep the encoder so training resumes."""

import copy

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402
from _prompts import MODELS, TOL, batch, greedy_by_forward, logits_and_loss, word_tokenizer  # noqa: E402

CONFIGS = {  # (PEFT's config, ours): the same method and sizes
    "prompt": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
               lambda: dt.PromptTuningConfig(num_virtual_tokens=5)),
    "ptuning_mlp": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16),
                    lambda: dt.PTuningConfig(num_virtual_tokens=5, encoder_hidden_size=16)),
    "ptuning_lstm": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16,
                                                      encoder_reparameterization_type="LSTM"),
                     lambda: dt.PTuningConfig(num_virtual_tokens=5, encoder="lstm", encoder_hidden_size=16)),
}


def _base(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _check_equal(ours, theirs, base, name):
    inputs = batch(name)
    (ours_logits, ours_loss), (their_logits, their_loss) = logits_and_loss(ours, inputs), logits_and_loss(theirs, inputs)
    assert ours_logits.shape == their_logits.shape == (2, 5 + 9, _models.VOCAB)
    assert (ours_logits - their_logits).abs().max() <= TOL and abs(ours_loss - their_loss) <= TOL
    base_logits, _ = logits_and_loss(base, inputs)
    assert (ours_logits[:, 5:] - base_logits).abs().max() > 100 * TOL  # the prompt does change the output


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_peft_parity_both_ways_and_greedy_generation(name, method, tmp_path):
    base = _base(name)
    # PEFT's adapter into ours: the same logits and loss; P-tuning's file holds the encoder's output only
    theirs = peft.get_peft_model(copy.deepcopy(base), CONFIGS[method][0]()).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    _check_equal(ours, theirs, base, name)
    if method != "prompt":  # ... so it loads as a fixed table
        assert ours.virtual_tokens.encoders["default"].table
    # greedy decoding with the KV cache equals decoding by PEFT's forward; disabled, the base model's
    ids = _models.inputs(name)["input_ids"][:, :5]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = greedy_by_forward(theirs, ids, 6)
    assert ours.generate(**kw).tolist() == expected
    assert theirs.generate(**kw, use_cache=False).tolist() == expected  # PEFT's generate, where it holds (no cache)
    with dt.disabled(ours):
        assert ours.generate(**kw).tolist() == greedy_by_forward(base, ids, 6)

    # ours into PEFT: the same outputs; and back into ours, the encoder itself (training resumes from it)
    ours = dt.add_adapter(copy.deepcopy(base), CONFIGS[method][1]()).eval()
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _check_equal(ours, theirs, base, name)
    again = dt.load_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    _check_equal(again, theirs, base, name)
    if method != "prompt":
        assert not again.virtual_tokens.encoders["default"].table


def _prompt_table(model):
    return model.virtual_tokens.encoders["default"].embedding.weight.detach()


@pytest.mark.parametrize("init", ["random", "vocab"])
def test_random_and_vocab_inits_draw_what_peft_draws(init):
    base = _base("llama")
    peft_init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}[init]
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init=peft_init))
    torch.manual_seed(5)
    ours = dt.add_adapter(copy.deepcopy(base), dt.PromptTuningConfig(num_virtual_tokens=7, init=init))
    expected = theirs.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(_prompt_table(ours), expected)
    if init == "vocab":  # each row is the embedding of a vocabulary token
        table = base.get_input_embeddings().weight
        assert all(any(torch.equal(row, t) for t in table) for row in expected)


@pytest.mark.parametrize("text", ["w3 w5 w7", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"])  # repeated / cut to n
def test_text_init_equals_peft(text, tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tok")
    base = _base("qwen2")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer))
    ours = dt.add_adapter(copy.deepcopy(base), dt.PromptTuningConfig(num_virtual_tokens=7, init="text",
                                                                     init_text=text, tokenizer=tokenizer))
    assert torch.equal(_prompt_table(ours), theirs.prompt_encoder["default"].embedding.weight.detach())
    first = base.get_input_embeddings().weight[int(text.split()[0][1:])]
    assert torch.equal(_prompt_table(ours)[0], first)
    dt.save_adapter(ours, tmp_path / "ad")  # the file records the text init as PEFT does
    cfg = peft.PeftConfig.from_pretrained(tmp_path / "ad")
    assert (cfg.prompt_tuning_init, cfg.prompt_tuning_init_text, cfg.tokenizer_name_or_path) == ("TEXT", text, tokenizer)


def test_text_init_needs_text_and_a_tokenizer():
    with pytest.raises(ValueError, match="init='text' needs init_text"):
        dt.PromptTuningConfig(init="text")
    with pytest.raises(ValueError, match="init must be one of"):
        dt.PromptTuningConfig(init="words")
    base = _base("llama")  # a model built from a config records no name_or_path
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dt.add_adapter(base, dt.PromptTuningConfig(init="text", init_text="hello"))
    assert not dt.list_adapters(base) and not hasattr(base, "virtual_tokens")


@pytest.mark.slow
def test_smollm2_prompt_and_ptuning_match_peft_and_generate(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    for method in ("prompt", "ptuning_lstm"):
        theirs = peft.get_peft_model(copy.deepcopy(model), CONFIGS[method][0]()).eval()
        with torch.no_grad():  # a prompt of the model's own scale (PEFT's N(0, 1) init swamps a real model)
            for p in theirs.prompt_encoder.parameters():
                p.mul_(0.05)
        theirs.save_pretrained(tmp_path / method)
        ours = dt.load_adapter(copy.deepcopy(model), tmp_path / method).eval()
        with torch.no_grad():
            a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert got.tolist() == greedy_by_forward(theirs, ids, 5)
