"""deltatune.train.optim.AdamW against torch.optim.AdamW on a small regression problem.

Stated tolerances (also in the module docstring): fp32 states, on the parameter's device or in host
memory, match torch to 1e-6 relative after 50 steps; 8-bit states stay within 2% relative L2 of the
parameters and 5% of the loss.
"""

import copy

import pytest
import torch
import torch.nn as nn

from deltatune.train.optim import AdamW, dequantize_state, quantize_state
from deltatune.quant.nf4 import dynamic_map


def _problem(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32)).to(device)  # 8192+ params: 8-bit kicks in
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(256, 64, generator=g).to(device)
    y = torch.randn(256, 32, generator=g).to(device)
    return model, x, y


def _train(model, opt, x, y, steps=50):
    losses = []
    for i in range(steps):
        opt.zero_grad()
        batch = slice((i * 32) % 256, (i * 32) % 256 + 32)
        loss = (model(x[batch]) - y[batch]).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _compare(state_device, state_bits, device="cpu"):
    model, x, y = _problem(device)
    ref = copy.deepcopy(model)
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours = _train(model, AdamW(model.parameters(), state_device=state_device, state_bits=state_bits, **kw), x, y)
    theirs = _train(ref, torch.optim.AdamW(ref.parameters(), **kw), x, y)
    params = max(_rel(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    return params, ours, theirs, model


@pytest.mark.parametrize("state_device", ["param", "cpu"])
def test_fp32_states_match_torch_adamw(state_device):
    params, ours, theirs, _ = _compare(state_device, 32)
    assert params < 1e-6
    assert ours[-1] < 0.8 * ours[0]  # it trains


def test_8bit_states_stay_close_to_torch_adamw():
    params, ours, theirs, model = _compare("param", 8)
    assert params < 2e-2, params
    assert abs(ours[-1] - theirs[-1]) < 0.05 * theirs[-1]
    assert params > 0  # the states really are quantized
    opt_state = AdamW(model.parameters(), state_bits=8)
    _train(model, opt_state, *_problem()[1:], steps=1)
    big = [s for s in opt_state.state.values() if s["eightbit"]]
    assert big and all(s["exp_avg"].dtype == torch.uint8 for s in big)


def test_8bit_state_codes_round_trip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g) * torch.logspace(-6, 0, 1000)
    for signed, values in ((True, x), (False, x.abs())):
        code = dynamic_map(signed=signed)
        codes, absmax = quantize_state(values, code, 256)
        back = dequantize_state(codes, absmax, code, values.shape)
        # the dynamic code's relative step is at most ~1/8 of the block's absmax scale plus its resolution
        block_max = torch.nn.functional.pad(values.abs(), (0, 24)).view(-1, 256).amax(1).repeat_interleave(256)[:1000]
        assert ((back - values).abs() <= 0.07 * block_max + 1e-12).all()
        assert torch.equal(dequantize_state(*quantize_state(torch.zeros(300), code, 256), code, torch.Size([300])),
                           torch.zeros(300))


def test_rejects_bad_settings():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError):
        AdamW(p, state_device="disk")
    with pytest.raises(ValueError):
        AdamW(p, state_bits=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_host_states_on_gpu():
    params, ours, theirs, model = _compare("cpu", 32, device="cuda")
    assert params < 1e-5
    opt = AdamW(model.parameters(), state_device="cpu")
    _train(model, opt, *_problem("cuda")[1:], steps=1)
    assert all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].is_pinned() for s in opt.state.values())


def test_paged_states_need_cuda_parameters():
    model, x, y = _problem()
    with pytest.raises(ValueError, match="paged.*CUDA"):
        _train(model, AdamW(model.parameters(), state_device="paged"), x, y, steps=1)


@pytest.mark.parametrize("state_device,state_bits", [("param", 32), ("cpu", 8)])
def test_state_dict_round_trip_keeps_training_identical(state_device, state_bits):
    """Save after 10 steps, load into a fresh optimizer, 10 more steps: identical to never stopping."""
    kw = dict(lr=3e-3, state_device=state_device, state_bits=state_bits)
    model, x, y = _problem()
    opt = AdamW(model.parameters(), **kw)
    _train(model, opt, x, y, steps=10)
    resumed_model = copy.deepcopy(model)
    resumed = AdamW(resumed_model.parameters(), **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, x, y, steps=10)
    _train(resumed_model, resumed, x, y, steps=10)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for s in resumed.state.values():
        assert s["exp_avg"].device.type == "cpu"
        assert s["exp_avg"].dtype == (torch.uint8 if s["eightbit"] else torch.float32)


def test_load_state_dict_keeps_fp32_states_of_bf16_params():
    p = nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = AdamW([p])
    p.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    other = AdamW([nn.Parameter(p.detach().clone())])
    other.load_state_dict(opt.state_dict())  # torch would cast the moments to bf16
    assert next(iter(other.state.values()))["exp_avg"].dtype == torch.float32
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        AdamW([nn.Parameter(p.detach().clone())]).load_state_dict(bad)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA managed memory)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("state_bits", [32, 8])
def test_paged_states_on_gpu(state_bits):
    from deltatune.train.managed import is_managed, managed_bytes

    params, ours, theirs, model = _compare("paged", state_bits, device="cuda")
    assert params < (1e-5 if state_bits == 32 else 2e-2), params
    before = managed_bytes("cuda")
    opt = AdamW(model.parameters(), state_device="paged", state_bits=state_bits)
    allocated = torch.cuda.memory_allocated()
    _train(model, opt, *_problem("cuda")[1:], steps=2)
    assert managed_bytes("cuda") > before
    assert torch.cuda.memory_allocated() <= allocated  # the states are not in torch's GPU allocator
    assert all(is_managed(s["exp_avg"]) for s in opt.state.values())
    resumed = AdamW(model.parameters(), state_device="paged", state_bits=state_bits)
    resumed.load_state_dict(opt.state_dict())
    assert all(is_managed(s["exp_avg"]) for s in resumed.state.values())
    del opt, resumed
    import gc

    gc.collect()
    assert managed_bytes("cuda") == before  # the ranges were freed with their tensors


@pytest.mark.gpu
@gpu
def test_paged_states_never_exceed_free_gpu_memory(monkeypatch):
    model, x, y = _problem("cuda")
    ref = copy.deepcopy(model)
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 20, total))
    with pytest.raises(MemoryError, match="state_device='cpu'"):
        _train(model, AdamW(model.parameters(), state_device="paged"), x, y, steps=1)
    monkeypatch.undo()
    # allocated while there is room; later the GPU is "full": no prefetch, the step reads host pages
    opt = AdamW(model.parameters(), lr=3e-3, state_device="paged")
    _train(model, opt, x, y, steps=1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, total))
    _train(model, opt, x, y, steps=9)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    _train(ref, ref_opt, x, y, steps=1)  # the same batches: _train starts at batch 0 on each call
    _train(ref, ref_opt, x, y, steps=9)
    assert max(_rel(p, q) for p, q in zip(model.parameters(), ref.parameters())) < 1e-5
