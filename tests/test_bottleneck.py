"""Bottleneck adapters: a float64 reference of the papers' equations at every kind of site, the sites
found from BERT / Llama / Qwen2 / Mistral / GPT-2 structure, the verbs (two adapters, disabled, remove,
merge refused, save/load in our format), beside LoRA in the same blocks, AdapterHub files made here
(their parity against the real library is in test_adapterhub_parity.py), bad input, and
``deltatune train --method bottleneck``."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.bottleneck import find_sites
from deltatune.methods.bottleneck_block import BottleneckBlock

transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


def _randomize(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def _a(roles, v, act, scale):
    """The bottleneck of Houlsby et al. (2019), Sec. 2.1: scale * (W_up act(W_down v + b_down) + b_up)."""
    h = act(v @ roles["down_weight"].T + roles["down_bias"])
    return scale * (h @ roles["up_weight"].T + roles["up_bias"])


def _ln(v, norm, weight=None, bias=None):
    mu = v.mean(-1, keepdim=True)
    var = v.var(-1, keepdim=True, unbiased=False)
    w = norm.weight if weight is None else weight
    b = norm.bias if bias is None else bias
    return (v - mu) / torch.sqrt(var + norm.eps) * w + b


@pytest.mark.parametrize("train_norms", [False, True])
@pytest.mark.parametrize("placement,activation", [("houlsby", "swish"), ("pfeiffer", "relu"), ("parallel", "gelu")])
def test_bert_blocks_follow_the_equations_in_float64(placement, activation, train_norms):
    torch.manual_seed(0)
    model = _models.bert().double().eval()
    cfg = dt.BottleneckConfig(placement=placement, activation=activation, reduction_factor=4, scaling=1.5,
                              train_layer_norms=train_norms, dtype=None)
    dt.add_adapter(model, cfg)
    _randomize(model)
    layer = model.bert.encoder.layer[1]
    sites = [layer.attention.output, layer.output] if placement == "houlsby" else [layer.output]
    assert all(isinstance(s, BottleneckBlock) for s in sites)
    assert not isinstance(layer.attention.output, BottleneckBlock) or placement == "houlsby"
    g = torch.Generator().manual_seed(1)
    for block in sites:
        d_in = block.dense.in_features
        hs = torch.randn(2, 5, d_in, generator=g, dtype=torch.float64)
        x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
        r = block.describe("default")
        assert r["down_weight"].dtype == torch.float64 and r["down_weight"].shape == (8, 32)
        w, b = (r["norm_weight"], r["norm_bias"]) if train_norms else (None, None)
        assert ("norm_weight" in r) == train_norms
        h = hs @ block.dense.weight.T + block.dense.bias  # dropout is off in eval
        a = lambda v: _a(r, v, ACT[activation], 1.5)  # noqa: E731
        if placement == "houlsby":  # Houlsby et al. Fig. 2: inside the sublayer, before the residual add and LN
            want = _ln(h + a(h) + x, block.LayerNorm, w, b)
        elif placement == "pfeiffer":  # AdapterHub seq_bn: on the normed output, its residual h, then LN(. + x)
            want = _ln(h + a(_ln(h + x, block.LayerNorm, w, b)) + x, block.LayerNorm, w, b)
        else:  # parallel (He et al. 2022): reads the sublayer's input
            want = _ln(h + a(x) + x, block.LayerNorm, w, b)
        with torch.no_grad():
            got = block(hs, x)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        with torch.no_grad(), dt.disabled(model):
            torch.testing.assert_close(block(hs, x), _ln(h + x, block.LayerNorm), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_decoder_sites_follow_the_equations_in_float64(placement):
    torch.manual_seed(0)
    model = _models.llama().double().eval()
    dt.add_adapter(model, dt.BottleneckConfig(placement=placement, activation="swish", reduction_factor=4,
                                              scaling=0.7, dtype=None))
    _randomize(model)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    mlp = layer.mlp
    inner = torch.randn(2, 5, 64, generator=g, dtype=torch.float64)
    with torch.no_grad():
        if placement == "parallel":  # beside the MLP, reading its input
            r = mlp.describe("default")
            base = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
            torch.testing.assert_close(mlp(x), base + _a(r, x, F.silu, 0.7), atol=1e-12, rtol=1e-10)
            return
        down = mlp.down_proj  # after the feed-forward output, before the residual add
        r = down.describe("default")
        y = inner @ down.weight.T
        torch.testing.assert_close(down(inner), y + _a(r, y, F.silu, 0.7), atol=1e-12, rtol=1e-10)
        o_proj = layer.self_attn.o_proj
        assert (placement == "houlsby") == ("default" in getattr(o_proj, "deltas", {}))


def _rms(v, weight, eps):
    """LlamaRMSNorm / Qwen2RMSNorm in float64: v / sqrt(mean(v^2) + eps) * weight."""
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_layer_norms_train_as_the_adapters_own_copies(arch, tmp_path):
    torch.manual_seed(0)
    model = getattr(_models, arch)().eval()
    base = copy.deepcopy(model)
    batch = _models.inputs(arch)
    keys, y0 = list(model.state_dict()), _models.output(model, batch)
    norms = {n: p.clone() for n, p in model.named_parameters() if "layernorm" in n}
    assert len(norms) == 4  # input_layernorm and post_attention_layernorm of two layers
    dt.add_adapter(model, dt.BottleneckConfig(placement="houlsby", train_layer_norms=True), name="h")
    dt.add_adapter(model, dt.BottleneckConfig(placement="pfeiffer"), name="p")
    dt.set_active(model, "h")
    layer = model.model.layers[1]
    copies = {n: layer.get_submodule(n).describe("h") for n in ("input_layernorm", "post_attention_layernorm")}
    assert all(set(c) == {"weight"} for c in copies.values())
    for n, c in copies.items():  # identity at init: the copy is the base norm, so the model is the base model
        assert torch.equal(c["weight"], norms[f"model.layers.1.{n}.weight"])
    assert "p" not in layer.input_layernorm.adapter_names()  # pfeiffer without train_layer_norms: no copies
    assert torch.equal(_models.output(model, batch), y0)

    # only the bottlenecks and the norm copies train; the base norms stay untouched
    h_params = {id(p) for p in dt.adapter_params(model, "h")}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in dt.adapter_params(model)}
    assert len(h_params) == 2 * (2 * 4 + 2)  # per layer: two bottlenecks of four tensors, two norm weights
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in copies:
            w = layer.get_submodule(n).deltas["h"].weight
            w.copy_(1 + 0.5 * torch.randn(w.shape, generator=g))
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.eval()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "model.layers.1.input_layernorm.deltas.h.weight" in grads
    assert "model.layers.1.post_attention_layernorm.deltas.h.weight" in grads
    assert not any(n.endswith("layernorm.weight") for n in grads)
    model.zero_grad()
    y_h = _models.output(model, batch)
    assert not torch.allclose(y_h, y0, atol=1e-4)
    for n, w in norms.items():
        assert torch.equal(model.get_parameter(n), w)

    # the norm runs with the active adapter's copy (float64 reference), with the base weights otherwise
    x = torch.randn(2, 5, 32, generator=g)
    eps = layer.input_layernorm.base_module.variance_epsilon
    w_h = copies["input_layernorm"]["weight"].double()
    with torch.no_grad():
        torch.testing.assert_close(layer.input_layernorm(x).double(), _rms(x.double(), w_h, eps), atol=1e-6, rtol=1e-6)
        w_base = norms["model.layers.1.input_layernorm.weight"].double()
        for off in ("p", None):
            if off is None:
                ctx = dt.disabled(model)
            else:
                dt.set_active(model, off)
                ctx = torch.no_grad()
            with ctx:
                torch.testing.assert_close(layer.input_layernorm(x).double(), _rms(x.double(), w_base, eps),
                                           atol=1e-6, rtol=1e-6)
        dt.set_active(model, "h")
        with dt.disabled(model):
            torch.testing.assert_close(_models.output(model, batch), y0)

    # saved with the adapter, under the norm's own parameter names
    dt.save_adapter(model, tmp_path / "h", name="h")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "h" / "adapter_model.safetensors")
    assert "model.layers.1.input_layernorm/weight" in tensors
    assert sum(k.endswith("layernorm/weight") for k in tensors) == 4
    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, tmp_path / "h")
    torch.testing.assert_close(_models.output(fresh, batch), y_h)
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge(model, "h")

    dt.remove_adapter(model, "h")
    dt.remove_adapter(model, "p")
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert torch.equal(_models.output(model, batch), y0)


def test_decoder_norm_copies_keep_the_models_dtype_and_follow_explicit_targets():
    torch.manual_seed(0)
    model = _models.llama().to(torch.bfloat16).eval()
    batch = _models.inputs("llama")
    y0 = _models.output(model, batch)
    dt.add_adapter(model, dt.BottleneckConfig(targets=["layers.0.mlp.down_proj"], train_layer_norms=True))
    got = [p for p, m in dt.adapter_modules(model) if m.adapter_names()]
    assert got == ["model.layers.0.mlp.down_proj", "model.layers.0.input_layernorm",
                   "model.layers.0.post_attention_layernorm"]  # the norms of the layer that holds the target
    norm = model.model.layers[0].input_layernorm
    assert norm.deltas["default"].weight.dtype == torch.float32  # the adapter's dtype ...
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert norm(x).dtype == torch.bfloat16  # ... but the norm's output stays the model's
    assert torch.equal(_models.output(model, batch), y0)


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2", "mistral", "gpt2"])
def test_sites_are_found_from_the_structure(arch):
    torch.manual_seed(0)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))
    else:
        model = getattr(_models, arch)()
    model.eval()
    want = {
        "bert": {"houlsby": ["attention.output", "output"], "pfeiffer": ["output"], "parallel": ["output"]},
        "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"]},
    }.get(arch, {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"], "parallel": ["mlp"]})
    batch = _models.inputs(arch)
    y0 = _models.output(model, batch)
    for placement, suffixes in want.items():
        m = copy.deepcopy(model)
        dt.add_adapter(m, dt.BottleneckConfig(placement=placement))
        got = [p for p, mod in dt.adapter_modules(m) if mod.adapter_names()]
        layer_prefix = "bert.encoder.layer" if arch == "bert" else ("transformer.h" if arch == "gpt2" else "model.layers")
        assert got == [f"{layer_prefix}.{i}.{s}" for i in range(2) for s in suffixes], (placement, got)
        torch.testing.assert_close(_models.output(m, batch), y0)  # up zero: the base model at init
        _randomize(m)
        assert not torch.allclose(_models.output(m, batch), y0, atol=1e-3)


def test_a_model_without_a_place_for_a_bottleneck_raises_naming_what_was_looked_for():
    model = _models.ConvNet()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"no place for a bottleneck adapter in ConvNet.*dense.*LayerNorm.*o_proj"):
        dt.add_adapter(model, dt.BottleneckConfig())
    assert list(model.state_dict()) == keys and not dt.list_adapters(model)
    with pytest.raises(ValueError, match="cannot wrap"):  # a named conv layer is no bottleneck site either
        dt.add_adapter(model, dt.BottleneckConfig(targets=["conv1"]))
    with pytest.raises(ValueError, match="placement must be one of"):
        dt.BottleneckConfig(placement="sideways")


def test_verbs_two_adapters_disabled_merge_refused_remove_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = _models.bert().eval()
    batch = _models.inputs("bert")
    base = copy.deepcopy(model)
    keys, y0 = list(model.state_dict()), _models.output(model, batch)
    dt.add_adapter(model, dt.BottleneckConfig(placement="houlsby", activation="swish", train_layer_norms=True), name="h")
    dt.add_adapter(model, dt.BottleneckConfig(placement="pfeiffer", reduction_factor=8), name="p")
    _randomize(model)
    trainable = {id(p) for p in dt.adapter_params(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        dt.set_active(model, "h")
        y_h = _models.output(model, batch)
        dt.set_active(model, "p")
        y_p = _models.output(model, batch)
        assert not torch.allclose(y_h, y_p, atol=1e-3) and not torch.allclose(y_p, y0, atol=1e-3)
        with dt.disabled(model):
            torch.testing.assert_close(_models.output(model, batch), y0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'p' is a bottleneck adapter.*cannot be merged"):
        dt.merge(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    dt.save_adapter(model, tmp_path / "h", name="h")
    raw = json.loads((tmp_path / "h" / "adapter_config.json").read_text())
    assert raw["deltatune_method"] == "bottleneck" and raw["config"]["placement"] == "houlsby"
    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, tmp_path / "h")
    torch.testing.assert_close(_models.output(fresh, batch), y_h)
    assert not any(p.requires_grad for p in dt.adapter_params(fresh))

    dt.remove_adapter(model, "h")
    with torch.no_grad():
        torch.testing.assert_close(_models.output(model, batch), y_p)
    dt.remove_adapter(model, "p")
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(_models.output(model, batch), y0)


@pytest.mark.parametrize("bottleneck_first", [True, False])
def test_lora_inside_bottleneck_blocks_stays_visible_and_both_remove(bottleneck_first):
    torch.manual_seed(0)
    model = _models.bert().eval()
    batch = _models.inputs("bert")
    base = copy.deepcopy(model)
    y0 = _models.output(model, batch)
    adds = [lambda: dt.add_adapter(model, dt.BottleneckConfig(), name="bn"),
            lambda: dt.add_adapter(model, dt.LoraConfig(r=2, targets=["dense"], init="random"), name="lora")]
    for add in adds if bottleneck_first else adds[::-1]:
        add()
    assert dt.adapter_params(model, "lora") and dt.adapter_params(model, "bn")
    dense = model.bert.encoder.layer[0].attention.output.dense
    assert isinstance(model.bert.encoder.layer[0].attention.output, BottleneckBlock) and "lora" in dense.deltas
    _randomize(model)
    with torch.no_grad():
        dt.set_active(model, "lora")
        y_lora = _models.output(model, batch)
        assert not torch.allclose(y_lora, y0, atol=1e-3)  # the LoRA inside the wrapped block runs
        dt.set_active(model, ["bn", "lora"])
        assert not torch.allclose(_models.output(model, batch), y_lora, atol=1e-3)
    dt.remove_adapter(model, "bn")
    dt.set_active(model, "lora")
    torch.testing.assert_close(_models.output(model, batch), y_lora)
    dt.remove_adapter(model, "lora")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(_models.output(model, batch), y0)


# -- files -----------------------------------------------------------------------------------------
def _saved(tmp_path, **cfg):
    torch.manual_seed(0)
    model = _models.bert().eval()
    dt.add_adapter(model, dt.BottleneckConfig(**cfg))
    _randomize(model)
    return model, dt.save_adapter(model, tmp_path / "bn")


def test_a_bottleneck_file_with_another_config_or_shapes_or_model_fails_naming_the_key(tmp_path):
    model, path = _saved(tmp_path, placement="pfeiffer", reduction_factor=4)
    config = path / "adapter_config.json"
    raw = json.loads(config.read_text())
    fresh = _models.bert().eval()
    # another method's config over bottleneck tensors
    config.write_text(json.dumps({"deltatune_method": "ia3", "config": {"targets": ["dense"]}}))
    with pytest.raises(dt.AdapterFileError, match=r"key 'bert.encoder.layer.0.output/down_bias'"):
        dt.load_adapter(fresh, path)
    # wrong shapes: the config asks for a smaller bottleneck than the file holds
    config.write_text(json.dumps({**raw, "config": {**raw["config"], "reduction_factor": 8}}))
    with pytest.raises(dt.AdapterFileError,
                       match=r"down_bias' has shape \(8,\), but module 'bert.encoder.layer.0.output'.*needs \(4,\)"):
        dt.load_adapter(fresh, path)
    # a model with no place for a bottleneck
    config.write_text(json.dumps(raw))
    convnet = _models.ConvNet()
    with pytest.raises(dt.AdapterFileError, match=r"adapter_config.json: no place for a bottleneck adapter in ConvNet"):
        dt.load_adapter(convnet, path)
    assert not dt.list_adapters(fresh) and not dt.list_adapters(convnet)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in _models.bert().modules()]


def _adapterhub_dir(tmp_path, model, name="x", **config):
    """An AdapterHub-style directory made by hand from our adapter's tensors (their key names)."""
    from safetensors.torch import save_file

    out = tmp_path / "hub"
    out.mkdir(exist_ok=True)
    part = {"down_weight": "adapter_down.0.weight", "down_bias": "adapter_down.0.bias",
            "up_weight": "adapter_up.weight", "up_bias": "adapter_up.bias"}
    tensors = {}
    for path, module in dt.adapter_modules(model):
        for role, t in module.describe("default").items():
            tensors[f"{path.removeprefix('bert.')}.adapters.{name}.{part[role]}"] = t.contiguous()
    save_file(tensors, out / "adapter.safetensors")
    c = {"mh_adapter": False, "output_adapter": True, "original_ln_before": True, "original_ln_after": True,
         "residual_before_ln": True, "ln_before": False, "ln_after": False, "is_parallel": False,
         "reduction_factor": 4, "non_linearity": "relu", "scaling": 1.0, "init_weights": "bert", "leave_out": [],
         **config}
    (out / "adapter_config.json").write_text(json.dumps({"config": c, "name": name, "model_class": "BertModel",
                                                         "version": "adapters.1.3.0"}))
    return out


