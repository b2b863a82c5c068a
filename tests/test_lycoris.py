"""LoHa and LoKr against PEFT where UNets and GPT-2 use them: Conv2d (3x3, grouped, 1x1) and Conv1d, flat
and in PEFT's ``use_effective_conv2d`` (CP) form, and GPT-2's ``Conv1D`` layers, both directions, equal
outputs (fp32, <= 1e-5). PEFT cannot wrap ``Conv1D`` for these methods, so its side runs on the same
GPT-2 with each ``Conv1D`` turned into the equivalent ``nn.Linear`` (same module paths, same file keys)."""

import copy

import pytest
import torch
import torch.nn as nn

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5


class ConvMix(nn.Module):
    """The convolution shapes a UNet has, and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 24, 3, padding=1)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=2)
        self.point = nn.Conv2d(24, 12, 1)
        self.seq = nn.Conv1d(12, 20, 3)

    def forward(self, pixel_values):  # (B, 4, 5, 5)
        h = torch.relu(self.grouped(torch.relu(self.conv(pixel_values))))
        return self.seq(self.point(h).flatten(2))  # (B, 12, 25) -> (B, 20, 23)


def gpt2_as_linear(model):
    """``model`` with every GPT-2 ``Conv1D`` (y = x @ W + b, W (in, out)) replaced by the same ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(*module.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, linear)
    return model


CONV_TARGETS = ["conv", "grouped", "point", "seq"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
CASES = {  # name: (PEFT config class, our config class, model name, fields both take)
    "loha-conv": ("LoHa", "convnet", dict(r=2, alpha=3, rank_pattern={"seq": 3})),
    "loha-conv-cp": ("LoHa", "convnet", dict(r=2, alpha=3, use_effective_conv2d=True)),
    "lokr-conv": ("LoKr", "convnet", dict(r=2, alpha=3, rank_pattern={"conv": 1, "seq": 3}, decompose_both=True)),
    "lokr-conv-cp": ("LoKr", "convnet", dict(r=2, alpha=3, use_effective_conv2d=True)),
    "loha-gpt2": ("LoHa", "gpt2", dict(r=2, alpha=3)),
    "lokr-gpt2": ("LoKr", "gpt2", dict(r=1, alpha=3, decompose_both=True)),
}


def _bases(model_name):
    """(our base, PEFT's base, targets, inputs): the same weights; PEFT's GPT-2 has Linear layers."""
    torch.manual_seed(0)
    if model_name == "convnet":
        base = ConvMix().eval()
        g = torch.Generator().manual_seed(0)
        return base, copy.deepcopy(base), CONV_TARGETS, {"pixel_values": torch.randn(2, 4, 5, 5, generator=g)}
    base = _models.gpt2().eval()
    return base, gpt2_as_linear(copy.deepcopy(base)), GPT2_TARGETS, _models.inputs("gpt2")


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _configs(case):
    kind, _, fields = CASES[case]
    return getattr(peft, f"{kind}Config"), getattr(dt, f"{kind}Config"), fields


@pytest.mark.parametrize("case", CASES)
def test_peft_made_adapter_loads_with_equal_outputs(case, tmp_path):
    peft_config, _, fields = _configs(case)
    ours_base, their_base, targets, x = _bases(CASES[case][1])
    theirs = peft.get_peft_model(their_base, peft_config(target_modules=targets, **fields))
    _randomise([p for n, p in theirs.named_parameters() if "hada_" in n or "lokr_" in n])
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(ours_base), tmp_path / "peft")
    expected = _models.output(theirs, x)
    assert (_models.output(ours, x) - expected).abs().max() <= TOL
    assert (_models.output(ours_base, x) - expected).abs().max() > 10 * TOL  # the adapter does change the output
    dt.merge(ours)
    assert (_models.output(ours, x) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_into_peft_with_equal_outputs(case, tmp_path):
    _, our_config, fields = _configs(case)
    ours_base, their_base, targets, x = _bases(CASES[case][1])
    ours = dt.add_adapter(copy.deepcopy(ours_base), our_config(targets=targets, **fields))
    _randomise(dt.adapter_params(ours))
    dt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(their_base, tmp_path / "ours")
    expected = _models.output(ours, x)
    assert (_models.output(theirs, x) - expected).abs().max() <= TOL
    assert (_models.output(ours_base, x) - expected).abs().max() > 10 * TOL


def test_conv_forms_are_the_ones_peft_builds():
    """Each case above exercises the factor layouts it names (PEFT's tensor shapes, ours the same)."""
    for case, expected in {
        "loha-conv-cp": {"conv": "t1", "point": None, "seq": "t1"},  # 1x1 stays flat; Conv1d has a (r, r, k, 1) core
        "lokr-conv": {"conv": "w1_a", "point": "w2_a", "seq": "w2"},  # seq: a full (5, 4, 3) W2 (kron of 2-D and 3-D)
        "lokr-conv-cp": {"conv": "t2", "point": None, "seq": "t2"},
    }.items():
        _, our_config, fields = _configs(case)
        model = dt.add_adapter(ConvMix(), our_config(targets=CONV_TARGETS, **fields))
        for name, role in expected.items():
            roles = getattr(model, name).deltas["default"].roles()
            assert (role in roles) if role else not ({"t1", "t2"} & set(roles)), (case, name, sorted(roles))
    seq = dt.add_adapter(ConvMix(), dt.LoKrConfig(r=3, targets=["seq"])).seq.deltas["default"]
    assert tuple(seq.w2.shape) == (5, 4, 3)
    # rank 1 on a Conv1d in the CP form: the (k, n, 3, 1) product has a size-1 dim that einsum strides oddly
    model = dt.add_adapter(ConvMix(), dt.LoKrConfig(r=1, targets=["seq"], use_effective_conv2d=True, init_weights=False))
    assert model(torch.randn(1, 4, 5, 5)).shape == (1, 20, 23)


def test_cp_float64_reference_and_identity_at_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y0 = model(x).detach()
    dt.add_adapter(model, dt.LoHaConfig(r=2, alpha=3, targets=["0"], use_effective_conv2d=True, dtype=None))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0)  # W2b = 0 at init
    _randomise(dt.adapter_params(model))
    d = model[0].deltas["default"]
    # pair i: ΔW_i[o, c, h, w] = sum_ab Wa[a, o] Wb[b, c] T[a, b, h, w]  (LyCORIS' CP rebuild)
    pairs = [torch.einsum("ao,bc,abhw->ochw", wa, wb, t) for wa, wb, t in ((d.w1_a, d.w1_b, d.t1), (d.w2_a, d.w2_b, d.t2))]
    weight = model[0].weight + 1.5 * pairs[0] * pairs[1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.conv2d(x, weight, model[0].bias), atol=1e-12, rtol=1e-12)


def test_cp_form_refused_on_conv3d():
    for config in (dt.LoHaConfig, dt.LoKrConfig):  # LoKr: out 8 = 2 x 4, rank 1 < 4 / 2 decomposes W2
        with pytest.raises(ValueError, match="0: use_effective_conv2d takes Conv1d/Conv2d kernels"):
            dt.add_adapter(nn.Sequential(nn.Conv3d(2, 8, 3)), config(r=1, targets=["0"], use_effective_conv2d=True))
