"""DoRA on the fused training path against the plain DoRA path and float64, on CPU.

The fused path takes DoRA as LoRA's fused projection plus an output scale ``f = m / ||W + s·BA||_c``
(``methods/dora.py``, ``kernels/output_scale.py``). Checked here: the norm's formula against the direct
float64 norm (dense and 4-bit bases, and after the base changes); the scaled nodes by gradcheck; a tiny
Llama with DoRA on every linear layer, loss and every trainable gradient equal to the plain path's in
fp32 (dense and 4-bit base, with and without checkpointing), bf16 about as accurate as the plain path
against float64; merged/unmerged semantics; the Triton kernels under ``TRITON_INTERPRET=1``; a GPU test.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import deltatune as dt
from deltatune.fast import disable_fast_path, enable_fast_path, fused_causal_lm_loss
from deltatune.kernels import lora_group, lora_mlp

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _scale_magnitudes(model, seed=1):
    """Move each magnitude away from its initial norm (else DoRA starts as plain LoRA: f = 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.adapter_params(model, role="magnitude"):
            p.mul_((1.0 + 0.3 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))


def tiny_llama(dtype=torch.float32, quant=None, device="cpu", seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
                                   max_position_embeddings=128, attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if quant:
        from deltatune.quant import quantize_model

        quantize_model(model, kind=quant, blocksize=64, compute_dtype=dtype)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init="random", use_dora=True))
    _scale_magnitudes(model)
    return model


def loss_and_grads(model, ids, fast, **kw):
    for p in dt.adapter_params(model):
        p.grad = None
    if fast:
        enable_fast_path(model, **kw)
        loss = fused_causal_lm_loss(model, ids, ids)
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if fast:
        disable_fast_path(model)
    return loss.detach().double(), [p.grad.double() for p in dt.adapter_params(model)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def scaled_nodes(monkeypatch):
    """Counts of the fused DoRA nodes that ran (so a silent fallback to the plain forward fails)."""
    import deltatune.kernels.lora as fused

    import types

    counts = {"scale": 0, "swiglu": 0}

    def counted(cls, key):
        def apply(*args):
            counts[key] += 1
            return cls.apply(*args)
        return types.SimpleNamespace(apply=apply)

    for name, key in (("ScaleOutput", "scale"), ("ScaledSwiGLU", "swiglu")):
        monkeypatch.setattr(fused, name, counted(getattr(fused, name), key))
    return counts


# -- the norm -----------------------------------------------------------------------------------------------
def _direct_norm(layer):
    """``||W + s·BA||`` per output row in float64, from the weight as the plain path sees it."""
    delta = layer.deltas["default"]
    W = layer.geometry.base_weight(layer).double()
    return (W + delta.lora.scale * (delta.lora.B.double() @ delta.lora.A.double())).norm(dim=1)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_norm_formula_equals_float64_direct_norm(quant):
    model = tiny_llama(quant=quant, layers=1)
    layers = [m for _, m in dt.adapters.delta_layers(model)]
    assert len(layers) == 7
    for layer in layers:
        delta = layer.deltas["default"]
        with torch.no_grad():
            delta.lora.B.normal_(std=0.5)  # a sizeable s·BA: the cross and square terms matter
        got = delta.fused_norm(layer)
        want = _direct_norm(layer)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.max().item()
        w_only = layer.geometry.base_weight(layer).double().norm(dim=1)
        assert (want - w_only).abs().max().item() > 1e-2  # B is not zero: the formula's other terms count
    # f = m / norm gets m's gradient only
    f = delta.output_scale(layer)
    f.sum().backward()
    assert torch.allclose(delta.magnitude.grad, 1 / got) and delta.lora.B.grad is None


def test_norm_cache_follows_the_base_weight():
    """||W_i||² is cached; a merge of another adapter, a load of new weights or a move recomputes it."""
    model = tiny_llama(layers=1)
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=2, targets=["q_proj"], init="random"), name="other")
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.deltas["default"]
    first = delta.fused_norm(layer)
    assert delta.__dict__["_wsq"][1] is delta._weight_norm_sq(layer)  # cached: the same tensor again
    layer.merge("other")  # W changes through .data (no version bump)
    assert (delta.fused_norm(layer).double() - _direct_norm(layer)).abs().max().item() <= 1e-5
    assert (delta.fused_norm(layer) - first).abs().max().item() > 1e-4
    layer.unmerge("other")
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place write to the weight itself
    assert (delta.fused_norm(layer).double() - _direct_norm(layer)).abs().max().item() <= 1e-5
    model.load_state_dict({k: v * 0.5 if k.endswith("q_proj.weight") else v for k, v in model.state_dict().items()})
    assert (delta.fused_norm(layer).double() - _direct_norm(layer)).abs().max().item() <= 1e-5
    assert (delta.fused_norm(copy.deepcopy(layer)).double() - _direct_norm(layer)).abs().max().item() <= 1e-5


