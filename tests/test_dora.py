"""DoRA (``LoraConfig(use_dora=True)``) against PEFT: adapters made by PEFT load into deltatune with the
same outputs and the other way round, on Llama, Qwen2, GPT-2 (Conv1D and the token embedding), BERT
and a conv net; merged weights equal PEFT's; training-mode outputs and gradients (dropout, the
detached norm) equal PEFT's; a float64 reference of the paper's Eq. (5) on each geometry."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5

MODELS = {
    "llama": (_models.llama, "all-linear", None),
    "qwen2": (_models.qwen2, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], None),  # q/k/v carry a bias
    "gpt2": (_models.gpt2, ["c_attn", "c_proj", "c_fc", "wte"], None),  # Conv1D, and an embedding
    "bert": (_models.bert, ["query", "value", "dense"], ["classifier"]),  # the head trained in full
    "convnet": (_models.ConvNet, ["conv1", "conv2", "fc"], None),  # Conv2d (magnitude (1, out, 1, 1))
}


def _scale_magnitudes(params, seed=1):
    """Move each magnitude away from its initial norm, so that DoRA differs from plain LoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _peft_dora(base, targets, saved, **extra):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=saved, use_dora=True,
                          init_lora_weights=False, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _scale_magnitudes([p for n, p in model.named_parameters() if "lora_magnitude_vector" in n])
    return model


def _peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


