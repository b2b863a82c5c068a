"""The Triton kernels against float64 references, on fresh random inputs at small sizes.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (the interpreter must be chosen
before triton is first imported, which another test may already have done in this process); on a GPU
the same checks run compiled, in process. Each check returns ||out - ref|| / ||ref|| per output.
"""

import json
import os

import pytest
import torch

from _util import rel_error, run_interpreted

triton = pytest.importorskip("triton")

# Tolerances for one bf16 rounding of the output (fp32 arithmetic inside), and for fp32 throughout.
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _poisoned_like(t):
    return torch.full_like(t, float("nan"))


def check_rmsnorm(device, dtype):
    from deltatune.kernels import triton_rmsnorm as k

    n, d, eps = 37, 200, 1e-6  # d not a power of two: masked columns
    x = torch.randn(n, 2 * d, device=device, dtype=dtype)[:, :d]  # row stride != d
    w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    dy = torch.randn(n, d, device=device, dtype=dtype)
    y, rstd = k.rmsnorm_forward(x, w, eps)
    dx = k.rmsnorm_backward(dy, x, w, rstd)
    x64 = x.double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    ref.backward(dy.double())
    out = {"y": rel_error(y, ref.detach()), "dx": rel_error(dx, x64.grad)}
    # fused with the residual add before it: s = x + h, y = norm(s); backward adds the residual's gradient
    h = torch.randn(n, d, device=device, dtype=dtype)
    ds = torch.randn(n, d, device=device, dtype=dtype)
    s, y, rstd = k.add_rmsnorm_forward(x, h, w, eps)
    dx = k.rmsnorm_backward(dy, s, w, rstd, ds)
    s64 = (x.double() + h.double()).requires_grad_()
    ref = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    ref.backward(dy.double())
    out.update({"add_s": rel_error(s, s64.detach()), "add_y": rel_error(y, ref.detach()),
                "add_dx": rel_error(dx, s64.grad + ds.double())})
    return out


