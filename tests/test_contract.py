"""The adapter contract, as one matrix over method x layer geometry x execution path (plain, fused).

Every registered method gets the same invariant checks: identity at init, only adapter parameters
train, merge equals unmerged and is idempotent, merge + unmerge restores W, remove restores the exact
module tree and state-dict keys, save/load round trip. A method that cannot wrap a geometry must say
so clearly. ``toy_scale_only.py`` is a method written from docs/architecture.md alone.
"""

import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.adapters import DeltaLayer, geometry_for, method_for
from deltatune.fast import disable_fast_path, enable_fast_path
from toy_scale_only import ScaleOnlyConfig


def _linear():
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5)), lambda g: torch.randn(4, 3, 12, generator=g)


def _conv1d():
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 2, stride=2)), \
        lambda g: torch.randn(2, 3, 10, generator=g)


def _conv2d():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(8, 4, 1)), \
        lambda g: torch.randn(2, 3, 6, 6, generator=g)


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 12, padding_idx=0)
        self.out = nn.Linear(12, 3)

    def forward(self, ids):
        return self.out(self.tok(ids))


def _embedding():
    return _Embed(), lambda g: torch.randint(0, 20, (3, 7), generator=g)


def _gpt2_conv1d():
    return nn.Sequential(Conv1D(16, 12), nn.Tanh(), Conv1D(5, 16)), lambda g: torch.randn(4, 3, 12, generator=g)


def _quant_linear():
    from deltatune.quant import QuantLinear

    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 64))
    model[0] = QuantLinear.from_linear(model[0], "nf4", 64, double_quant=True)
    model[2] = QuantLinear.from_linear(model[2], "nf4", 64, double_quant=False)
    return model, lambda g: torch.randn(4, 3, 64, generator=g)


# -- the matrix: method x layer geometry x execution path ------------------------------------------------
LAYERS = {"linear": _linear, "conv1d": _conv1d, "conv2d": _conv2d, "embedding": _embedding,
          "gpt2_conv1d": _gpt2_conv1d, "quant_linear": _quant_linear}
METHODS = {
    "lora": lambda targets: dt.LoraConfig(r=2, alpha=4, targets=targets, init="kaiming"),
    "lora_gaussian": lambda targets: dt.LoraConfig(r=2, alpha=4, targets=targets, init="gaussian"),
    "rslora": lambda targets: dt.LoraConfig(r=2, alpha=4, targets=targets, use_rslora=True),
    "pissa": lambda targets: dt.LoraConfig(r=2, alpha=4, targets=targets, init="pissa"),
    "scale_only": lambda targets: ScaleOnlyConfig(targets=targets),
    "dora": lambda targets: dt.LoraConfig(r=2, alpha=4, targets=targets, use_dora=True),
    "ia3": lambda targets: dt.IA3Config(targets=targets, feedforward=targets[-1:]),
    "loha": lambda targets: dt.LoHaConfig(r=2, alpha=4, targets=targets),
    "lokr": lambda targets: dt.LoKrConfig(r=2, alpha=4, targets=targets, decompose_both=True),
    "bottleneck": lambda targets: dt.BottleneckConfig(targets=targets, reduction_factor=4, activation="swish"),
    "bottleneck_parallel": lambda targets: dt.BottleneckConfig(placement="parallel", targets=targets, reduction_factor=4,
                                                                  activation="gelu"),
}
PATHS = ["plain", "fused"]


def _build(layer, method, seed=0):
    torch.manual_seed(seed)
    model, make_input = LAYERS[layer]()
    adaptable = [n for n, m in model.named_modules() if n and geometry_for(m) is not None]
    return model, make_input, METHODS[method](adaptable)


def _perturb(model, std=0.3):
    """Give every adapter parameter random values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in dt.adapter_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _supported(model, cfg) -> bool:
    """Whether ``cfg``'s method can wrap every adaptable layer of ``model``."""
    return all(method_for(cfg).supports(geometry_for(m)) for m in model.modules() if geometry_for(m) is not None)


def _weight_targets(model, which):
    """{layer: its dense weight plus what merging (or unmerging) its active/merged deltas adds}, fp32
    (for the quantized linear geometry, whose dense 2-D weight is in its stored layout)."""
    targets = {}
    for _, layer in dt.adapters.delta_layers(model):
        names = layer.active if which == "merge_delta" else layer.merged
        w = layer.geometry.base_weight(layer).float()
        for n in names:
            w = w + getattr(layer.deltas[n], which)(layer)
        targets[layer] = w
    return targets


