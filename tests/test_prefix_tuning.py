"""Prefix tuning against PEFT: per-layer key/value prefixes through transformers' cache, on Llama and
Qwen2 (grouped-query attention: prefixes for the key/value heads) and GPT-2, with and without the
projection; PEFT-made adapters load into deltatune with the same logits and loss, ours into PEFT;
greedy decoding with the cache equals decoding by PEFT's forward."""

import copy

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402
from _prompts import MODELS, TOL, batch, greedy_by_forward, logits_and_loss  # noqa: E402

CONFIGS = {
    "table": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
              lambda: dt.PrefixTuningConfig(num_virtual_tokens=6)),
    "projection": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=True,
                                                   encoder_hidden_size=12),
                   lambda: dt.PrefixTuningConfig(num_virtual_tokens=6, projection=True, encoder_hidden_size=12)),
}


def _base(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _check_equal(ours, theirs, base, name, **extra):
    inputs = {**batch(name), **extra}
    (ours_logits, ours_loss), (their_logits, their_loss) = logits_and_loss(ours, inputs), logits_and_loss(theirs, inputs)
    assert ours_logits.shape == their_logits.shape == (2, 9, _models.VOCAB)  # a prefix adds no output positions
    assert (ours_logits - their_logits).abs().max() <= TOL and abs(ours_loss - their_loss) <= TOL
    base_logits, _ = logits_and_loss(base, batch(name))
    assert (ours_logits - base_logits).abs().max() > 100 * TOL


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_peft_parity_both_ways_and_greedy_generation(name, method, tmp_path):
    base = _base(name)
    theirs = peft.get_peft_model(copy.deepcopy(base), CONFIGS[method][0]()).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    _check_equal(ours, theirs, base, name)
    positions = torch.arange(9).repeat(2, 1) + 3  # given position ids shift by the prefix, as in PEFT
    _check_equal(ours, theirs, base, name, position_ids=positions)
    layers, heads, head_dim = ours.virtual_tokens.encoders["default"].kv_layout
    config = base.config
    assert heads == getattr(config, "num_key_value_heads", getattr(config, "n_head", None))  # GQA: kv heads
    ids = _models.inputs(name)["input_ids"][:, :5]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours.generate(**kw).tolist() == greedy_by_forward(theirs, ids, 6)
    with dt.disabled(ours):
        assert ours.generate(**kw).tolist() == greedy_by_forward(base, ids, 6)

    ours = dt.add_adapter(copy.deepcopy(base), CONFIGS[method][1]()).eval()
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    _check_equal(ours, theirs, base, name)
    again = dt.load_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    _check_equal(again, theirs, base, name)
    assert again.virtual_tokens.encoders["default"].table == (method == "table")  # the projection came back


def test_a_cache_from_an_earlier_call_continues_with_the_prefix():
    """Decoding by hand: a first call fills the cache (prefix + prompt), the next gets one token."""
    base = _base("qwen2")
    model = dt.add_adapter(copy.deepcopy(base), dt.PrefixTuningConfig(num_virtual_tokens=4)).eval()
    ids = _models.inputs("qwen2")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        assert first.past_key_values.get_seq_length() == 4 + 8
        step = model(input_ids=ids[:, -1:], attention_mask=torch.ones(2, 9, dtype=torch.long),
                     cache=first.past_key_values).logits[:, -1]
    assert (step - full).abs().max() <= TOL


def test_gradient_checkpointing_is_refused():
    base = _base("llama")
    base.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        dt.add_adapter(base, dt.PrefixTuningConfig(num_virtual_tokens=4))
    assert not dt.list_adapters(base)


@pytest.mark.slow
def test_smollm2_prefix_matches_peft_and_generates(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    theirs = peft.get_peft_model(copy.deepcopy(model), CONFIGS["table"][0]()).eval()
    with torch.no_grad():  # keys/values of the model's own scale
        theirs.prompt_encoder["default"].embedding.weight.mul_(0.1)
    theirs.save_pretrained(tmp_path)
    ours = dt.load_adapter(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert got.tolist() == greedy_by_forward(theirs, ids, 5)
