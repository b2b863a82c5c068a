"""deltatune.quant against bitsandbytes (the oracle; it quantizes on CPU) and its own invariants.

Parity: packed codes, absmax (plain and double-quantized) and dequantized values equal bitsandbytes'
byte for byte, over nf4/fp4, double quant on/off, blocksizes 32-4096, ragged shapes, three input
dtypes and adversarial values. bitsandbytes' CPU dequantizer treats every row of a 2-D tensor as
starting a new block (a bug: its own quantizer and its CUDA kernels block the flattened tensor), so
its dequantization is taken over the flattened shape, which is the format's meaning.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.quant import nf4
from deltatune.quant.int8 import quantize_int8

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle for the 4-bit format")


@pytest.fixture(autouse=True)
def _eager_bnb():
    # bitsandbytes' pure-PyTorch fallbacks are wrapped in torch.compile; eager keeps the tests fast.
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def bnb_quantize(x, kind, blocksize, dq):
    return bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=kind, compress_statistics=dq)


def bnb_dequantize(packed, state):
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])  # see the module docstring
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def assert_same_as_bnb(x, kind, blocksize, dq):
    packed, state = bnb_quantize(x, kind, blocksize, dq)
    q = dt.quant.quantize(x, kind=kind, blocksize=blocksize, double_quant=dq)
    where = f"{kind} bs={blocksize} dq={dq} {x.dtype} {tuple(x.shape)}"
    assert q.packed.dtype == torch.uint8 and q.packed.shape == packed.shape, where
    assert torch.equal(q.packed, packed), f"packed codes differ: {where}"
    assert torch.equal(q.absmax, state.absmax), f"absmax differs: {where}"
    if dq:
        assert torch.equal(q.nested_absmax, state.state2.absmax), where
        assert torch.equal(q.offset, state.offset), where
    ours, theirs = q.dequantize(), bnb_dequantize(packed, state)
    assert ours.dtype == theirs.dtype == x.dtype and ours.shape == x.shape
    assert torch.equal(ours, theirs), f"dequantized values differ: {where}"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # any output dtype, not just the input's
        assert torch.equal(q.dequantize(dtype), bnb_dequantize(packed, _with_dtype(state, dtype))), where
    return q


def _with_dtype(state, dtype):
    s = copy.copy(state)
    s.dtype = dtype
    return s


def test_code_tables_match_bitsandbytes():
    for kind in ("nf4", "fp4"):
        assert torch.equal(nf4.code_table(kind), bnbf.get_4bit_type(kind, device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(nf4.dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_parity_with_bitsandbytes(kind, dq):
    g = torch.Generator().manual_seed(0)
    cases = [(32, (48, 40)), (64, (33, 17)), (64, (5,)), (128, (3, 4097)), (256, (64, 96)),
             (1024, (7, 300)), (4096, (3, 4100))]  # most shapes ragged against their blocksize
    for blocksize, shape in cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            assert_same_as_bnb(x, kind, blocksize, dq)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_parity_on_adversarial_values(kind):
    g = torch.Generator().manual_seed(1)
    code = nf4.code_table(kind)
    s = code.sort().values
    midpoints = ((s[:-1] + s[1:]) / 2)
    ties = torch.cat([torch.tensor([1.0, -1.0]), midpoints, -midpoints])  # absmax 1: scaled == value exactly
    blocks = [
        torch.zeros(64),                                    # all-zero block
        torch.cat([ties, torch.zeros(64 - ties.numel())]),  # exact ties between codes
        torch.randn(64, generator=g) * 1e30,                # huge
        torch.randn(64, generator=g) * 1e-30,               # tiny
        torch.randn(64, generator=g) * 1e-41,               # fp32 subnormals
        torch.tensor([3.0] * 64),                           # constant block
        torch.randn(64, generator=g).clamp(min=0),          # one-signed with zeros
    ]
    x = torch.cat(blocks)
    for dq in (False, True):
        assert_same_as_bnb(x, kind, 64, dq)
        assert_same_as_bnb(x[:-7], kind, 64, dq)  # ragged last block
        assert_same_as_bnb(torch.zeros(130), kind, 64, dq)
        assert_same_as_bnb(torch.tensor([6.0e4, -1e-7, 0.0, 1.0] * 16).to(torch.float16), kind, 64, dq)
        assert_same_as_bnb((torch.randn(64, generator=g) * 1e36).to(torch.bfloat16), kind, 32, dq)
    q = dt.quant.quantize(torch.zeros(64, 64), kind=kind)
    assert torch.equal(q.dequantize(), torch.zeros(64, 64))


def test_8bit_blockwise_parity_with_bitsandbytes():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (256 * 9, 256 * 9 + 13, 7):
            x = (torch.randn(n, generator=g) * 10.0 ** torch.randint(-4, 3, (n,), generator=g)).to(dtype)
            x[:256] = 0  # a zero block
            codes, absmax = nf4.quantize_blockwise_8bit(x, 256)
            ref_codes, state = bnbf.quantize_blockwise(x, blocksize=256)
            assert torch.equal(codes, ref_codes) and torch.equal(absmax, state.absmax)
            ref = bnbf.dequantize_blockwise(ref_codes, _with_dtype(state, torch.float32))
            assert torch.equal(nf4.dequantize_blockwise_8bit(codes, absmax, 256), ref)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_error_is_within_half_a_code_gap(kind):
    # Independent of bitsandbytes: nearest-code rounding can miss by at most half the widest gap.
    x = torch.randn(4096, 33, dtype=torch.float64).float() * 3
    q = dt.quant.quantize(x, kind=kind, blocksize=64)
    code = nf4.code_table(kind).sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    flat = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % 64)).view(-1, 64)
    bound = (flat.abs().amax(1, keepdim=True) * half_gap * (1 + 1e-6)).expand_as(flat).reshape(-1)[: x.numel()]
    err = (q.dequantize().reshape(-1) - x.reshape(-1)).abs()
    assert (err <= bound).all()
    assert q.nbytes < x.numel() * 0.6  # 4 bits + one fp32 absmax per 64 values


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        dt.quant.quantize(torch.randn(64), kind="nf4", blocksize=48)
    with pytest.raises(ValueError, match="kind"):
        dt.quant.quantize(torch.randn(64), kind="nf3")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        dt.quant.quantize(torch.ones(64, dtype=torch.int32))


# -- int8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [None, 64, 100])
def test_int8_round_trip_error_bound(blocksize):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 129, generator=g) * torch.logspace(-3, 1, 37)[:, None] + 0.5  # rows of very different ranges
    w[3] = 0.0
    w[5] = 2.0  # constant row: range widened to include 0
    q = dt.quant.quantize(w, kind="int8", blocksize=blocksize)
    assert q.packed.dtype == torch.int8
    back = q.dequantize()
    groups = w.reshape(w.shape[0], -1) if blocksize is None else torch.nn.functional.pad(
        w.reshape(-1), (0, -w.numel() % blocksize)).view(-1, blocksize)
    scale = (groups.amax(1).clamp(min=0) - groups.amin(1).clamp(max=0)) / 255
    per_value = scale[:, None].expand_as(groups).reshape(-1)[: w.numel()].view(w.shape)
    assert ((back - w).abs() <= per_value / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(back[w == 0], torch.zeros_like(back[w == 0]))  # zero is exact
    assert (back - w).abs().max() > 0  # it does quantize


def test_int8_per_channel_needs_a_matrix():
    with pytest.raises(ValueError, match="per-channel"):
        quantize_int8(torch.randn(10))


# -- Triton ----------------------------------------------------------------------------------------
TRITON_CHECK = textwrap.dedent("""
    import torch
    from deltatune.quant import nf4, triton_dequant
    g = torch.Generator().manual_seed(4)
    bad = []
    for kind in ("nf4", "fp4"):
        for dq in (False, True):
            # odd sizes take the per-element kernel, even ones with 16-bit output the blocks kernel (into
            # strided outputs too where rows are whole blocks, else the byte-pair kernel); each forced too;
            # ragged last blocks, several programs (8192 columns: two programs a row of the strided pair
            # kernel and of the strided blocks kernel; 40x512 at 32: three of blocks)
            for shape, bs in (((37, 29), 32), ((6, 37), 32), ((9, 130), 64), ((3, 700), 256), ((2, 4100), 4096),
                              ((5, 128), 64), ((3, 96), 32), ((2, 8192), 64), ((3, 4096), 4096), ((40, 512), 32)):
                x = (torch.randn(shape, generator=g) * 0.1).to(DEVICE)
                x.view(-1)[:64] = 0
                q = nf4.quantize_4bit(x, kind, bs, dq)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    ref = nf4.dequantize_4bit(q, dtype)
                    kernels = [None] if dtype == torch.float32 or x.numel() % 2 else [None, "blocks", "pairs", "element"]
                    for kernel in kernels:
                        got = triton_dequant.dequantize_4bit(q, dtype, kernel=kernel)
                        if not torch.equal(got, ref):
                            bad.append((kind, dq, shape, bs, str(dtype), kernel))
                    if dtype != torch.float32 and shape[1] % 2 == 0:  # into the left columns of a wider matrix
                        for kernel in [None, "pairs"] + (["blocks"] if shape[1] % bs == 0 else []):
                            wide = torch.full((shape[0], shape[1] + 6), 7.0, dtype=dtype, device=DEVICE)
                            triton_dequant.dequantize_4bit(q, dtype, out=wide[:, :shape[1]], kernel=kernel)
                            if not (torch.equal(wide[:, :shape[1]], ref) and bool((wide[:, shape[1]:] == 7).all())):
                                bad.append((kind, dq, shape, bs, str(dtype), "strided", kernel))
    print("BAD", bad)
