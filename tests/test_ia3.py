"""IA³ against PEFT: adapters made by PEFT load into deltatune with the same outputs and the other way
round, on Llama, Qwen2, GPT-2 (Conv1D) and BERT; merging equals the unmerged output; a float64
reference of the method's equations."""

import copy

import pytest
import torch
import torch.nn as nn

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5


def _llama():
    return _models.llama(), ["k_proj", "v_proj", "down_proj"], ["down_proj"]


def _qwen2():  # k/v carry a bias, which output scaling scales too
    return _models.qwen2(), ["k_proj", "v_proj", "down_proj"], ["down_proj"]


def _gpt2():  # Conv1D: weights stored transposed
    return _models.gpt2(), ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]


def _bert():  # a fresh classification head trains in full (PEFT's SEQ_CLS models expect it in the file)
    return _models.bert(), ["key", "value", "output.dense"], ["output.dense"]


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert}


def _out(model, ids):
    return _models.output(model, {"input_ids": ids})


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", MODELS)
def test_peft_made_ia3_loads_with_equal_outputs(name, tmp_path):
    torch.manual_seed(0)
    base, targets, ff = MODELS[name]()
    base.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    saved = ["classifier"] if name == "bert" else None
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=targets, feedforward_modules=ff,
                                                                     modules_to_save=saved))
    _randomise([p for n, p in theirs.named_parameters() if "ia3_l" in n])
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    expected = _out(theirs, ids)
    assert (_out(ours, ids) - expected).abs().max() <= TOL
    assert (_out(base, ids) - expected).abs().max() > 10 * TOL  # the vectors do change the output
    dt.merge(ours)  # folding the vectors into W (and the bias) computes the same
    assert (_out(ours, ids) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_our_ia3_loads_into_peft_with_equal_outputs(name, tmp_path):
    torch.manual_seed(0)
    base, targets, ff = MODELS[name]()
    base.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    saved = ["classifier"] if name == "bert" else None
    ours = dt.add_adapter(copy.deepcopy(base), dt.IA3Config(targets=targets, feedforward=ff, modules_to_save=saved))
    _randomise(dt.adapter_params(ours))
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (_out(theirs, ids) - _out(ours, ids)).abs().max() <= TOL


def test_float64_reference_of_the_equations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    W1, b1, W2, b2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    dt.add_adapter(model, dt.IA3Config(targets=["0", "2"], feedforward=["2"], dtype=None))
    _randomise(dt.adapter_params(model))
    l_out, l_ff = model[0].deltas["default"].l.detach().flatten(), model[2].deltas["default"].l.detach().flatten()
    # output scaling: l ⊙ (W x + b); feed-forward: W (l ⊙ h) + b
    expected = (l_ff * torch.tanh(l_out * (x @ W1.T + b1))) @ W2.T + b2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
    assert model[0].deltas["default"].l.shape == (8, 1) and model[2].deltas["default"].l.shape == (1, 8)


def test_ia3_refuses_what_it_cannot_wrap_and_mismatched_files(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="cannot wrap"):
        dt.add_adapter(model, dt.IA3Config(targets=["0"]))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    dt.add_adapter(base, dt.IA3Config(targets=["0", "2"], feedforward=["2"]))
    dt.save_adapter(base, tmp_path / "a")
    other = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))  # another shape of layer 0
    with pytest.raises(dt.AdapterFileError, match=r"ia3_l' has shape \(6, 1\).*needs \(7, 1\)"):
        dt.load_adapter(other, tmp_path / "a")
    assert not dt.list_adapters(other)


def test_deltatune_train_method_ia3_from_the_command_line(tmp_path):
    from test_train import make_tiny_llama, write_task

    from deltatune.cli import main

    model, data = make_tiny_llama(tmp_path / "model"), write_task(tmp_path / "task.jsonl")
    out = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--method", "ia3",
                 "--targets", '["k_proj", "v_proj", "down_proj"]', "--feedforward", '["down_proj"]',
                 "--max-steps", "3", "--lr", "1e-2", "--no-progress"])
    assert code == 0
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(k.endswith(".ia3_l") for k in tensors)
    assert any(not torch.allclose(t, torch.ones_like(t)) for t in tensors.values())  # training moved them
    reloaded = dt.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(model), out / "adapter")
    assert isinstance(dt.list_adapters(reloaded)["default"], dt.IA3Config)