def _check_requantized(model, targets):
    """Each 4-bit layer holds its target weight up to the requantization error it recorded."""
    for layer, target in targets.items():
        err = (layer.geometry.base_weight(layer).float() - target).abs().max().item()
        assert layer.merge_error is not None and err <= layer.merge_error["max_abs"] * (1 + 1e-4) + 1e-7, err


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", LAYERS)
def test_contract(layer, method, path, tmp_path):
    model, make_input, cfg = _build(layer, method)
    if not _supported(model, cfg):  # the contract for what a method cannot wrap: a clear error
        with pytest.raises(ValueError, match="cannot wrap"):
            dt.add_adapter(model, cfg)
        assert not any(isinstance(m, DeltaLayer) for m in model.modules()) and not dt.list_adapters(model)
        return
    quantized = layer == "quant_linear"
    g = torch.Generator().manual_seed(1)
    x = make_input(g)
    base = copy.deepcopy(model)
    base_keys = list(model.state_dict().keys())
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_flags = [p.requires_grad for p in model.parameters()]
    y_base = base(x)
    # PiSSA's residual in a 4-bit base is requantized: identity at init holds to 4-bit precision there
    tol = 1e-5 if method != "pissa" else 1e-4
    tol = 0.1 * y_base.abs().max().item() if quantized and method == "pissa" else tol

    dt.add_adapter(model, cfg)
    if path == "fused":
        enable_fast_path(model)
        # the fused path takes every layer it has kernels for (the dense and 4-bit linear geometries)
        assert all((m.forward_impl is not None) == (m.fused_weight() is not None)
                   for _, m in dt.adapters.delta_layers(model))
    assert any(isinstance(m, DeltaLayer) for m in model.modules())
    assert all(isinstance(m, dt.AdapterModule) for _, m in dt.adapter_modules(model))
    # the base weights keep their names; only adapter keys are new
    assert all(k in model.state_dict() for k in base_keys)
    # at init the output equals the base model's (PiSSA moves the top-r part of W into B @ A)
    torch.testing.assert_close(model(x), y_base, atol=tol, rtol=tol)

    # only adapter parameters are trainable and get gradients
    trainable = {id(p) for p in dt.adapter_params(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    # on a 4-bit base: a delta small beside W, as trained ones are (LoHa's is a product of four factors)
    _perturb(model, (0.2 if method in ("loha", "lokr") else 0.03) if quantized else 0.3)
    model(x).float().pow(2).sum().backward()
    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        y_adapted = model(x)
        assert not torch.allclose(y_adapted, y_base, atol=1e-4)
        with dt.disabled(model):
            torch.testing.assert_close(model(x), y_base, atol=tol, rtol=tol)
        weights_before = {k: v.clone() for k, v in model.state_dict().items()}
        if not getattr(method_for(cfg), "mergeable", True):  # non-linear (bottleneck): refused, nothing changes
            with pytest.raises(ValueError, match="cannot be merged"):
                dt.merge(model)
            assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
        else:
            targets = _weight_targets(model, "merge_delta") if quantized else None
            dt.merge(model)
            y_merged = model(x)
            weights_merged = {k: v.clone() for k, v in model.state_dict().items()}
            for _ in range(2):  # merge is idempotent
                dt.merge(model)
            assert all(torch.equal(v, weights_merged[k]) for k, v in model.state_dict().items())
            if quantized:  # a merge into a 4-bit base requantizes W + delta and records what that lost
                _check_requantized(model, targets)
            else:
                torch.testing.assert_close(y_merged, y_adapted, atol=1e-4, rtol=1e-4)
                with dt.disabled(model):  # disabled() takes merged adapters out meanwhile
                    torch.testing.assert_close(model(x), y_base, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(model(x), y_merged)
            targets = _weight_targets(model, "unmerge_delta") if quantized else None
            dt.unmerge(model)
            dt.unmerge(model)
            if quantized:
                _check_requantized(model, targets)
            else:  # merge + unmerge restores W
                for k, v in model.state_dict().items():
                    torch.testing.assert_close(v, weights_before[k], atol=1e-5, rtol=1e-5)

    # save/load round trip: into a fresh copy of the base, the same outputs
    dt.save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, tmp_path / "adapter", name="loaded")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_adapted, atol=max(tol, 1e-5), rtol=1e-4)

    if path == "fused":
        disable_fast_path(model)
    dt.remove_adapter(model, "default")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert list(model.state_dict().keys()) == base_keys
    if not quantized:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, base_state[k], atol=1e-5, rtol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == base_flags
    if not quantized:
        torch.testing.assert_close(model(x), y_base, atol=tol, rtol=tol)


@pytest.mark.parametrize("layer", LAYERS)
def test_short_training_lowers_loss(layer):
    model, make_input, cfg = _build(layer, "lora")
    g = torch.Generator().manual_seed(3)
    x = make_input(g)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=g)
    dt.add_adapter(model, cfg.replace(r=4))
    opt = torch.optim.AdamW(dt.adapter_params(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_adding_the_same_name_twice_raises():
    model, _, cfg = _build("linear", "lora")
    dt.add_adapter(model, cfg)
    with pytest.raises(ValueError, match="already exists"):
        dt.add_adapter(model, cfg)


def test_many_adapters_switch_sum_and_remove():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 5))  # one linear layer: adapter outputs add up exactly
    cfg = dt.LoraConfig(r=2, alpha=4, targets=["0"])
    x = torch.randn(4, 3, 12)
    base_out = model(x)
    dt.add_adapter(model, cfg, name="a")
    dt.add_adapter(model, cfg.replace(r=3, alpha=3), name="b")
    _perturb(model)
    assert dt.list_adapters(model).keys() == {"a", "b"}
    with torch.no_grad():
        dt.set_active(model, "a")
        ya = model(x) - base_out
        dt.set_active(model, "b")
        yb = model(x) - base_out
        dt.set_active(model, ["a", "b"])
        torch.testing.assert_close(model(x) - base_out, ya + yb, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError):
        dt.set_active(model, "nope")
    # adding "b" froze nothing of "a": both adapters stay trainable
    assert all(p.requires_grad for p in dt.adapter_params(model, "a"))
    dt.remove_adapter(model, "a")
    dt.set_active(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(x) - base_out, yb, atol=1e-5, rtol=1e-5)
    dt.remove_adapter(model, "b")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "embedding", "gpt2_conv1d", "linear"])
