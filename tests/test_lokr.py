"""LoKr against PEFT: adapters made by PEFT load into deltatune with the same outputs and the other way
round (Llama, BERT; decomposed and full factors); PEFT's factorization rule; a float64 reference."""

import copy

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.methods.lokr import factorization

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5
CASES = {  # name: (model, targets, modules_to_save, r, decompose_both, decompose_factor)
    "llama-decomposed": (_models.llama, ["q_proj", "v_proj", "down_proj"], None, 2, True, -1),
    "llama-full": (_models.llama, ["q_proj", "up_proj"], None, 8, False, 4),
    "bert": (_models.bert, ["query", "value"], ["classifier"], 2, False, -1),
}


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_factorization_follows_lycoris():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 7, 12, 32, 64, 96, 127, 128, 256, 768, 1000):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("case", CASES)
def test_peft_made_lokr_loads_with_equal_outputs(case, tmp_path):
    make, targets, saved, r, both, factor = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    x = _models.inputs(case)
    cfg = peft.LoKrConfig(r=r, alpha=2 * r, target_modules=targets, modules_to_save=saved, decompose_both=both,
                          decompose_factor=factor)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise([p for n, p in theirs.named_parameters() if "lokr_" in n])
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    expected = _models.output(theirs, x)
    assert (_models.output(ours, x) - expected).abs().max() <= TOL
    assert (_models.output(base, x) - expected).abs().max() > 10 * TOL
    dt.merge(ours)
    assert (_models.output(ours, x) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_lokr_loads_into_peft_with_equal_outputs(case, tmp_path):
    make, targets, saved, r, both, factor = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    x = _models.inputs(case)
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoKrConfig(r=r, alpha=2 * r, targets=targets, modules_to_save=saved,
                                                            decompose_both=both, decompose_factor=factor))
    _randomise(dt.adapter_params(ours))
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (_models.output(theirs, x) - _models.output(ours, x)).abs().max() <= TOL


def test_float64_reference_and_identity_at_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = model(x).detach()
    dt.add_adapter(model, dt.LoKrConfig(r=1, alpha=2, targets=["0"], dtype=None))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0)  # W1 = 0 at init
    _randomise(dt.adapter_params(model))
    d = model[0].deltas["default"]
    assert set(d.roles()) == {"w1", "w2_a", "w2_b"}  # 6 = 2 x 3, 8 = 2 x 4; rank 1 < 4 / 2 decomposes W2
    dW = 2.0 * torch.kron(d.w1, d.w2_a @ d.w2_b)  # (2, 2) kron (3, 4) = (6, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (model[0].weight + dW).T + model[0].bias, atol=1e-12, rtol=1e-12)