def check_rope(device, dtype):
    from deltatune.kernels import triton_rope as k

    b, t, h, d = 2, 7, 3, 16
    base = torch.randn(b, h + 2, t, d, device=device, dtype=dtype)
    x = base[:, 1:h + 1].transpose(1, 2)  # (B, T, H, D) view of a head-major tensor: SDPA's grad layout
    out = {}
    for cs_batch in (1, b):  # a shared (broadcast) cos/sin and one per sequence
        theta = torch.randn(cs_batch, t, d // 2, device=device, dtype=torch.float64)
        cos = torch.cat([theta.cos(), theta.cos()], -1).to(dtype)
        sin = torch.cat([theta.sin(), theta.sin()], -1).to(dtype)
        dy = torch.randn(b, t, h, d, device=device, dtype=dtype)
        y = k.rope_apply(x, cos, sin)
        dx = k.rope_apply(dy, cos, sin, backward=True)

        def rotate_half(v):
            return torch.cat((-v[..., d // 2:], v[..., :d // 2]), -1)

        x64 = x.double().requires_grad_()
        ref = x64 * cos.double()[:, :, None] + rotate_half(x64) * sin.double()[:, :, None]
        ref.backward(dy.double())
        out[f"y_cs{cs_batch}"] = rel_error(y, ref.detach())
        out[f"dx_cs{cs_batch}"] = rel_error(dx, x64.grad)
    # rotate=False copies bit for bit, into a new tensor or strided head blocks of a wider one
    wide = _poisoned_like(torch.empty(b, t, h + 4, d, device=device, dtype=dtype))
    k.rope_apply(x, cos, sin, out=wide[:, :, 2:2 + h], rotate=False)
    copied = k.rope_apply(x, cos, sin, rotate=False)
    exact = torch.equal(copied, x) and copied.is_contiguous() and torch.equal(wide[:, :, 2:2 + h], x)
    out["copy"] = 0.0 if exact and wide[:, :, :2].isnan().all() and wide[:, :, 2 + h:].isnan().all() else 1.0
    return out


def check_rope_v(device, dtype):
    """``apply_rope`` with v, on q/k/v column blocks of one projection output (the stacked q/k/v path):
    v comes back as a contiguous copy, and dq, dk, dv as adjacent head blocks of one tensor."""
    from deltatune.kernels.functional import apply_rope

    b, t, hq, hk, d = 2, 5, 4, 2, 16
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (blk.view(b, t, -1, d) for blk in qkv.split([hq * d, hk * d, hk * d], -1))
    theta = torch.randn(1, t, d // 2, device=device, dtype=torch.float64)
    cos = torch.cat([theta.cos(), theta.cos()], -1).to(dtype)
    sin = torch.cat([theta.sin(), theta.sin()], -1).to(dtype)
    rq, rk, rv = apply_rope(q, k, cos, sin, v)
    grads = [torch.randn_like(r) for r in (rq, rk, rv)]
    torch.autograd.backward((rq, rk, rv), grads)

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)

    ref_in = qkv.detach().double().requires_grad_()
    q64, k64, v64 = (blk.view(b, t, -1, d) for blk in ref_in.split([hq * d, hk * d, hk * d], -1))
    c, s_ = cos.double()[:, :, None], sin.double()[:, :, None]
    refs = (q64 * c + rotate_half(q64) * s_, k64 * c + rotate_half(k64) * s_, v64)
    torch.autograd.backward(refs, [g.double() for g in grads])
    exact_v = torch.equal(rv, v) and rv.is_contiguous()
    return {"q": rel_error(rq, refs[0].detach()), "k": rel_error(rk, refs[1].detach()),
            "v_copy": 0.0 if exact_v else 1.0, "dqkv": rel_error(qkv.grad, ref_in.grad)}


def check_swiglu(device, dtype):
    from deltatune.kernels import triton_swiglu as k

    n = 3001  # not a multiple of the block
    g = torch.randn(n, device=device, dtype=dtype) * 3
    u = torch.randn(n, device=device, dtype=dtype)
    dh = torch.randn(n, device=device, dtype=dtype)
    h = k.swiglu_forward(g, u)
    g0, u0 = g.clone(), u.clone()
    h2, dg, du = k.swiglu_backward(dh.clone(), g, u)
    assert torch.equal(g, g0) and torch.equal(u, u0)  # inputs untouched
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    ref = torch.nn.functional.silu(g64) * u64
    ref.backward(dh.double())
    return {"h": rel_error(h, ref.detach()), "h_recomputed": rel_error(h2, ref.detach()),
            "dg": rel_error(dg, g64.grad), "du": rel_error(du, u64.grad)}


def check_swiglu_lora(device, dtype):
    """The LoRA MLP's SwiGLU: low-rank terms added in the kernel, g/u column blocks of one tensor; the
    backward's sums dB_g, dB_u, dA_d over the rows (several programs along them at n = 45)."""
    from deltatune.kernels import triton_swiglu as k

    n, i = 45, 300  # neither a multiple of the tile
    out = {}
    for rg, ru, rd in ((5, 20, 3), (0, 16, 0)):  # ranks padded to 16 / 32 for tl.dot; a projection without
        gu = torch.randn(n, 2 * i, device=device, dtype=dtype) * 2  # an adapter
        g, u = gu[:, :i], gu[:, i:]
        h = torch.randn(n, rg + ru, device=device, dtype=dtype)
        sbg, sbu = (torch.randn(i, r, device=device, dtype=dtype) / 3 for r in (rg, ru))
        gd = torch.randn(n, rd, device=device, dtype=dtype)
        ad = torch.randn(rd, i, device=device, dtype=dtype) / 3
        lora_g = (h[:, :rg], sbg) if rg else None
        lora_u = (h[:, rg:], sbu) if ru else None
        lora_d = (gd, ad) if rd else None
        dh = torch.randn(n, i, device=device, dtype=dtype)
        act = k.swiglu_lora_forward(g, u, lora_g, lora_u)
        gu0, dh0 = gu.clone(), dh.clone()
        dgu, db_g, db_u, da_d = k.swiglu_lora_backward(dh, g, u, lora_g, lora_u, lora_d, scales=(0.5, 3.0))
        assert torch.equal(gu, gu0) and torch.equal(dh, dh0)  # inputs untouched
        assert (db_g is None) == (rg == 0) and (db_u is None) == (ru == 0) and (da_d is None) == (rd == 0)
        g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
        gf = g64 + (h[:, :rg].double() @ sbg.double().T if rg else 0)
        uf = u64 + (h[:, rg:].double() @ sbu.double().T if ru else 0)
        ref = torch.nn.functional.silu(gf) * uf
        ref.backward(dh.double() + (gd.double() @ ad.double() if rd else 0))
        tag = f"_r{rg}_{ru}_{rd}"
        out.update({"act" + tag: rel_error(act, ref.detach()),
                    "dg" + tag: rel_error(dgu[:, :i], g64.grad), "du" + tag: rel_error(dgu[:, i:], u64.grad)})
        if rg:
            out["dB_g" + tag] = rel_error(db_g, 0.5 * g64.grad.T @ h[:, :rg].double())
        if ru:
            out["dB_u" + tag] = rel_error(db_u, 3.0 * u64.grad.T @ h[:, rg:].double())
        if rd:
            out["dA_d" + tag] = rel_error(da_d, gd.double().T @ ref.detach())
    return out


def check_cast(device, dtype):
    """The LoRA factors' cast: 11 sources (two launches of at most 8), scaled, at aligned offsets of one
    buffer; the gaps between them untouched. Exact: each value is one fp32 product rounded once."""
    from deltatune.kernels.functional import cast_into

    shapes = [(16, 300), (300, 16), (5, 7), (1, 1), (16, 2049), (3, 3), (64, 64), (2, 9), (7, 1), (9, 100), (4, 4)]
    srcs = [torch.randn(s, device=device) for s in shapes]
    scales = [1.0, 2.0, 0.3, 1.0, 7.5, 1.0, 0.125, 3.0, 1.0, 1.0, 0.7]
    offsets, total = [], 0
    for t in srcs:
        offsets.append(total)
        total += -(-t.numel() // 8) * 8 + 8  # a gap after each
    dst = _poisoned_like(torch.empty(total, device=device, dtype=dtype))
    before = dst.clone()
    cast_into(dst, srcs, offsets, scales)
    got = torch.cat([dst[o:o + t.numel()] for o, t in zip(offsets, srcs)])
    ref = torch.cat([(t * s).to(dtype).reshape(-1) for t, s in zip(srcs, scales)])
    gaps = torch.ones(total, dtype=torch.bool, device=device)
    for o, t in zip(offsets, srcs):
        gaps[o:o + t.numel()] = False
    untouched = torch.equal(dst[gaps].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                            before[gaps].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    return {"values": 0.0 if torch.equal(got, ref) else rel_error(got, ref) + 1.0, "gaps": 0.0 if untouched else 1.0}


def check_add_many(device, dtype):
    """The graphs' gradient accumulation: 10 fp32 buffers (two launches of at most 8) plus ``dtype``
    gradients, exactly ``_foreach_add_``'s sums; a non-contiguous pair takes the fallback."""
    from deltatune.kernels.functional import add_many_

    shapes = [(16, 300), (300, 16), (5, 7), (1, 1), (16, 2049), (3, 3), (64, 64), (2, 9), (7, 1), (9, 100)]
    dsts = [torch.randn(s, device=device) for s in shapes]
    srcs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    ref = [d + s.float() for d, s in zip(dsts, srcs)]
    add_many_(dsts, srcs)
    wide = torch.randn(4, 10, device=device)
    strided, src = wide[:, :5], torch.randn(4, 5, device=device).to(dtype)
    ref_strided = strided + src.float()
    add_many_([strided], [src])
    exact = all(torch.equal(d, r) for d, r in zip(dsts + [strided], ref + [ref_strided]))
    return {"sums": 0.0 if exact else 1.0 + max(rel_error(d, r) for d, r in zip(dsts, ref))}


def check_cross_entropy(device, dtype):
    from deltatune.kernels import triton_cross_entropy as k

    c, v = 9, 5000  # vocab over one 4096 block: exercises the online max/sum
    z = torch.randn(c, v, device=device, dtype=dtype) * 4
    labels = torch.randint(0, v, (c,), device=device)
    labels[[2, 5]] = -100
    scale = torch.tensor([1.0 / 7], device=device)
    buf = z.clone()
    loss = k.cross_entropy_rows_(buf, labels, scale, -100)
    z64 = z.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(z64, labels, ignore_index=-100, reduction="none")
    ref.sum().mul(1.0 / 7).backward()
    return {"loss": rel_error(loss, ref.detach()), "dz": rel_error(buf, z64.grad)}


def check_linear_cross_entropy(device, dtype):
    """The chunked head + loss through the autograd function (the Triton rows kernel on this device)."""
    from deltatune.kernels import linear_cross_entropy

    n, d, v = 23, 32, 4500
    hid = torch.randn(n, d, device=device, dtype=dtype)
    w = (torch.randn(v, d, device=device) / d ** 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    labels[:3] = -100
    h = hid.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_rows=8)
    loss.backward()
    h64 = hid.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h64 @ w.double().T, labels, ignore_index=-100)
    ref.backward()
    return {"loss": rel_error(loss.detach(), ref.detach()), "dh": rel_error(h.grad, h64.grad)}


def check_lora_mlp(device, dtype):
    """``lora_mlp`` (SwiGLU kernel inside, recomputed in backward) vs float64 autograd."""
    from deltatune.kernels import lora_mlp

    n, d, i, r = 19, 24, 40, 4
    x = torch.randn(n, d, device=device, dtype=dtype)
    ws = [(torch.randn(o, k, device=device) / k ** 0.5).to(dtype) for o, k in ((i, d), (i, d), (d, i))]
    ads = [(torch.randn(r, k, device=device, requires_grad=True), torch.randn(o, r, device=device, requires_grad=True))
           for o, k in ((i, d), (i, d), (d, i))]
    scale = 0.7
    xg = x.clone().requires_grad_()
    y = lora_mlp(xg, *[(w, None, [(a, b, scale)]) for w, (a, b) in zip(ws, ads)])
    dy = torch.randn_like(y)
    y.backward(dy)

    def lin64(t, w, a, b):
        return t @ w.double().T + scale * (t @ a.double().T) @ b.double().T

    x64 = x.double().requires_grad_()
    a64 = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in ads]
    g = lin64(x64, ws[0], *a64[0])
    u = lin64(x64, ws[1], *a64[1])
    ref = lin64(torch.nn.functional.silu(g) * u, ws[2], *a64[2])
    ref.backward(dy.double())
    out = {"y": rel_error(y.detach(), ref.detach()), "dx": rel_error(xg.grad, x64.grad)}
    for j, ((a, b), (a2, b2)) in enumerate(zip(ads, a64)):
        out[f"dA{j}"] = rel_error(a.grad, a2.grad)
        out[f"dB{j}"] = rel_error(b.grad, b2.grad)
    return out


def check_fast_path(device, dtype):
    """A tiny Llama trained one step on the fast path (every kernel on this device) vs float64.

    Returns the loss error and the mean adapter-gradient error, and the plain path's for scale.
    """
    import copy

    import transformers

    import deltatune as dt
    from deltatune.fast import disable_fast_path, enable_fast_path, fused_causal_lm_loss

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], init="random"))
    ids = torch.randint(0, 300, (2, 16), device=device)

    def run(m, fast, checkpoint=True):
        for p in dt.adapter_params(m):
            p.grad = None
        if fast:
            enable_fast_path(m, checkpoint=checkpoint)
        loss = fused_causal_lm_loss(m, ids, ids) if fast else m(input_ids=ids, labels=ids).loss
        loss.backward()
        if fast:
            disable_fast_path(m)
        return loss.detach(), [p.grad for p in dt.adapter_params(m)]

    ref_loss, ref_grads = run(copy.deepcopy(model).double(), False)
    out = {}
    for name, fast, checkpoint in (("plain", False, True), ("fast", True, True), ("fast_nockpt", True, False)):
        loss, grads = run(model, fast, checkpoint)
        out[f"{name}_loss"] = rel_error(loss, ref_loss)
        out[f"{name}_grads"] = sum(rel_error(g, r) for g, r in zip(grads, ref_grads)) / len(grads)
    return out


CHECKS = {f.__name__[len("check_"):]: f for f in (check_rmsnorm, check_rope, check_rope_v, check_swiglu, check_swiglu_lora,
                                                   check_cast, check_add_many, check_cross_entropy,
                                                   check_linear_cross_entropy, check_lora_mlp, check_fast_path)}
# bf16 operands in several chained matmuls: a looser bound than one rounding
EXTRA_TOL = {"lora_mlp": 3e-2, "linear_cross_entropy": 2e-2, "fast_path": 0.15}


def run_checks(device):
    """Every check at fp32 and bf16 on ``device``: {"name/dtype": {output: rel error}}."""
    results = {}
    for name, fn in CHECKS.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)  # fixed inputs: the bf16 error bounds hold for these, not for every draw
            results[f"{name}/{str(dtype)[6:]}"] = fn(device, dtype)
    return results