def test_combine_is_exact_and_truncation_reports_error(layer):
    model, make_input, cfg = _build(layer, "lora")
    model = nn.Sequential(model[0] if isinstance(model, nn.Sequential) else model.tok)  # one layer: deltas add
    cfg = cfg.replace(targets=["0"])
    x = make_input(torch.Generator().manual_seed(0))
    dt.add_adapter(model, cfg, name="a")
    dt.add_adapter(model, cfg.replace(r=3, alpha=6, use_rslora=True), name="b")
    _perturb(model)
    with torch.no_grad():
        with dt.disabled(model):
            base_out = model(x)
        dt.set_active(model, "a")
        da = model(x) - base_out
        dt.set_active(model, "b")
        db = model(x) - base_out
        report = dt.combine(model, {"a": 0.7, "b": 0.3}, name="ab")
        assert all(err == 0.0 for err in report.values())
        dt.set_active(model, "ab")
        torch.testing.assert_close(model(x) - base_out, 0.7 * da + 0.3 * db, atol=1e-5, rtol=1e-4)
        report = dt.combine(model, {"a": 0.7, "b": 0.3}, name="ab1", rank=1)
        assert all(0.0 < err < 1.0 for err in report.values()), report
        layer0 = next(m for m in model.modules() if isinstance(m, DeltaLayer))
        assert layer0.deltas["ab1"].rank == 1


def test_targeting_suffix_regex_exclude_patterns_and_all_linear():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    names = dt.adapters.select_targets(model, dt.LoraConfig(targets="all-linear"))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    names = dt.adapters.select_targets(model, dt.LoraConfig(targets=["q_proj", "v_proj"], exclude=r".*\.1\..*"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    names = dt.adapters.select_targets(model, dt.LoraConfig(targets=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    dt.add_adapter(model, dt.LoraConfig(r=4, targets=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                                        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 16}))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.deltas["default"].rank == 4 and q0.deltas["default"].alpha == 16 and q1.deltas["default"].alpha == 8
    assert model.model.layers[1].mlp.down_proj.deltas["default"].rank == 2
    with pytest.raises(ValueError, match="no module"):
        dt.add_adapter(model, dt.LoraConfig(targets=["nonexistent_proj"]), name="x")
    with pytest.raises(ValueError, match="cannot wrap"):
        dt.add_adapter(model, dt.LoraConfig(targets=["input_layernorm"]), name="y")


def test_modules_to_save_trains_a_copy_and_keeps_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    keys = list(model.state_dict())
    head_before = model[2].weight.clone()
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0"], modules_to_save=["2"]))
    assert "2.weight" in model.state_dict() and "2.copies.default.weight" in model.state_dict()
    opt = torch.optim.SGD(dt.adapter_params(model), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert torch.equal(model[2].weight, head_before)  # the original head is untouched
    assert not torch.equal(model[2].copies["default"].weight, head_before)
    with torch.no_grad(), dt.disabled(model):
        y_disabled = model(x)
    dt.remove_adapter(model, "default")
    assert list(model.state_dict()) == keys and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), y_disabled)


def test_module_moves_with_to_and_restores_after():
    model = nn.Sequential(nn.Linear(4, 4))
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0"]))
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[0].deltas["default"].A.dtype == torch.float64
    assert model(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    dt.remove_adapter(model, "default")
    assert model[0].weight.dtype == torch.float64


def test_second_adapter_with_modules_to_save_loads_beside_the_first(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0"], modules_to_save=["1"], init="random"), name="a")
    dt.save_adapter(model, tmp_path / "a", name="a")
    dt.load_adapter(model, tmp_path / "a", name="b")  # the head is already wrapped by "a"
    x = torch.randn(3, 4)
    with torch.no_grad():
        y_b = model(x)
        dt.set_active(model, "a")
        torch.testing.assert_close(model(x), y_b)


def test_the_per_type_adapter_filter_names_every_method_of_the_protocol():
    """adapter_modules() skips types lacking the protocol's methods before the slow isinstance check;
    the filter's list must be the protocol's own callable members, or it would drop adapter modules."""
    import typing

    from deltatune.adapters import protocol

    members = typing._get_protocol_attrs(protocol.AdapterModule)
    methods = {m for m in members if callable(getattr(protocol.AdapterModule, m, None))}
    assert methods == set(protocol._METHODS)
    assert not protocol._may_be_adapter(torch.nn.Linear)
