"""The mixed-adapter kernels (``deltatune.kernels.sgmv``) against a float64 reference, and the pool on them.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (the interpreter must be chosen
before triton is first imported); on a GPU the same checks run compiled, in process. Each check returns
relative errors ||out - ref|| / ||ref - y|| of the added terms, and whether base tokens came back untouched.
"""

import copy
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(device, dtype, decode: bool, seed: int):
    """x, y, A, B, scales and token slots of a small mixed batch: ranks padded in slot 2, base tokens
    interleaved, adapter tokens out of order; decode: one token per adapter, mostly distinct."""
    g = torch.Generator().manual_seed(seed)
    S, R, K, N = 6, 24, 72, 50  # R, K, N not powers of two: masked tiles
    if decode:
        slots = [-1, 4, 0, 1, 2, 3, -1, 2, 5, 1]
    else:
        slots = [[-1, 0, 2, 3, 5][i] for i in torch.randint(0, 5, (70,), generator=g).tolist()]
        slots[10:30] = [3] * 20  # one long segment (more than one 16-token tile)
    T = len(slots)
    x = torch.randn(T, K, generator=g)
    A = torch.randn(S, R, K, generator=g) / K ** 0.5
    B = torch.randn(S, N, R, generator=g)
    A[2, 10:], B[2, :, 10:] = 0, 0  # slot 2 holds a rank-10 adapter
    scales = torch.rand(S, generator=g) + 0.5
    y = torch.randn(T, N, generator=g)
    return [t.to(device) for t in (x, y)] + [t.to(device, dtype) for t in (A, B)] + [scales.to(device), slots]


def _reference(x, y, A, B, scales, slots):
    """float64: y[t] + scale_s B_s A_s x[t] for every token with a slot."""
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            out[t] += scales[s].double() * (B[s].double() @ (A[s].double() @ x[t].double()))
    return out


def check_kernels(device, dtype):
    from deltatune.kernels import sgmv
    from deltatune.serve.lora_mixed import mixed_lora, slot_batch

    out = {}
    for decode in (False, True):
        x, y, A, B, scales, slots = _case(device, dtype, decode, seed=int(decode))
        ref = _reference(x, y, A, B, scales, slots)
        denom = (ref - y.double()).norm().item()
        base = [t for t, s in enumerate(slots) if s < 0]
        for block_m in (16, 64, 128):
            batch = slot_batch(slots, device, block_m=block_m)
            runs = {"sgmv": lambda: sgmv.sgmv(x, y.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m),
                    "bgmv": lambda: sgmv.bgmv(x, y.clone(), A, B, scales, batch.order, batch.pos_slots)}
            if block_m > 16:
                runs = {"sgmv": runs["sgmv"]}
            for kernel, run in runs.items():
                got = run()
                name = f"{kernel}/{'decode' if decode else 'prefill'}/bm{block_m}"
                out[name] = (got.double() - ref).norm().item() / denom
                out[name + "/base_untouched"] = bool(torch.equal(got[base], y[base]))
        # the dispatcher picks a kernel by segment length and agrees with the reference
        batch = slot_batch(slots, device)
        got = mixed_lora(x, y.clone(), A, B, scales, batch)
        out[f"mixed_lora/{'decode' if decode else 'prefill'}/gathered={batch.gathered}"] = \
            (got.double() - ref).norm().item() / denom
    return out


def check_pool(device, dtype):
    """The pool through the kernels equals the pool through the PyTorch reference, on a tiny Llama."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _models
    import deltatune as dt
    from deltatune.serve import AdapterPool

    torch.manual_seed(0)
    base = _models.llama().to(device, dtype).eval()
    rows = ["a", None, "b", "a"]
    with tempfile.TemporaryDirectory() as root:
        pool = AdapterPool(base)
        for i, (name, cfg) in enumerate({"a": dt.LoraConfig(r=4, alpha=8.0, init="random"),
                                         "b": dt.LoraConfig(r=8, use_rslora=True, targets=["q_proj", "v_proj"],
                                                            init="random")}.items()):
            dt.save_adapter(dt.add_adapter(copy.deepcopy(base), cfg), f"{root}/{name}")
            pool.register(name, f"{root}/{name}")
        ids = torch.randint(0, _models.VOCAB, (4, 5), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad(), pool.routed(base, rows):
            kernels = base(input_ids=ids).logits
            mode = os.environ.get("DELTATUNE_TRITON")
            os.environ["DELTATUNE_TRITON"] = "0"
            try:
                reference = base(input_ids=ids).logits
            finally:
                os.environ["DELTATUNE_TRITON"] = mode if mode is not None else "1"
        plain = base(input_ids=ids).logits
    return {"pool": (kernels.double() - reference.double()).norm().item() / reference.double().norm().item(),
            "pool/adapters_change_logits": (reference - plain).abs().max().item() > 1e-3}


CHECKS = {"kernels": check_kernels, "pool": check_pool}


def run_checks(device):
    out = {}
    for name, check in CHECKS.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            out[f"{name}/{str(dtype)[6:]}"] = check(device, dtype)
    return out


def _assert_within(name, errs):
    dtype = torch.float32 if name.endswith("float32") else torch.bfloat16
    tol = TOL[dtype] if not name.startswith("pool") else (1e-4 if dtype == torch.float32 else 5e-2)
    flags = {k: v for k, v in errs.items() if isinstance(v, bool)}
    assert all(flags.values()), f"{name}: {flags}"
    bad = {k: v for k, v in errs.items() if not isinstance(v, bool) and not v <= tol}
    assert not bad, f"{name}: relative error over {tol}: {bad} (all: {errs})"


@pytest.fixture(scope="module")
def interpreted():
    """All checks, run once under TRITON_INTERPRET=1 on CPU tensors in a fresh interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", DELTATUNE_TRITON="interpret",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [f"{k}/{d}" for k in CHECKS for d in ("float32", "bfloat16")])
def test_sgmv_interpreted_cpu(interpreted, name):
    _assert_within(name, interpreted[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs these interpreted)")
@pytest.mark.parametrize("name", list(CHECKS))
def test_sgmv_gpu(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        _assert_within(f"{name}/{str(dtype)[6:]}", CHECKS[name]("cuda", dtype))


def test_reference_catches_a_wrong_answer():
    """The harness fails on a wrong answer: dropping one token's term is far over the tolerance."""
    from deltatune.serve.lora_mixed import mixed_lora_reference, slot_batch

    x, y, A, B, scales, slots = _case("cpu", torch.float32, decode=True, seed=0)
    ref = _reference(x, y, A, B, scales, slots)
    wrong = list(slots)
    wrong[1] = -1
    got = mixed_lora_reference(x, y, A, B, scales, slot_batch(wrong, "cpu"))
    assert (got.double() - ref).norm().item() / (ref - y.double()).norm().item() > 0.1
    got = mixed_lora_reference(x, y, A, B, scales, slot_batch(slots, "cpu"))
    assert (got.double() - ref).norm().item() / (ref - y.double()).norm().item() < 1e-6


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps(run_checks("cpu")))