""")


def test_triton_dequant_equals_reference_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "DEVICE = 'cpu'\n" + TRITON_CHECK
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BAD []" in out.stdout, out.stdout[-3000:]


def test_triton_dequant_kernel_choice_errors():
    """A forced kernel that does not apply, or an unknown one, is refused before any launch."""
    pytest.importorskip("triton")
    from deltatune.quant import triton_dequant

    q = nf4.quantize_4bit(torch.randn(8, 96), "nf4", 64)  # rows of 1.5 blocks
    wide = torch.zeros(8, 100, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="blocks kernel does not apply.*strided"):
        triton_dequant.dequantize_4bit(q, torch.bfloat16, out=wide[:, :96], kernel="blocks")
    with pytest.raises(ValueError, match="pairs kernel does not apply"):
        triton_dequant.dequantize_4bit(q, torch.float32, kernel="pairs")
    with pytest.raises(ValueError, match="kernel must be one of"):
        triton_dequant.dequantize_4bit(q, torch.bfloat16, kernel="fused")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_dequant_equals_reference_on_gpu():
    pytest.importorskip("triton")
    scope = {"DEVICE": "cuda"}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(TRITON_CHECK, scope)
    assert "BAD []" in buf.getvalue(), buf.getvalue()


# -- QuantLinear, quantize_model, LoRA on top ------------------------------------------------------
class Tiny(nn.Module):
    """Two linear blocks with a norm, an embedding and an output head (tied like many LMs)."""

    def __init__(self, vocab=50, dim=64, hidden=96):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.lm_head(self.norm(h))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantize_model_and_lora_contract(kind):
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 50, (3, 11))
    up_weight = model.up.weight.detach().clone()
    dt.quantize_model(model, kind=kind, blocksize=None if kind == "int8" else 64)
    assert isinstance(model.up, dt.quant.QuantLinear) and isinstance(model.down, dt.quant.QuantLinear)
    assert type(model.lm_head) is nn.Linear and type(model.norm) is nn.LayerNorm  # head and norm kept
    # the quantized layer computes F.linear with the dequantized weight
    x = torch.randn(4, 64)
    w = model.up.dequantize()
    assert 0 < (w - up_weight).abs().max() < 0.1
    torch.testing.assert_close(model.up(x), torch.nn.functional.linear(x, w, model.up.bias))
    base = model(ids)

    dt.add_adapter(model, dt.LoraConfig(r=4, targets="all-linear"))
    assert isinstance(model.up, dt.DeltaLayer) and isinstance(model.up.geometry, dt.quant.QuantLinearGeometry)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model(ids), base)  # B = 0 at init
    loss = model(ids).float().pow(2).mean()
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    # merging into the quantized base: dequantize-add-requantize, error recorded and small
    with torch.no_grad():
        for p in dt.adapter_params(model):
            p.normal_(0, 0.05)
    adapted = model(ids).detach()
    dt.merge(model)
    errors = dt.quant.merge_errors(model)
    assert set(errors) == {"up", "down"} and all(e["rel_fro"] < 0.2 for e in errors.values())
    assert all(e["delta_fro"] > 0 for e in errors.values())
    merged = model(ids).detach()
    assert (merged - adapted).abs().max() < 0.25 * adapted.abs().max()
    dt.unmerge(model)

    # exporting merged dense weights is exact up to fp32 rounding
    exported = dt.quant.export_merged(copy.deepcopy(model), dtype=torch.float32)
    assert type(exported.up) is nn.Linear and exported.up.weight.dtype == torch.float32
    torch.testing.assert_close(exported(ids), model(ids).detach(), atol=1e-5, rtol=1e-5)

    dt.remove_adapter(model, "default")
    assert isinstance(model.up, dt.quant.QuantLinear)


def test_quant_linear_backward_matches_dense_weight():
    torch.manual_seed(0)
    linear = nn.Linear(70, 130)
    q = dt.quant.QuantLinear.from_linear(linear, "nf4", 64, True)
    x = torch.randn(5, 70, requires_grad=True)
    q(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, q.dequantize(), q.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_quant_linear_state_dict_round_trip():
    torch.manual_seed(0)
    a = dt.quant.QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, True)
    b = dt.quant.QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, True)
    assert set(a.state_dict()) == {"packed", "absmax", "nested_absmax", "offset", "bias"}
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())


# -- transformers' bitsandbytes checkpoints ---------------------------------------------------------
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_load_checkpoint_saved_by_transformers_bitsandbytes(tmp_path):
    transformers = pytest.importorskip("transformers")
    _tiny_llama().save_pretrained(tmp_path / "base")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        bnb_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=cfg,
                                                                      device_map="cpu")
    except Exception as e:  # pragma: no cover - depends on the installed transformers/bitsandbytes
        pytest.skip(f"transformers cannot load bitsandbytes 4-bit on CPU here: {e}")
    bnb_model.save_pretrained(tmp_path / "q")

    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state

    ours = dt.quant.hf_bnb.from_pretrained_bnb(tmp_path / "q", compute_dtype=torch.bfloat16)
    proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(proj, dt.quant.QuantLinear) and proj.double_quant
    ref = bnb_model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(proj.dequantize(torch.bfloat16), bnb_dequantize(ref.data, ref.quant_state))
    # and our own quantizer reproduces the stored bytes from the bf16 base weights
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    for key in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        q = dt.quant.quantize(base[key], kind="nf4", blocksize=64, double_quant=True)
        assert torch.equal(q.packed, state[key]) and torch.equal(q.absmax, state[key + ".absmax"])
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), bnb_model(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("kind,dq,storage", [("fp4", False, torch.uint8), ("nf4", True, torch.bfloat16)])
def test_load_keys_from_quant_state_as_dict(kind, dq, storage):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(48, 80, generator=g) * 0.05).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=dq, quant_storage=storage)
    keys = {"proj.weight": packed, "proj.bias": torch.randn(48).to(torch.bfloat16)}
    keys.update({f"proj.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(80, 48, dtype=torch.bfloat16))
    dt.quant.load_bnb_4bit(model, keys)
    assert isinstance(model.proj, dt.quant.QuantLinear) and model.proj.quant_kind == kind
    assert torch.equal(model.proj.dequantize(), bnb_dequantize(packed.view(torch.uint8), state))
    assert torch.equal(model.proj.bias, keys["proj.bias"])

    bad = dict(keys)
    bad["proj.weight.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="quant_map"):
        dt.quant.load_bnb_4bit(nn.Sequential(nn.Linear(80, 48)), {k.replace("proj", "0"): v for k, v in bad.items()})
    meta = json.loads(bytes(keys[f"proj.weight.quant_state.bitsandbytes__{kind}"].tolist()))
    assert meta["shape"] == [48, 80]
