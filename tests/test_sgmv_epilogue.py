"""The prefill epilogue path of the adapter pool (issue 18): a plain ``nn.Linear``'s forward, inside
``pool.routed``, writes the adapters' terms (and its bias) into a fresh buffer and lets the base GEMM add into it
(``serve.lora_mixed.linear_mixed_lora``), instead of adding the terms to the finished output in a hook.
``DELTATUNE_SGMV_EPILOGUE=1`` turns it on (off by default: slower on an H200, docs/benchmarks.md session 14). On
CPU the PyTorch reference computes the terms; the kernel's store mode (``sgmv(..., accumulate=False, bias=...)``) runs under ``TRITON_INTERPRET=1`` in a subprocess.
"""

import copy
import json

import _models
import pytest
import torch
import torch.nn.functional as F
from _mixed_lora import mixed_case, mixed_reference
from _util import assert_errors_within, run_interpreted

import deltatune as dt
from deltatune.serve import AdapterPool, pool_call
from deltatune.serve import pool_call
from deltatune.serve.lora_mixed import linear_mixed_lora, mixed_lora_reference, slot_batch


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def qwen_pool(tmp_path_factory):
    """A tiny Qwen2 (q/k/v carry a bias), fp32, and a pool of "a" (r 4, every projection) and "b" (r 8, q/v)."""
    root = tmp_path_factory.mktemp("epilogue")
    torch.manual_seed(0)
    base = _models.qwen2().eval()
    pool = AdapterPool(base)
    for name, cfg in {"a": dt.LoraConfig(r=4, alpha=8.0, init="random"),
                      "b": dt.LoraConfig(r=8, alpha=4.0, targets=["q_proj", "v_proj"], init="random")}.items():
        dt.save_adapter(dt.add_adapter(copy.deepcopy(base), cfg), root / name)
        pool.register(name, root / name)
    return base, pool


@pytest.fixture
def calls(monkeypatch):
    """Each ``linear_mixed_lora`` call of the pool: (has a bias, base rows in the batch)."""
    seen = []

    def spy(x, weight, bias, A, B, scales, batch, ranks=None):
        seen.append((bias is not None, batch.num_adapted < batch.num_tokens))
        return linear_mixed_lora(x, weight, bias, A, B, scales, batch, ranks)
    monkeypatch.setattr(pool_call, "linear_mixed_lora", spy)
    return seen


def _logits(base, pool, rows, ids):
    with torch.no_grad(), pool.routed(base, rows):
        return base(input_ids=ids).logits


def test_prefill_takes_the_epilogue_and_equals_the_hook(qwen_pool, calls, monkeypatch):
    """Prefill rows with a base row among them: q/v (a bias; 3 of 4 rows adapted) take the epilogue, layers only
    "a" targets (2 of 4 rows) keep the hook; the logits equal the hook path's (switch off) within 1e-5, the
    layers' forwards are put back on exit, and the adapters do change the logits."""
    base, pool = qwen_pool
    rows = ["a", None, "b", "a"]
    ids = torch.randint(0, _models.VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    q = base.model.layers[0].self_attn.q_proj
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "1")
    with torch.no_grad(), pool.routed(base, rows):
        assert "forward" in q.__dict__ and not q._forward_hooks
        epilogue = base(input_ids=ids).logits
    assert "forward" not in q.__dict__
    assert (True, True) in calls  # a layer with a bias, base rows mixed in
    layers = len(base.model.layers)
    assert len(calls) == 2 * layers  # q and v of each layer; k, o and the MLP (only "a": half the rows) hook
    calls.clear()
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "0")
    with torch.no_grad(), pool.routed(base, rows):
        assert "forward" not in q.__dict__ and len(q._forward_hooks) == 1
        hook = base(input_ids=ids).logits
    assert not calls
    assert _rel(epilogue, hook) <= 1e-5
    plain = base(input_ids=ids).logits
    assert (hook - plain).abs().max() > 1e-3
    assert torch.allclose(epilogue[1], plain[1], rtol=1e-5, atol=1e-5)  # the base row


