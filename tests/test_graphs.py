"""CUDA graphs over decoder layers (deltatune.fast.graphs): same training as eager, recapture, misuse errors."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.fast import disable_fast_path, enable_fast_path, fast_path_of, fused_causal_lm_loss
from deltatune.fast.graphs import VERIFY_AT, _signature

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def tiny_llama(layers=2, quant=None, seed=0, device="cpu"):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=257, max_position_embeddings=128,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).to(device)
    if quant:
        dt.quantize_model(model, kind=quant, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=TARGETS, init="random"))
    return model.train()


def graph_stack(model):
    return fast_path_of(model).graphs


def train(model, batches, micro=1, set_to_none=True, **fast):
    """Losses of AdamW steps on ``batches`` (each split into ``micro`` micro-batches), and the final adapters."""
    enable_fast_path(model, **fast)
    opt = torch.optim.AdamW(dt.adapter_params(model), lr=1e-2)
    losses = []
    for ids in batches:
        for part in ids.chunk(micro):
            loss = fused_causal_lm_loss(model, part, part) / micro
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return losses, [p.detach().clone() for p in dt.adapter_params(model)]


def test_graphs_off_cuda_run_the_layers_eagerly():
    """On the CPU the graphed layers run their own forwards: results equal the fast path without graphs."""
    batches = [torch.randint(0, 257, (2, 32)) for _ in range(2)]
    model = tiny_llama()
    plain = copy.deepcopy(model)
    losses, params = train(model, batches, cuda_graphs=True)
    ref_losses, ref_params = train(plain, batches)
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert graph_stack(model).captures == 0
    disable_fast_path(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_graphs_need_layers_without_checkpointing():
    with pytest.raises(ValueError, match="all of them checkpointed"):
        enable_fast_path(tiny_llama(), checkpoint=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="none"):
        enable_fast_path(torch.nn.Sequential(torch.nn.Linear(4, 4)), cuda_graphs=True)
    model = tiny_llama(layers=4)
    enable_fast_path(model, checkpoint=0.5, cuda_graphs=True)
    assert graph_stack(model).layers == list(model.model.layers[2:])


def test_signature_sees_what_a_capture_depends_on():
    """Switching adapters, freezing a parameter or moving its storage changes the signature (recapture)."""
    model = tiny_llama()
    layer = model.model.layers[0]
    base = _signature(layer)
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=TARGETS), name="other", activate=False)
    assert _signature(layer) != base  # new parameters
    base = _signature(layer)
    dt.set_active(model, "other")
    assert _signature(layer) != base
    base = _signature(layer)
    layer.self_attn.q_proj.deltas["other"].A.requires_grad_(False)
    assert _signature(layer) != base
    base = _signature(layer)
    layer.self_attn.q_proj.deltas["other"].A.data = layer.self_attn.q_proj.deltas["other"].A.data.clone()
    assert _signature(layer) != base
    assert _signature(layer) == _signature(layer)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("micro,set_to_none", [(1, True), (2, True), (2, False)])
def test_gpu_graphed_training_matches_eager(quant, micro, set_to_none):
    """Four AdamW steps (with gradient accumulation when micro=2) replayed from graphs equal eager steps."""
    batches = [torch.randint(0, 257, (4, 64), device="cuda") for _ in range(4)]
    model = tiny_llama(quant=quant, device="cuda")
    eager = copy.deepcopy(model)
    losses, params = train(model, batches, micro, set_to_none, cuda_graphs=True)
    ref_losses, ref_params = train(eager, batches, micro, set_to_none)
    stack = graph_stack(model)
    assert stack.off is None and stack.captures == 1 and stack.generation == len(batches) * micro
    assert losses == pytest.approx(ref_losses, rel=2e-3)
    for a, b in zip(params, ref_params):
        assert ((a - b).norm() / b.norm()).item() < 2e-3


@pytest.mark.gpu
@cuda
def test_gpu_graphs_recapture_on_new_shapes_and_adapters():
    model = tiny_llama(layers=4, device="cuda")
    eager = copy.deepcopy(model)
    enable_fast_path(model, checkpoint=0.25, cuda_graphs=True)  # layer 0 checkpointed, layers 1-3 graphed
    enable_fast_path(eager, checkpoint=0.25)
    stack = graph_stack(model)

    def step(m, ids):
        for p in dt.adapter_params(m):
            p.grad = None
        loss = fused_causal_lm_loss(m, ids, ids)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in dt.adapter_params(m) if p.grad is not None]

    def same(ids):
        loss, grads = step(model, ids)
        ref_loss, ref_grads = step(eager, ids)
        assert loss == pytest.approx(ref_loss, rel=2e-3)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads):
            assert ((a - b).norm() / b.norm()).item() < 2e-3

    same(torch.randint(0, 257, (2, 64), device="cuda"))
    same(torch.randint(0, 257, (2, 64), device="cuda"))
    assert stack.captures == 1
    same(torch.randint(0, 257, (2, 32), device="cuda"))
    assert stack.captures == 2
    disable_fast_path(model)
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=TARGETS, init="random"), name="other")
    dt.set_active(model, "other")
    eager = copy.deepcopy(model)
    enable_fast_path(model, cuda_graphs=True)
    enable_fast_path(eager)
    stack = graph_stack(model)
    same(torch.randint(0, 257, (2, 32), device="cuda"))
    dt.set_active(model, "default")
    dt.set_active(eager, "default")
    same(torch.randint(0, 257, (2, 32), device="cuda"))
    assert stack.captures == 2 and stack.off is None


def _same_step(model, eager, ids):
    """One step of each model: equal losses and adapter gradients (graphs vs eager)."""
    def step(m):
        for p in dt.adapter_params(m):
            p.grad = None
        loss = fused_causal_lm_loss(m, ids, ids)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in dt.adapter_params(m) if p.grad is not None]

    (loss, grads), (ref_loss, ref_grads) = step(model), step(eager)
    assert loss == pytest.approx(ref_loss, rel=2e-3)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert ((a - b).norm() / b.norm()).item() < 2e-3


@pytest.mark.gpu
@cuda
def test_gpu_graphs_check_the_layers_after_the_first_replays():
    """A step replays the first layers before it checks the layers' state (at layer VERIFY_AT): a change
    found then (adapter switched, parameter frozen or moved, a hook added) redoes those layers, recaptured
    or eagerly, and the step still equals eager."""
    model = tiny_llama(layers=4, device="cuda")
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=TARGETS, init="random"), name="other", activate=False)
    eager = copy.deepcopy(model)
    enable_fast_path(model, cuda_graphs=True)
    enable_fast_path(eager)
    stack = graph_stack(model)
    assert len(stack.layers) > VERIFY_AT
    ids = lambda: torch.randint(0, 257, (2, 64), device="cuda")  # noqa: E731
    _same_step(model, eager, ids())
    _same_step(model, eager, ids())
    assert stack.captures == 1

    def freeze(m):
        m.model.layers[0].self_attn.q_proj.deltas["other"].A.requires_grad_(False)

    def move(m):
        a = m.model.layers[1].mlp.up_proj.deltas["other"].B
        a.data = a.data.clone()

    for change in (lambda m: dt.set_active(m, "other"), freeze, move):
        change(model)
        change(eager)
        _same_step(model, eager, ids())
        _same_step(model, eager, ids())
    assert stack.captures == 4 and stack.off is None
    calls = []
    for m in (model, eager):
        m.model.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match="hooks"):
        _same_step(model, eager, ids())
    assert stack.off and len(calls) == 2  # layer 0 ran again eagerly in the graphed model, so its hook ran


@pytest.mark.gpu
@cuda
def test_gpu_graphs_refuse_a_late_backward_and_keep_no_grad_calls_eager():
    model = tiny_llama(device="cuda")
    enable_fast_path(model, cuda_graphs=True)
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    first = fused_causal_lm_loss(model, ids, ids)
    with torch.no_grad():  # eager: the graphs' buffers keep the first forward's activations
        model(input_ids=ids)
    first.backward()
    grads = [p.grad.clone() for p in dt.adapter_params(model)]
    model.zero_grad(set_to_none=True)
    again = fused_causal_lm_loss(model, ids, ids)
    again.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, dt.adapter_params(model)))
    stale = fused_causal_lm_loss(model, ids, ids)
    fused_causal_lm_loss(model, ids, ids)
    with pytest.raises(RuntimeError, match="reused its buffers"):
        stale.backward()


@pytest.mark.gpu
@cuda
def test_gpu_a_failed_capture_falls_back_to_eager_training_with_working_random_numbers():
    """A layer that synchronises inside the capture makes it fail: the stack turns off with a warning,
    random numbers still work (the generator's capture count is put back) and the step equals eager."""
    model = tiny_llama(device="cuda")
    eager = copy.deepcopy(model)
    layer = model.model.layers[1].mlp
    real = layer.forward

    def syncing(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not allowed while capturing: invalidates the capture
        torch.rand(1, device="cuda")  # draws from the generator, inside the capture too
        return real(*args, **kwargs)

    layer.forward = syncing
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    with pytest.warns(UserWarning, match="capture failed"):
        losses, _ = train(model, [ids, ids], cuda_graphs=True)
    assert graph_stack(model).off
    torch.rand(4, device="cuda")  # raised "Offset increment outside graph capture" before the generator was put back
    torch.nn.init.normal_(torch.empty(8, device="cuda"))
    ref_losses, _ = train(eager, [ids, ids])
    assert losses == pytest.approx(ref_losses, rel=2e-3)
