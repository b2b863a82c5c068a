"""LoHa against PEFT: adapters made by PEFT load into deltatune with the same outputs and the other way
round (Llama, BERT, a conv net); merging equals the unmerged output; a float64 reference."""

import copy

import pytest
import torch
import torch.nn as nn

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5


MODELS = {
    "llama": lambda: (_models.llama(), ["q_proj", "v_proj", "down_proj"], None),
    "bert": lambda: (_models.bert(), ["query", "value"], ["classifier"]),
    "convnet": lambda: (_models.ConvNet(), ["conv1", "conv2", "fc"], None),
}
_inputs, _out = _models.inputs, _models.output


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", MODELS)
def test_peft_made_loha_loads_with_equal_outputs(name, tmp_path):
    torch.manual_seed(0)
    base, targets, saved = MODELS[name]()
    base.eval()
    x = _inputs(name)
    cfg = peft.LoHaConfig(r=3, alpha=6, target_modules=targets, modules_to_save=saved,
                          rank_pattern={targets[-1]: 2}, alpha_pattern={targets[0]: 3})
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise([p for n, p in theirs.named_parameters() if "hada_" in n])
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    expected = _out(theirs, x)
    assert (_out(ours, x) - expected).abs().max() <= TOL
    assert (_out(base, x) - expected).abs().max() > 10 * TOL  # the adapter does change the output
    dt.merge(ours)
    assert (_out(ours, x) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_our_loha_loads_into_peft_with_equal_outputs(name, tmp_path):
    torch.manual_seed(0)
    base, targets, saved = MODELS[name]()
    base.eval()
    x = _inputs(name)
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoHaConfig(r=3, alpha=6, targets=targets, modules_to_save=saved,
                                                            rank_pattern={targets[-1]: 2}))
    _randomise(dt.adapter_params(ours))
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (_out(theirs, x) - _out(ours, x)).abs().max() <= TOL


def test_float64_reference_and_identity_at_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y0 = model(x).detach()
    dt.add_adapter(model, dt.LoHaConfig(r=2, alpha=3, targets=["0"], dtype=None))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0)  # W2b = 0 at init
    _randomise(dt.adapter_params(model))
    d = model[0].deltas["default"]
    dW = 1.5 * (d.w1_a @ d.w1_b) * (d.w2_a @ d.w2_b)  # alpha / r = 1.5
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (model[0].weight + dW).T + model[0].bias, atol=1e-12, rtol=1e-12)


def test_loha_and_lokr_refuse_embeddings():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    for config in (dt.LoHaConfig, dt.LoKrConfig):
        with pytest.raises(ValueError, match="cannot wrap"):
            dt.add_adapter(model, config(targets=["0"]))
        assert isinstance(model[0], nn.Embedding)