def test_all_base_and_decode_rows_keep_the_plain_paths(qwen_pool, calls, monkeypatch):
    """No adapted row: the base forward alone (bit for bit); one token a row (decode, CPU: the reference): at
    least half adapted, so the epilogue, equal to the hook; gradients on: the hook."""
    base, pool = qwen_pool
    monkeypatch.delenv("DELTATUNE_SGMV_EPILOGUE", raising=False)
    assert not pool_call.sgmv_epilogue()  # off by default
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "1")
    ids = torch.randint(0, _models.VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(base, pool, [None, None, None], ids), base(input_ids=ids).logits)
    assert not calls
    step = ids[:, :1]
    got = _logits(base, pool, ["b", "a", None], step)
    assert calls
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "0")
    assert _rel(got, _logits(base, pool, ["b", "a", None], step)) <= 1e-5
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "1")
    calls.clear()
    with pool.routed(base, ["a", "a", "b"]):
        base(input_ids=ids).logits.sum().backward()  # the model's weights want gradients
    assert not calls
    base.zero_grad(set_to_none=True)


def test_bad_switch_value_is_refused(qwen_pool, monkeypatch):
    base, pool = qwen_pool
    monkeypatch.setenv("DELTATUNE_SGMV_EPILOGUE", "yes")
    with pytest.raises(ValueError, match="DELTATUNE_SGMV_EPILOGUE must be 0"):
        with pool.routed(base, ["a"]):
            pass
    assert "forward" not in base.model.layers[0].self_attn.q_proj.__dict__


def test_linear_mixed_lora_equals_linear_plus_terms():
    """The function itself, fp32 on CPU, with and without a bias, base tokens interleaved: ``F.linear`` plus the
    reference's terms within 1e-5 relative, row by row."""
    x, _, A, B, scales, slots = mixed_case("cpu", torch.float32, decode=False, seed=3)
    batch = slot_batch(slots, "cpu")
    weight = torch.randn(B.shape[1], x.shape[1]) / x.shape[1] ** 0.5
    for bias in (None, torch.randn(B.shape[1])):
        want = mixed_lora_reference(x, F.linear(x, weight, bias), A, B, scales, batch)
        got = linear_mixed_lora(x, weight, bias, A, B, scales, batch)
        rows = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
        assert rows <= 1e-5, rows


def check_store(dtype):
    """Under the interpreter: ``sgmv(accumulate=False, bias=b)`` writes term + bias to the adapted rows and leaves
    the others as they were; ``accumulate=True`` with a bias adds both; ``linear_mixed_lora`` on the kernels equals
    it on the reference."""
    import os

    from deltatune.kernels import sgmv

    x, y, A, B, scales, slots = mixed_case("cpu", dtype, decode=False, seed=4)
    bias = torch.randn(B.shape[1]).to(dtype)
    base = [t for t, s in enumerate(slots) if s < 0]
    adapted = [t for t, s in enumerate(slots) if s >= 0]
    batch = slot_batch(slots, "cpu", block_m=16)
    ref = mixed_reference(x, torch.zeros_like(y), A, B, scales, slots) + bias.double()
    sentinel = torch.full_like(y, 7.0)
    got = sgmv.sgmv(x, sentinel.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m, accumulate=False,
                    bias=bias)
    out = {"store": _rel(got[adapted], ref[adapted]),
           "store/base_untouched": bool(torch.equal(got[base], sentinel[base]))}
    got = sgmv.sgmv(x, y.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m, bias=bias)
    out["accumulate_bias"] = _rel(got[adapted], ref[adapted] + y[adapted].double())
    weight = (torch.randn(B.shape[1], x.shape[1]) / x.shape[1] ** 0.5).to(dtype)
    xs = x.to(dtype)
    kernels = linear_mixed_lora(xs, weight, bias, A, B, scales, batch)
    os.environ["DELTATUNE_TRITON"] = "0"
    try:
        reference = linear_mixed_lora(xs, weight, bias, A, B, scales, batch)
    finally:
        os.environ["DELTATUNE_TRITON"] = "interpret"
    out["linear_mixed_lora"] = _rel(kernels, reference)
    return out


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_store_mode_interpreted_cpu(interpreted, dtype):
    assert_errors_within(dtype, interpreted[dtype], 1e-5 if dtype == "float32" else 2e-2, "relative error")


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps({str(d)[6:]: check_store(d) for d in (torch.float32, torch.bfloat16)}))