# -- the scaled nodes ---------------------------------------------------------------------------------------
def _projection(out_f, in_f, rank, bias, scaled):
    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    a = torch.randn(rank, in_f, generator=g, dtype=torch.float64).requires_grad_()
    bb = torch.randn(out_f, rank, generator=g, dtype=torch.float64).requires_grad_()
    f = (1 + 0.3 * torch.randn(out_f, generator=g, dtype=torch.float64)).requires_grad_()
    return (w, b, [(a, bb, 0.5)], f) if scaled else (w, b, [(a, bb, 0.5)])


def _leaves(projs):
    return [t for p in projs for t in (p[1], *p[2][0][:2], *p[3:]) if t is not None]


def _reference(x, p):
    """``f ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b`` by autograd in float64."""
    w, b, [(a, bb, s)], *f = p
    z = x @ w.T + s * (x @ a.T) @ bb.T
    y = z * f[0] if f else z
    return y + b if b is not None else y


def test_scaled_group_and_mlp_equal_float64_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    projs = [_projection(5, 6, 2, True, True), _projection(4, 6, 1, False, False), _projection(3, 6, 2, False, True)]
    leaves = [x] + _leaves(projs)
    assert torch.autograd.gradcheck(lambda *_: lora_group(x, projs), tuple(leaves))
    ys = lora_group(x, projs)
    for y, p in zip(ys, projs):
        assert (y - _reference(x, p)).abs().max().item() <= 1e-12
    gate, up, down = _projection(7, 6, 2, True, True), _projection(7, 6, 3, False, False), _projection(6, 7, 2, True, True)
    leaves = [x] + _leaves([gate, up, down])
    assert torch.autograd.gradcheck(lambda *_: lora_mlp(x, gate, up, down), tuple(leaves))
    g, u = _reference(x, gate), _reference(x, up)
    want = _reference(torch.nn.functional.silu(g) * u, down)
    assert (lora_mlp(x, gate, up, down) - want).abs().max().item() <= 1e-12
    up_scaled = (*up, torch.full((7,), 1.5, dtype=torch.float64))  # a scale on up alone
    assert (lora_mlp(x, gate, up_scaled, down) - _reference(torch.nn.functional.silu(g) * 1.5 * u, down)).abs().max() < 1e-12


# -- a tiny Llama -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant,checkpoint", [(None, False), (None, True), ("nf4", False), ("nf4", True)])
def test_fused_dora_equals_plain_dora_in_float32(quant, checkpoint, scaled_nodes):
    model = tiny_llama(quant=quant)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(3))
    plain_loss, plain_grads = loss_and_grads(model, ids, fast=False)
    assert scaled_nodes == {"scale": 0, "swiglu": 0}
    fast_loss, fast_grads = loss_and_grads(model, ids, fast=True, checkpoint=checkpoint)
    # per layer: q, k, v, o, down scaled outputs and one scaled SwiGLU (again when recomputed)
    runs = 2 if checkpoint else 1
    assert scaled_nodes == {"scale": 5 * 2 * runs, "swiglu": 2 * runs}
    assert abs(fast_loss - plain_loss) <= 1e-6 * plain_loss
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(fast_grads) == len(names) == 2 * 7 * 3  # A, B and m of every layer
    for name, f, p in zip(names, fast_grads, plain_grads):
        assert p.abs().max() > 0 and rel(f, p) <= 1e-4, name


