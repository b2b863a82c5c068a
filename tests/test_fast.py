"""The fast training path against the plain path and float64, on a tiny Llama on CPU.

The Triton kernels themselves are checked in test_kernels.py; here the fast path runs their PyTorch
branch (the same math), which is what checks the autograd functions, the block swaps, checkpointing and
the fused loss. The 200-step loss-curve comparison needs a GPU: bench/loss_curve.py.
"""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.fast import blocks
from deltatune.fast import disable_fast_path, enable_fast_path, fast_path_enabled, fused_causal_lm_loss
from deltatune.kernels import lora_group, lora_mlp

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=257, max_position_embeddings=128,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init="random"))
    return model


def loss_and_grads(model, ids, labels, fast, **kw):
    for p in dt.adapter_params(model):
        p.grad = None
    if fast:
        enable_fast_path(model, **kw)
        loss = fused_causal_lm_loss(model, ids, labels)
    else:
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    if fast:
        disable_fast_path(model)
    return loss.detach().double(), [p.grad.double() for p in dt.adapter_params(model)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fast_path_matches_plain_path_and_float64(checkpoint):
    model = tiny_llama()
    ids = torch.randint(0, 257, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100
    ref_model = copy.deepcopy(model).double()
    ref_loss, ref_grads = loss_and_grads(ref_model, ids, labels, fast=False)
    plain_loss, plain_grads = loss_and_grads(model, ids, labels, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, ids, labels, fast=True, checkpoint=checkpoint)
    assert abs(fast_loss - ref_loss) < 1e-2 * ref_loss
    # bf16 activations in both paths (a few % per tensor here; the plain path's adapters compute in fp32,
    # the fast path's in bf16: 0.8-2.1x the plain error over seeds). It must be about as accurate overall,
    # and no tensor far off (a wrong scale, sign or factor gives errors near 100%)
    fast_err = [rel(f, r) for f, r in zip(fast_grads, ref_grads)]
    plain_err = [rel(p, r) for p, r in zip(plain_grads, ref_grads)]
    assert sum(fast_err) <= 3 * sum(plain_err) + 1e-2 * len(fast_err), (fast_err, plain_err)
    assert max(fast_err) < 0.25, fast_err


@pytest.mark.parametrize("kind,checkpoint", [("nf4", False), ("int8", False), ("nf4", True)])
def test_fast_path_on_a_quantized_base_matches_plain_path(kind, checkpoint, monkeypatch):
    """QLoRA: the fused nodes dequantize the frozen weight in forward and backward themselves."""
    import deltatune.kernels.lora as fused

    dequantized = []
    dense = fused._dense
    monkeypatch.setattr(fused, "_dense", lambda w, dtype: (dequantized.append(1) if not torch.is_tensor(w) else None,
                                                           dense(w, dtype))[1])
    stacked = fused._stacked

    def count_stacked(weights, *args):  # gate and up, dequantized into one buffer (None: plain weights)
        out = stacked(weights, *args)
        if out is not None:
            dequantized.extend([1] * len(weights))
        return out

    monkeypatch.setattr(fused, "_stacked", count_stacked)
    from deltatune.quant import quantize_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=257, max_position_embeddings=128,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    quantize_model(model, kind=kind, blocksize=64 if kind == "nf4" else None, compute_dtype=torch.float32)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init="random"))
    ids = torch.randint(0, 257, (2, 16))
    plain_loss, plain_grads = loss_and_grads(model, ids, ids, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, ids, ids, fast=True, checkpoint=checkpoint)
    assert any(m.forward_impl is None for m in model.modules() if isinstance(m, dt.DeltaLayer))  # disabled again
    assert abs(fast_loss - plain_loss) < 1e-4 * plain_loss
    assert max(rel(f, p) for f, p in zip(fast_grads, plain_grads)) < 1e-3
    # per layer: 7 weights in forward and 7 in backward (less q/k/v of layer 0, whose input needs no
    # gradient); with checkpointing the recomputation dequantizes 6 (the MLP's output is not needed) and
    # keeps them for the backward, which then dequantizes only down
    assert len(dequantized) == (2 * (7 + 6 + 1) if checkpoint else 2 * (7 + 7) - 3)