def test_adapterhub_files_load_and_bad_ones_fail_naming_what(tmp_path):
    model, _ = _saved(tmp_path, placement="pfeiffer", reduction_factor=4)
    batch = _models.inputs("bert")
    want = _models.output(model, batch)
    hub = _adapterhub_dir(tmp_path, model)
    fresh = _models.bert().eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k in fresh.state_dict()})
    dt.load_adapter(fresh, hub, name="hub")
    torch.testing.assert_close(_models.output(fresh, batch), want)
    dt.remove_adapter(fresh, "hub")

    raw = json.loads((hub / "adapter_config.json").read_text())
    raw["config"]["ln_after"] = True
    (hub / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(dt.AdapterFileError, match=r"adapter_config.json: config.ln_after = True is not supported"):
        dt.load_adapter(fresh, hub)
    raw["config"].update(ln_after=False, reduction_factor=8)
    (hub / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(dt.AdapterFileError, match=r"adapter.safetensors: key 'encoder.layer.0.output.adapters.x"
                                                  r".adapter_down.0.(bias|weight)' has shape"):
        dt.load_adapter(fresh, hub)
    raw["config"]["reduction_factor"] = 4
    (hub / "adapter_config.json").write_text(json.dumps(raw))
    (hub / "adapter.safetensors").rename(hub / "pytorch_adapter.bin")
    with pytest.raises(dt.AdapterFileError, match=r"pytorch_adapter.bin: pickle files are never loaded"):
        dt.load_adapter(fresh, hub)
    assert not dt.list_adapters(fresh)


@pytest.mark.parametrize("cfg", [
    dict(placement="houlsby", activation="swish", reduction_factor=4, scaling=0.5, init="bert"),
    dict(placement="pfeiffer", activation="gelu", reduction_factor=2.5, dropout=0.1, init="houlsby"),
    dict(placement="parallel", activation="relu", scaling=4.0),
])
def test_adapterhub_files_written_read_back_equal(tmp_path, cfg):
    from safetensors.torch import load_file

    from deltatune.formats.adapterhub import read_adapterhub

    torch.manual_seed(0)
    model = _models.bert().eval()
    base = copy.deepcopy(model)
    batch = _models.inputs("bert")
    config = dt.BottleneckConfig(**cfg)
    dt.add_adapter(model, config, name="task")
    model.eval()  # the new modules train (dropout on)
    _randomize(model)
    want = _models.output(model, batch)
    out = dt.save_adapter(model, tmp_path / "hub", name="task", format="adapterhub")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["name"] == "task" and raw["model_class"] == "BertForSequenceClassification"
    assert raw["version"].startswith("adapters.") and raw["config"]["non_linearity"] == cfg["activation"]
    tensors = load_file(out / "adapter.safetensors")
    sites = [p for p, m in dt.adapter_modules(model) if m.adapter_names()]
    assert sorted(tensors) == sorted(f"{p}.adapters.task.{part}" for p in sites for part in (
        "adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"))

    fresh = copy.deepcopy(base)
    read_cfg, parts = read_adapterhub(fresh, out)
    assert read_cfg == config
    assert sorted(parts) == sorted(sites)
    for path in sites:
        described = model.get_submodule(path).describe("task")
        assert parts[path].keys() == described.keys()
        assert all(torch.equal(parts[path][r], described[r]) for r in described)
    dt.load_adapter(fresh, out, name="task")
    fresh.eval()
    assert dt.list_adapters(fresh)["task"] == config
    torch.testing.assert_close(_models.output(fresh, batch), want, atol=0, rtol=0)


def test_what_adapterhub_files_cannot_hold_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    bert, llama = _models.bert().eval(), _models.llama().eval()
    dt.add_adapter(bert, dt.BottleneckConfig(train_layer_norms=True), name="ln")
    dt.add_adapter(bert, dt.BottleneckConfig(modules_to_save=["classifier"]), name="head")
    dt.add_adapter(bert, dt.LoraConfig(r=2, targets=["query"]), name="lora")
    dt.add_adapter(llama, dt.BottleneckConfig(placement="pfeiffer"), name="dec")
    cases = [(bert, "ln", r"adapter 'ln': train_layer_norms=True cannot be written in AdapterHub's format"),
             (bert, "head", r"modules_to_save=\['classifier'\] cannot be written"),
             (bert, "lora", r"adapter 'lora' is a lora adapter; AdapterHub's format is written for bottleneck"),
             (llama, "dec", r"module 'model.layers.0.mlp.down_proj' \(DeltaLayer\) is not a post-norm block")]
    for model, name, match in cases:
        with pytest.raises(dt.AdapterFileError, match=match):
            dt.save_adapter(model, tmp_path / name, name=name, format="adapterhub")
        assert not (tmp_path / name).exists()  # checked before anything is written
    with pytest.raises(ValueError, match="expected 'peft'.*'adapterhub'"):
        dt.save_adapter(bert, tmp_path / "x", name="ln", format="adapterhub-v2")


def test_deltatune_train_method_bottleneck_from_the_command_line(tmp_path):
    from test_train import make_tiny_llama, write_task

    from deltatune.cli import main

    model, data = make_tiny_llama(tmp_path / "model"), write_task(tmp_path / "task.jsonl")
    out = tmp_path / "run"
    try:
        code = main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--method",
                     "bottleneck", "--merge", "--max-steps", "1", "--no-progress"])
    except SystemExit as e:
        code = e.code
    assert code != 0 and not (out / "adapter").exists()  # refused before training
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--method", "bottleneck",
                 "--placement", "parallel", "--reduction-factor", "4", "--activation", "swish", "--scaling", "2.0",
                 "--max-steps", "3", "--lr", "1e-2", "--no-progress"])
    assert code == 0
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all(k.split("/")[0].endswith(".mlp") for k in tensors)
    assert any(k.endswith("/up_weight") and t.abs().max() > 0 for k, t in tensors.items())  # trained from zero
    reloaded = dt.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(model), out / "adapter")
    cfg = dt.list_adapters(reloaded)["default"]
    assert isinstance(cfg, dt.BottleneckConfig) and cfg.placement == "parallel" and cfg.scaling == 2.0