def test_fused_dora_bfloat16_about_as_accurate_as_plain_path():
    model = tiny_llama(torch.bfloat16)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(4))
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model).double(), ids, fast=False)
    plain_loss, plain_grads = loss_and_grads(model, ids, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, ids, fast=True)
    assert abs(fast_loss - ref_loss) < 1e-2 * ref_loss
    fast_err = [rel(f, r) for f, r in zip(fast_grads, ref_grads)]
    plain_err = [rel(p, r) for p, r in zip(plain_grads, ref_grads)]
    assert sum(fast_err) <= 3 * sum(plain_err) + 1e-2 * len(fast_err), (fast_err, plain_err)
    assert max(fast_err) < 0.25, fast_err


def test_merged_unmerged_and_mixed_adapters_on_the_fused_path(scaled_nodes):
    """Merged DoRA: the fused path runs the merged base alone; unmerged again: DoRA's fused form. Beside
    another active adapter, or with dropout in training, the layer takes the plain forward (same output)."""
    model = tiny_llama()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        enable_fast_path(model)
        fused = model(input_ids=ids).logits
        assert scaled_nodes["scale"] > 0
        assert (fused - plain).abs().max().item() <= 1e-5
        dt.merge(model)
        scaled_nodes["scale"] = 0
        assert (model(input_ids=ids).logits - plain).abs().max().item() <= 1e-4
        assert scaled_nodes["scale"] == 0  # nothing left to scale: merged into W
        dt.unmerge(model)
        assert (model(input_ids=ids).logits - plain).abs().max().item() <= 1e-4
        assert scaled_nodes["scale"] > 0
        disable_fast_path(model)

    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=2, targets=["q_proj", "gate_proj"], init="random"), name="other")
    dt.adapters.set_active(model, ["default", "other"])
    with torch.no_grad():
        both = model(input_ids=ids).logits
        enable_fast_path(model)
        scaled_nodes["scale"] = scaled_nodes["swiglu"] = 0
        assert (model(input_ids=ids).logits - both).abs().max().item() <= 1e-5
        # per layer the others alone as fused layers: k, v, o, up, down; no fused MLP (gate is plain)
        assert scaled_nodes["scale"] == 2 * 5 and scaled_nodes["swiglu"] == 0
        disable_fast_path(model)

    dropped = tiny_llama(layers=1)
    for _, layer in dt.adapters.delta_layers(dropped):
        layer.deltas["default"].lora.dropout = 0.1
    dropped.train()
    torch.manual_seed(7)
    plain = dropped(input_ids=ids).logits
    enable_fast_path(dropped)
    torch.manual_seed(7)
    scaled_nodes["scale"] = 0
    assert (dropped(input_ids=ids).logits - plain).abs().max().item() <= 1e-5 and scaled_nodes["scale"] == 0


# -- Triton kernels interpreted, and the GPU ----------------------------------------------------------------
def check_fused_dora(device, dtype):
    """Fused DoRA on ``device`` in ``dtype`` (the kernels of this device) against the plain path and
    float64: relative errors of the loss and the mean gradient error."""
    model = tiny_llama(dtype, device=device, layers=1)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(6)).to(device)
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model).double(), ids, fast=False)
    out = {}
    for name, fast in (("plain", False), ("fast", True)):
        loss, grads = loss_and_grads(model, ids, fast=fast, checkpoint=True)
        out[f"{name}_loss"] = abs(loss - ref_loss).item() / abs(ref_loss).item()
        out[f"{name}_grads"] = sum(rel(g, r) for g, r in zip(grads, ref_grads)) / len(grads)
    return out