def test_fast_path_under_autocast_with_a_float32_base():
    """fp32 weights, bf16 autocast: the fused nodes cast as autocast would, and match the plain path."""
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 257, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = loss_and_grads(model, ids, ids, fast=False)
        fast_loss, fast_grads = loss_and_grads(model, ids, ids, fast=True)
    assert abs(fast_loss - plain_loss) < 1e-2 * plain_loss
    assert max(rel(f, p) for f, p in zip(fast_grads, plain_grads)) < 0.1


def test_fast_path_float32_is_exact():
    """In fp32 the fast path computes the same function as the plain path to rounding."""
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (2, 16))
    plain_loss, plain_grads = loss_and_grads(model, ids, ids, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, ids, ids, fast=True, checkpoint=True)
    assert abs(fast_loss - plain_loss) < 1e-5
    for f, p in zip(fast_grads, plain_grads):
        assert rel(f, p) < 1e-4


def test_enable_disable_is_an_exact_inverse():
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (1, 12))
    before = model(input_ids=ids).logits
    forwards = {n: m.forward for n, m in model.named_modules()}
    enable_fast_path(model, checkpoint=True)
    assert fast_path_enabled(model)
    with pytest.raises(ValueError):
        enable_fast_path(model)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    disable_fast_path(model)
    assert not fast_path_enabled(model)
    assert all(m.forward.__func__ is forwards[n].__func__ for n, m in model.named_modules())
    assert all(getattr(m, "forward_impl", None) is None for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_partial_checkpointing_recomputes_only_the_first_layers():
    model = tiny_llama(torch.float32)  # 2 decoder layers
    ids = torch.randint(0, 257, (2, 16))
    full_loss, full_grads = loss_and_grads(model, ids, ids, fast=True, checkpoint=True)
    layers = model.model.layers
    enable_fast_path(model, checkpoint=0.5)
    # only layer 0 is checkpointed; layer 1 runs the fused decoder forward (residual add inside the norm)
    assert hasattr(layers[0].forward, "__wrapped__") and layers[1].forward.__func__ is blocks.decoder_forward
    disable_fast_path(model)
    half_loss, half_grads = loss_and_grads(model, ids, ids, fast=True, checkpoint=0.5)
    assert torch.equal(half_loss, full_loss)
    assert all(torch.allclose(h, f, rtol=1e-5, atol=1e-7) for h, f in zip(half_grads, full_grads))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            enable_fast_path(model, checkpoint=bad)


def test_fused_nodes_do_not_save_the_norm_outputs(monkeypatch):
    """The q/k/v and MLP nodes recompute their RMSNorm input in backward instead of keeping it."""
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (2, 16))
    norm_outputs, saved = [], set()  # kept alive: no address reuse
    hooks = [m.register_forward_hook(lambda m, i, o: norm_outputs.append(o))
             for n, m in model.named_modules() if n.endswith("input_layernorm")]
    add_norm = blocks.add_rms_norm

    def recording_add_norm(*args):  # the second norm of each layer runs fused with the residual add
        out = add_norm(*args)
        norm_outputs.append(out[1])
        return out

    monkeypatch.setattr(blocks, "add_rms_norm", recording_add_norm)
    enable_fast_path(model)

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_causal_lm_loss(model, ids, ids)
    assert len(norm_outputs) == 4 and not saved & {o.untyped_storage().data_ptr() for o in norm_outputs}
    loss.backward()  # and the recomputation gives the same gradients as the plain path (tests above)
    disable_fast_path(model)
    for h in hooks:
        h.remove()


def test_decoder_fusion_keeps_norm_hooks():
    """A hook on the norm that the fused decoder forward would bypass sends the layer down its own forward."""
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (2, 16))
    calls = []
    hook = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, i, o: calls.append(1))
    enable_fast_path(model)
    fused_causal_lm_loss(model, ids, ids)
    assert calls == [1]
    disable_fast_path(model)
    hook.remove()