def _assert_within(name, errs):
    kernel, dtype = name.split("/")
    tol = TOL[getattr(torch, dtype)]
    if dtype == "bfloat16":
        tol = EXTRA_TOL.get(kernel, tol)
    elif kernel in ("linear_cross_entropy", "lora_mlp", "fast_path"):
        tol = 1e-3  # fp32 without tf32, but several accumulated matmuls
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{name}: relative error over {tol}: {bad} (all: {errs})"
    if kernel == "fast_path":  # and about as accurate as the plain path (whose adapters compute in fp32;
        # the fast path's in bf16 measured 0.8-2.1x the plain path's error over seeds)
        assert errs["fast_grads"] <= 3 * errs["plain_grads"] + 1e-2, errs


@pytest.fixture(scope="module")
def interpreted():
    """All checks, run once under TRITON_INTERPRET=1 on CPU tensors in a fresh interpreter."""
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [f"{k}/{d}" for k in CHECKS for d in ("float32", "bfloat16")])
def test_kernel_interpreted_cpu(interpreted, name):
    _assert_within(name, interpreted[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs these interpreted)")
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_gpu(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    for dtype in (torch.float32, torch.bfloat16):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.manual_seed(0)
        _assert_within(f"{name}/{str(dtype)[6:]}", CHECKS[name]("cuda", dtype))


def test_interpreter_catches_a_wrong_kernel(interpreted):
    """The harness itself fails on a wrong answer: the reference of a wrong eps differs measurably."""
    from deltatune.kernels.functional import _rms_ref

    x = torch.randn(5, 64, dtype=torch.float64)
    w = torch.ones(64, dtype=torch.float64)
    assert rel_error(_rms_ref(x, w, 1e-6)[0], _rms_ref(x, w, 1.0)[0]) > 1e-2


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps(run_checks("cpu")))