def check_dora_kernels(dtype, device="cpu"):
    """The scaled output's backward and the scaled SwiGLU alone (the Triton kernels where enabled) against
    float64 autograd, at sizes off the tiles and on column blocks of wider tensors: {name: rel error}."""
    from deltatune.kernels.output_scale import ScaledSwiGLU, ScaleOutput

    g = torch.Generator().manual_seed(8)
    n, i = 37, 150

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    wide = rand(n, 2 * i + 3)
    zg, zu = (wide[:, :i].detach().requires_grad_(), wide[:, i + 3:].detach().requires_grad_())  # strided
    fg, fu = ((1 + 0.3 * rand(i, dtype=torch.float32)).requires_grad_() for _ in range(2))
    bg, dh = rand(i), rand(n, i)
    z = rand(2, 19, i).requires_grad_()
    dy = rand(2, 19, i)
    leaves = [zg, zu, fg, fu, z]

    def run(cast):
        for t in leaves:
            t.grad = None
        zg_, zu_, fg_, fu_, z_ = (cast(t) for t in leaves)
        act = ScaledSwiGLU.apply(zg_, zu_, fg_, cast(bg), fu_, None) if cast is _same else (
            torch.nn.functional.silu(zg_ * fg_ + cast(bg)) * (zu_ * fu_))
        y = ScaleOutput.apply(z_, fg_, None) if cast is _same else z_ * fg_
        ((act * cast(dh)).sum() + (y * cast(dy)).sum()).backward()
        return [act.detach().double(), y.detach().double()] + [t.grad.double().clone() for t in leaves]

    got, want = run(_same), run(lambda t: t.double())
    names = ["act", "y", "dzg", "dzu", "dfg+dfy", "dfu", "dz"]
    return {k: rel(a, b) for k, a, b in zip(names, got, want)}


def _same(t):
    return t


def test_dora_kernels_in_pytorch_equal_float64():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        errs = check_dora_kernels(dtype)
        assert max(errs.values()) <= tol, (dtype, errs)


def _assert_accurate(errs, dtype, fp32_tol=1e-4):
    if dtype == "float32":  # (on a GPU: several fp32 Triton kernels chained, as test_kernels.py allows)
        assert max(errs.values()) <= fp32_tol, errs
    else:
        assert errs["fast_loss"] <= 1e-2 and errs["fast_grads"] <= 3 * errs["plain_grads"] + 1e-2, errs


def test_fused_dora_with_triton_interpreted():
    """The fused path's Triton kernels (SwiGLU of the scaled gate/up, RMSNorm, RoPE, the loss) under
    TRITON_INTERPRET=1 on CPU tensors, in a fresh interpreter."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", DELTATUNE_TRITON="interpret",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == {"float32", "bfloat16"}
    for dtype, errs in results.items():
        assert errs.pop("kernels") > 0 and errs.pop("dora_kernels") > 0, dtype  # Triton ran, ours included
        units = errs.pop("units")
        assert max(units.values()) <= (1e-5 if dtype == "float32" else 1e-2), (dtype, units)
        _assert_accurate(errs, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs the kernels interpreted)")
def test_fused_dora_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        _assert_accurate(check_fused_dora("cuda", dtype), str(dtype)[6:], fp32_tol=1e-3)
        units = check_dora_kernels(dtype, "cuda")  # the Triton kernels themselves
        assert max(units.values()) <= (1e-5 if dtype == torch.float32 else 1e-2), (dtype, units)


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    import deltatune.kernels.functional as functional
    import deltatune.kernels.output_scale as output_scale

    launched, ours = [], []  # the Triton kernel modules asked for (so an all-PyTorch run fails the test)
    functional_k, ours_k = functional._k, output_scale._kernels
    functional._k = lambda name: (launched.append(name), functional_k(name))[1]
    output_scale._kernels = lambda: (ours.append(1), ours_k())[1]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        launched.clear(), ours.clear()
        out[str(dtype)[6:]] = dict(check_fused_dora("cpu", dtype), units=check_dora_kernels(dtype))
        out[str(dtype)[6:]].update(kernels=len(launched), dora_kernels=len(ours))
    print(json.dumps(out))