def test_dropout_layers_take_the_plain_path():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=4, targets=TARGETS, init="random", dropout=0.5))
    model.train()
    ids = torch.randint(0, 64, (1, 8))
    torch.manual_seed(1)
    plain = model(input_ids=ids).logits
    enable_fast_path(model)
    torch.manual_seed(1)
    fast = model(input_ids=ids).logits
    assert torch.allclose(plain, fast, atol=1e-5)  # same dropout masks: the same (plain) computation ran
    model.eval()
    torch.manual_seed(2)
    assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-3)  # eval: no dropout, fused path


def test_fused_loss_equals_model_loss_with_ignored_labels():
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (3, 10))
    labels = ids.clone()
    labels[1, 3:7] = -100
    hf = model(input_ids=ids, labels=labels).loss
    fused = fused_causal_lm_loss(model, ids, labels)
    assert abs(hf.item() - fused.item()) < 1e-5


def test_fused_loss_gives_a_trained_head_its_gradient():
    model = tiny_llama(torch.float32)
    model.lm_head.weight.requires_grad_(True)
    ids = torch.randint(0, 257, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    ref = model.lm_head.weight.grad.clone()
    model.lm_head.weight.grad = None
    fused_causal_lm_loss(model, ids, ids).backward()
    assert rel(model.lm_head.weight.grad, ref) < 1e-5


def _projection(out_f, in_f, ranks, bias):
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    b = torch.randn(out_f, dtype=torch.float64, requires_grad=True) if bias else None
    ads = [(torch.randn(r, in_f, dtype=torch.float64, requires_grad=True),
            torch.randn(out_f, r, dtype=torch.float64, requires_grad=True), 0.5 + i) for i, r in enumerate(ranks)]
    return w, b, ads


def test_lora_group_gradcheck():
    """Two projections sharing an input, two adapters on one, a bias: float64 gradcheck of every input."""
    projs = [_projection(5, 6, [2, 3], bias=True), _projection(4, 6, [1], bias=False)]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    tensors = [x] + [t for _, b, ads in projs for t in ([b] if b is not None else []) + [a for a, _, _ in ads]
                     + [bb for _, bb, _ in ads]]

    def f(x, *_):
        return lora_group(x, projs)

    assert torch.autograd.gradcheck(f, tuple(tensors))
    # and it computes y = x W^T + b + sum_k s_k (x A_k^T) B_k^T
    y = lora_group(x, projs)[0]
    w, b, ads = projs[0]
    ref = x @ w.T + b + sum(s * (x @ a.T) @ bb.T for a, bb, s in ads)
    assert torch.allclose(y, ref)


def test_lora_mlp_gradcheck():
    gate, up, down = _projection(7, 5, [2], False), _projection(7, 5, [3], False), _projection(5, 7, [2], True)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    leaves = [x] + [t for _, b, ads in (gate, up, down) for t in ([b] if b is not None else [])
                    + [a for a, _, _ in ads] + [bb for _, bb, _ in ads]]
    assert torch.autograd.gradcheck(lambda x, *_: lora_mlp(x, gate, up, down), tuple(leaves))


def compiled_loss_backward(model, ids, **compile_kw):
    """The fast path's fused loss under ``torch.compile(**compile_kw)``, backpropagated into fresh grads."""
    enable_fast_path(model)
    compiled = torch.compile(lambda m, i: fused_causal_lm_loss(m, i, i), **compile_kw)
    for p in dt.adapter_params(model):
        p.grad = None
    loss = compiled(model, ids)
    loss.backward()
    disable_fast_path(model)
    return loss


def test_torch_compile_traces_the_fast_path():
    model = tiny_llama(torch.float32)
    ids = torch.randint(0, 257, (2, 8))
    eager_loss, eager_grads = loss_and_grads(model, ids, ids, fast=True)
    loss = compiled_loss_backward(model, ids, backend="aot_eager", fullgraph=False)
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    for p, g in zip(dt.adapter_params(model), eager_grads):
        assert rel(p.grad.double(), g) < 1e-4


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("checkpoint,offload", [(False, False), (True, False), (True, True)])
def test_gpu_fast_path_matches_plain_path(checkpoint, offload):
    """On the GPU the fast path runs the Triton kernels, SDPA and the offloaded checkpoint."""
    model = tiny_llama().cuda()
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model).double(), ids, ids, fast=False)
    plain_loss, plain_grads = loss_and_grads(model, ids, ids, fast=False)
    fast_loss, fast_grads = loss_and_grads(model, ids, ids, fast=True, checkpoint=checkpoint, offload=offload)
    assert abs(fast_loss - ref_loss) < 1e-2 * ref_loss
    fast_err = [rel(f, r) for f, r in zip(fast_grads, ref_grads)]
    plain_err = [rel(p, r) for p, r in zip(plain_grads, ref_grads)]
    assert sum(fast_err) <= 3 * sum(plain_err) + 1e-2 * len(fast_err), (fast_err, plain_err)


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_inductor():
    model = tiny_llama().cuda()
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    eager_loss, eager_grads = loss_and_grads(model, ids, ids, fast=True)
    loss = compiled_loss_backward(model, ids)
    assert abs(loss.item() - eager_loss.item()) < 2e-2
    assert sum(rel(p.grad.double(), g) for p, g in zip(dt.adapter_params(model), eager_grads)) / len(eager_grads) < 2e-2