@pytest.mark.parametrize("name", MODELS)
def test_peft_made_dora_loads_into_deltatune(name, tmp_path):
    torch.manual_seed(0)
    make, targets, saved = MODELS[name]
    base = make().eval()
    inputs = _models.inputs(name)
    theirs = _peft_dora(base, targets, saved).eval()
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    expected = _models.output(theirs, inputs)

    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    assert all(p.numel() for p in dt.adapter_params(ours, role="magnitude"))
    got = _models.output(ours, inputs)
    assert (got - _models.output(base, inputs)).abs().max() > 1e-3  # the adapter does something
    assert (got - expected).abs().max().item() <= TOL

    # without the magnitudes (plain LoRA from the same A, B) the outputs differ: m is read and used
    plain = json.loads((tmp_path / "adapter_config.json").read_text())
    lora = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, targets=targets, init="random"))
    for (_, a), (_, b) in zip(dt.adapters.delta_layers(lora), dt.adapters.delta_layers(ours)):
        a.load_roles("default", {r: t for r, t in b.describe("default").items() if r != "magnitude"})
    assert plain["use_dora"] and (_models.output(lora, inputs) - got).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_deltatune_dora_loads_into_peft(name, tmp_path):
    torch.manual_seed(0)
    make, targets, saved = MODELS[name]
    base = make().eval()
    inputs = _models.inputs(name)
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=saved,
                                                             init="random", use_dora=True))
    _scale_magnitudes(dt.adapter_params(ours, role="magnitude"))
    ours.eval()
    expected = _models.output(ours, inputs)
    dt.save_adapter(ours, tmp_path)

    theirs = _peft_load(base, tmp_path)
    assert (expected - _models.output(base, inputs)).abs().max() > 1e-3
    assert (_models.output(theirs, inputs) - expected).abs().max().item() <= TOL
    magnitudes = {n for n, _ in theirs.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == len(list(dt.adapters.delta_layers(ours)))


@pytest.mark.parametrize("name", ["llama", "gpt2", "convnet"])
def test_merge_equals_peft_merge_and_unmerged_output(name):
    """Merged weights equal PEFT's ``merge_and_unload`` (DoRA's merge is not additive), the merged model
    equals the unmerged one, and unmerging gives W back."""
    torch.manual_seed(0)
    make, targets, _ = MODELS[name]
    if name == "gpt2":  # not wte: it is tied to the output head, which a merge would change too
        targets = ["c_attn", "c_proj", "c_fc"]
    base = make().eval()
    inputs = _models.inputs(name)
    theirs = _peft_dora(base, targets, None).eval()
    ours = copy.deepcopy(base)
    dt.add_adapter(ours, dt.LoraConfig(r=4, alpha=8, targets=targets, use_dora=True))
    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    for path, layer in dt.adapters.delta_layers(ours):
        keys = {"A": "lora_A.default.weight", "B": "lora_B.default.weight",
                "magnitude": "lora_magnitude_vector.default.weight"}
        if path.endswith("wte"):
            keys.update(A="lora_embedding_A.default", B="lora_embedding_B.default")
        layer.load_roles("default", {r: theirs_sd[f"{path}.{k}"] for r, k in keys.items()})
    unmerged = _models.output(ours, inputs)
    original = {k: v.clone() for k, v in ours.state_dict().items()}

    dt.merge(ours)
    assert (_models.output(ours, inputs) - unmerged).abs().max().item() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = theirs.merge_and_unload()
    for key, value in merged_peft.state_dict().items():
        assert (ours.state_dict()[key] - value).abs().max().item() <= TOL, key
    dt.unmerge(ours)
    for key, value in original.items():
        assert (ours.state_dict()[key] - value).abs().max().item() <= TOL, key


def test_training_outputs_and_gradients_equal_peft():
    """In training mode with dropout (the same random mask: one ``F.dropout`` call per layer in the same
    order), outputs and the gradients of A, B and m equal PEFT's: the norm is detached (Sec. 4.3)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    x = torch.randn(5, 12)
    theirs = _peft_dora(base, ["0", "2"], None, lora_dropout=0.25).train()
    ours = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=4, alpha=8, targets=["0", "2"], use_dora=True,
                                                             dropout=0.25))
    sd = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    for path, layer in dt.adapters.delta_layers(ours):
        layer.load_roles("default", {"A": sd[f"{path}.lora_A.default.weight"], "B": sd[f"{path}.lora_B.default.weight"],
                                     "magnitude": sd[f"{path}.lora_magnitude_vector.default.weight"]})
    ours.train()
    torch.manual_seed(5)
    y_theirs = theirs(x)
    torch.manual_seed(5)
    y_ours = ours(x)
    assert (y_ours - y_theirs).abs().max().item() <= TOL
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for path, layer in dt.adapters.delta_layers(ours):
        roles = layer.deltas["default"].roles()
        for role, key in (("A", "lora_A.default.weight"), ("B", "lora_B.default.weight"),
                          ("magnitude", "lora_magnitude_vector.default.weight")):
            assert (roles[role].grad - grads[f"{path}.{key}"]).abs().max().item() <= TOL, (path, role)


# -- the paper's equation in float64 ---------------------------------------------------------------------
def _eq5(W, B, A, m, s):
    """Eq. (5): ``m ⊙ (W + s·BA) / ||W + s·BA||_c`` per output row (norm treated as a constant)."""
    V = W.flatten(1) + s * (B.flatten(1) @ A.flatten(1))
    return (m.reshape(-1, 1) * V / V.norm(dim=1, keepdim=True).detach()).reshape(W.shape)


GEOMETRIES = {
    "linear": (lambda: nn.Linear(7, 5), lambda g: torch.randn(3, 7, generator=g, dtype=torch.float64),
               lambda layer, x, W: F.linear(x, W, layer.bias)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1),
               lambda g: torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64),
               lambda layer, x, W: F.conv2d(x, W, layer.bias, padding=1)),
    "embedding": (lambda: nn.Embedding(11, 6), lambda g: torch.randint(0, 11, (2, 4), generator=g),
                  lambda layer, x, W: F.embedding(x, W.T)),  # the table (num, dim) is W.T of the (dim, num) map
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_float64_reference_of_the_paper(geometry):
    torch.manual_seed(0)
    make, make_x, run = GEOMETRIES[geometry]
    model = nn.Sequential(make()).double()
    x = make_x(torch.Generator().manual_seed(0))
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=3, targets=["0"], use_dora=True, init="random", dtype=None))
    layer = model[0]
    delta = layer.deltas["default"]
    A, B, m = delta.lora.A, delta.lora.B, delta.magnitude
    W = layer.weight if geometry != "embedding" else layer.weight.T  # (out, in...)
    assert A.dtype == torch.float64
    # at init m = ||W + s·BA||_c, so W' = W + s·BA (the base itself where B starts at zero)
    V = W + 1.5 * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
    assert torch.allclose(m.reshape(-1), V.flatten(1).norm(dim=1), atol=1e-12)
    assert (model(x) - run(layer, x, V)).abs().max().item() <= 1e-12
    _scale_magnitudes([m])

    y = model(x)
    reference = run(layer, x, _eq5(W.detach(), B, A, m, 1.5))
    assert (y - reference).abs().max().item() <= 1e-12
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((y * g).sum(), [A, B, m])
    want = torch.autograd.grad((reference * g).sum(), [A, B, m])
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-12
    expected = _eq5(W.detach(), B, A, m, 1.5).detach()  # before W changes in place
    dt.merge(model)
    merged = layer.weight if geometry != "embedding" else layer.weight.T
    # the layer adds merges to W in fp32 (Geometry.add_to_weight), whatever W's dtype
    assert (merged - expected).abs().max().item() <= 1e-6
    assert (model(x) - y).abs().max().item() <= 1e-5


def test_qdora_uses_the_dequantized_weight():
    """On the 4-bit layer DoRA (QDoRA) equals DoRA on a dense layer holding the dequantized weight: the
    output, and the gradients of A, B and the magnitude (the plain path)."""
    from deltatune.quant import QuantLinear

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32))
    quant = nn.Sequential(QuantLinear.from_linear(copy.deepcopy(dense[0]), "nf4", 64))
    with torch.no_grad():
        dense[0].weight.copy_(dt.adapters.geometry_for(quant[0]).base_weight(quant[0]).float())
    cfg = dt.LoraConfig(r=4, alpha=8, targets=["0"], use_dora=True, init="random")
    for model in (dense, quant):
        torch.manual_seed(1)
        dt.add_adapter(model, cfg)
        _scale_magnitudes(dt.adapter_params(model, role="magnitude"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (dense(x) - quant(x)).abs().max().item() <= 1e-5
    g = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    grads = [torch.autograd.grad((model(x) * g).sum(), dt.adapter_params(model)) for model in (dense, quant)]
    assert len(grads[1]) == 3  # A, B, magnitude
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5


def test_bad_files_and_combinations_raise(tmp_path):
    torch.manual_seed(0)
    base = _models.llama().eval()
    theirs = _peft_dora(base, ["q_proj"], None)
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["use_dora"] = False  # a DoRA file whose config says plain LoRA: the magnitudes are unexpected
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        dt.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="pissa"):
        dt.LoraConfig(use_dora=True, init="pissa")
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=2, targets=["q_proj"], use_dora=True), "a")
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["q_proj"]), "b")
    with pytest.raises(ValueError, match="plain LoRA"):
        dt.combine(model, {"a": 1.0, "b": 1.0}, "ab")