@pytest.mark.parametrize("one_grad", [False, True])
def test_quantized_group_stacks_weights_with_and_without_adapters(one_grad, monkeypatch):
    """Quantized projections sharing an input run as one matmul (the low-rank factor block-diagonal, with
    an empty block for a projection without adapter); outputs and gradients match the dense reference.
    ``one_grad``: the output gradients are column blocks of one tensor (as RoPE's backward gives them for
    q/k/v), so dx and g come from one matmul."""
    import deltatune.kernels.lora as fused
    from deltatune.quant import quantize

    merged = []
    backward = fused._group_backward
    monkeypatch.setattr(fused, "_group_backward", lambda *a: (merged.append(a[-1] is not None), backward(*a))[1])
    torch.manual_seed(0)
    q1, q2, q3 = (quantize(torch.randn(o, 64), "nf4", 32) for o in (8, 4, 4))
    a, b = torch.randn(3, 64, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    a3, b3 = torch.randn(2, 64, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    x = torch.randn(5, 64, requires_grad=True)
    y1, y2, y3 = lora_group(x, [(q1, None, []), (q2, None, [(a, b, 0.5)]), (q3, None, [(a3, b3, 0.5)])])
    dy = torch.randn(5, 16)
    if one_grad:
        torch.autograd.backward([y1, y2, y3], [dy[:, :8], dy[:, 8:12], dy[:, 12:]])
    else:
        torch.autograd.backward([y1, y2, y3], [dy[:, :8].clone(), dy[:, 8:12].clone(), dy[:, 12:].clone()])
    assert merged == [one_grad]
    grads = [x.grad, a.grad, b.grad, a3.grad, b3.grad]
    x.grad = a.grad = b.grad = a3.grad = b3.grad = None
    r1 = x @ q1.dequantize(torch.float32).T
    r2 = x @ q2.dequantize(torch.float32).T + 0.5 * (x @ a.T) @ b.T
    r3 = x @ q3.dequantize(torch.float32).T + 0.5 * (x @ a3.T) @ b3.T
    torch.autograd.backward([r1, r2, r3], [dy[:, :8], dy[:, 8:12], dy[:, 12:]])
    assert all(torch.allclose(y, r, atol=1e-5) for y, r in zip((y1, y2, y3), (r1, r2, r3)))
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(grads, [x.grad, a.grad, b.grad, a3.grad, b3.grad]))
