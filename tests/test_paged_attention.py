"""Decode attention over the paged KV cache (``deltatune.kernels.paged_attention``): the Triton kernel and the
PyTorch reference against a float64 per-sequence loop, and the serving runner's decode rows through the kernel.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in one subprocess (the interpreter must be chosen before
triton is first imported); on a GPU the same checks run compiled, in process, plus a 1B-like shape in bf16.
Each check returns relative errors ||out - oracle|| / ||oracle||, and flags that must hold.
"""

import json
import os

import pytest
import torch
from _util import assert_errors_within, run_interpreted

from deltatune.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _case(device, dtype, seed=0, lens=(1, 13, 7, 16, 30, 0), Hq=6, Hkv=2, D=24, block_size=4, width=8):
    """q, caches, block tables and lengths of a small paged batch: GQA groups of 3, D not a power of two,
    blocks scattered over the cache, lengths 1 (the query alone), a partly filled last block (13, 7, 30),
    exactly full blocks (16), a padding row (0); unused cache blocks and table padding hold large values,
    so reading a position past a length or outside the window shows."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    num_blocks = B * width + 3
    keys = torch.randn(num_blocks, block_size, Hkv, D, generator=g) * 50  # garbage unless written below
    values = torch.randn(num_blocks, block_size, Hkv, D, generator=g) * 50
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((B, width), int(perm[-1]), dtype=torch.int32)  # padding: a garbage block
    for b, n in enumerate(lens):
        used = -(-n // block_size)
        tables[b, :used] = perm[b * width:b * width + used].int()
        for p in range(n):
            blk, slot = tables[b, p // block_size], p % block_size
            keys[blk, slot] = torch.randn(Hkv, D, generator=g)
            values[blk, slot] = torch.randn(Hkv, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    lens = torch.tensor(lens, dtype=torch.int32)
    return (q.to(device, dtype), keys.to(device, dtype), values.to(device, dtype), tables.to(device), lens.to(device))


def _oracle(q, keys, values, tables, lens, scale, window=None):
    """float64, one sequence at a time: softmax over positions max(0, n - window) .. n - 1, each read through
    the block table, kv heads repeated over their query group; zeros for a length-0 row."""
    B, Hq, D = q.shape
    block_size, Hkv = keys.shape[1], keys.shape[2]
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(lens[b])
        lo = max(0, n - window) if window is not None else 0
        if n == 0:
            continue
        pos = torch.arange(lo, n, device=q.device)
        blocks = tables[b].long()[pos // block_size]
        k = keys[blocks, pos % block_size].double().repeat_interleave(Hq // Hkv, dim=1)  # (n, Hq, D)
        v = values[blocks, pos % block_size].double().repeat_interleave(Hq // Hkv, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v)
    return out


def _rel(got, want):
    return (got.double() - want).norm().item() / want.norm().item()


def check_kernel(device, dtype):
    """The dispatcher (the kernel where Triton runs) against the oracle: windows, one split and several."""
    shapes = {"gqa3": {}, "gqa4_d64": {"Hq": 8, "Hkv": 2, "D": 64, "block_size": 16, "width": 4,
                                        "lens": (1, 40, 64, 17)},
              "mha": {"Hq": 2, "Hkv": 2, "lens": (5, 1, 32)}}
    keep = {torch.float32: 3, torch.bfloat16: 2, torch.float16: 1}.get(dtype, 3)  # the interpreter is slow
    out = {}
    for shape, kw in list(shapes.items())[:keep]:
        q, keys, values, tables, lens = _case(device, dtype, **kw)
        for window in (None, 5):
            want = _oracle(q, keys, values, tables, lens, 0.3, window)
            for split in (None, 8):  # default: one split at these sizes; 8: several, some empty or before the window
                got = paged_decode_attention(q, keys, values, tables, lens, 0.3, window, split_tokens=split)
                name = f"{shape}/window={window}/split={split}"
                out[name] = _rel(got, want)
                out[name + "/dtype_kept"] = got.dtype == dtype and got.shape == q.shape
                empty = (lens == 0).nonzero().flatten()
                out[name + "/empty_row_zero"] = bool((got[empty] == 0).all())
    return out


def check_runner(device, dtype):
    """The serving runner's decode rows against transformers: a GQA Mistral with a sliding window of 5, three
    sequences teacher-forced through a prefill and 4 decode steps, one whose prompt is a single token (its
    first step is a decode row of length 1); the kernel must have run where Triton runs."""
    try:
        import transformers
    except ImportError:
        return {"skipped_without_transformers": True}
    import deltatune
    from deltatune.kernels import backend
    from deltatune.serve.model_runner import Chunk, ModelRunner

    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5)).eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [9, 3, 1]
    seqs = [torch.randint(0, 64, (n + 4,), generator=g).tolist() for n in prompts]
    with torch.no_grad():
        want = [model(torch.tensor([s], device=device)).logits[0].float() for s in seqs]
    runner = ModelRunner(model, deltatune.routed)
    cache = runner.new_cache(num_blocks=16, block_size=4)
    for s, seq in enumerate(seqs):
        cache.reserve(s, len(seq))
    calls, triton_runs = [], backend.triton_enabled(torch.empty(0, device=device))
    if triton_runs:  # count the kernel's launches (the dispatcher looks the function up on each call)
        kernels = backend.load("deltatune.kernels.triton_paged_attention")
        launch = kernels.paged_decode_attention
        kernels.paged_decode_attention = lambda *a, **k: calls.append(1) or launch(*a, **k)
    try:
        errs = []
        got = runner.forward([Chunk(s, seq[:n], 0) for s, (seq, n) in enumerate(zip(seqs, prompts))], cache)
        errs += [(got[s] - want[s][n - 1]).abs().max().item() for s, n in enumerate(prompts)]
        for step in range(4):
            got = runner.forward([Chunk(s, [seq[n + step]], n + step) for s, (seq, n) in enumerate(zip(seqs, prompts))],
                                 cache)
            errs += [(got[s] - want[s][n + step]).abs().max().item() for s, n in enumerate(prompts)]
    finally:
        if triton_runs:
            kernels.paged_decode_attention = launch
    out = {"max_abs_logit_error": max(errs)}
    if triton_runs:
        out["kernel_ran_every_decode_layer"] = len(calls) == 5 * 2  # 5 steps with a decode row x 2 layers
    return out


def check_padding_unread(device, dtype):
    """Table padding and the slots of a last block past its length set to NaN: the output is unchanged, so
    neither is read (decode graphs pad every table to one width with a block id of their own)."""
    out = {}
    for window in (None, 5):
        for split in (None, 8):
            q, keys, values, tables, lens = _case(device, dtype)
            want = paged_decode_attention(q, keys, values, tables, lens, 0.3, window, split_tokens=split)
            block_size = keys.shape[1]
            for b, n in enumerate(lens.tolist()):
                used = -(-n // block_size)
                for blk in tables[b, used:].tolist():  # the padding entries' block
                    keys[blk], values[blk] = float("nan"), float("nan")
                if n % block_size:  # the slots past the length in the last block
                    keys[tables[b, used - 1], n % block_size:] = float("nan")
                    values[tables[b, used - 1], n % block_size:] = float("nan")
            got = paged_decode_attention(q, keys, values, tables, lens, 0.3, window, split_tokens=split)
            name = f"window={window}/split={split}"
            out[name + "/finite"] = bool(torch.isfinite(got).all())
            out[name] = _rel(got, want.double()) if torch.isfinite(got).all() else float("inf")
    return out


def _recorded_splits(kernels, *args, **kw):
    """Run the dispatcher once, recording ``_decode_split``'s grid, its BALANCED flag, the lengths tensor it
    was given and, per (sequence, query head), how many splits saw a position (a finite running max)."""
    seen, kernel = {}, kernels._decode_split

    class Recording:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.update(grid=tuple(grid), balanced=k["BALANCED"], lens=a[13], m=a[16])  # LENS, M
                return kernel[grid](*a, **k)
            return launch

    kernels._decode_split = Recording()
    try:
        out = paged_decode_attention(*args, **kw)
    finally:
        kernels._decode_split = kernel
    busy = torch.isfinite(seen["m"]).sum(-1).cpu() if seen["grid"][2] > 1 else None  # (B, Hq)
    return out, seen, busy


def check_balanced(device, dtype):
    """Splits follow each row's length, not the table's width (decode graphs run every step at the longest
    sequence's width): with the module's sizes scaled down (tiles and splits of 16 positions, 16 programs),
    B=4 rows of 40, 100, 0 and 1 positions in a table of 256 get 2 splits each, and the rows of 40 and 100 use
    both (fixed splits of 128 from the width left each in one program); under a window of 30 the rows spread
    their last 30 positions over both too. DELTATUNE_PAGED_SPLITS=width restores the fixed splits. The
    lengths are read in place from a strided column (no copy). Outputs against the float64 oracle."""
    from deltatune.kernels import backend

    if not backend.triton_enabled(torch.empty(0, device=device)):
        return {"skipped_without_triton": True}
    kernels = backend.load("deltatune.kernels.triton_paged_attention")
    sizes = {"BLOCK_N": 16, "MIN_SPLIT_TOKENS": 16, "TARGET_PROGRAMS": 16}
    saved = {k: getattr(kernels, k) for k in sizes}
    q, keys, values, tables, lens = _case(device, dtype, lens=(40, 100, 0, 1), Hq=4, Hkv=2, D=16, width=64)
    column = torch.stack([lens * 0 + 7, lens, lens * 0 - 3], 1)[:, 1]  # (B,) stride 3, between garbage
    out = {}
    try:
        for k, v in sizes.items():
            setattr(kernels, k, v)
        for mode, window, want_busy in (("length", None, [2, 2, 0, 1]), ("length", 30, [2, 2, 0, 1]),
                                        ("width", None, [1, 1, 0, 1])):
            os.environ["DELTATUNE_PAGED_SPLITS"] = mode
            got, seen, busy = _recorded_splits(kernels, q, keys, values, tables, column, 0.3, window)
            name = f"{mode}/window={window}"
            out[name] = _rel(got, _oracle(q, keys, values, tables, lens, 0.3, window))
            out[name + "/grid"] = seen["grid"] == (4, 2, 2) and seen["balanced"] == (mode == "length")
            out[name + "/busy_splits"] = busy is not None and busy.tolist() == [[n] * 4 for n in want_busy]
            out[name + "/lens_in_place"] = seen["lens"].data_ptr() == column.data_ptr()
    finally:
        os.environ.pop("DELTATUNE_PAGED_SPLITS", None)
        for k, v in saved.items():
            setattr(kernels, k, v)
    return out


CHECKS = {"kernel": check_kernel, "runner": check_runner, "padding": check_padding_unread,
          "balanced": check_balanced}
DTYPES = {"kernel": (torch.float32, torch.float16, torch.bfloat16), "runner": (torch.float32,),
          "padding": (torch.float32,), "balanced": (torch.float32,)}


def run_checks(device):
    out = {}
    for name, check in CHECKS.items():
        for dtype in DTYPES[name]:
            out[f"{name}/{str(dtype)[6:]}"] = check(device, dtype)
    return out


def _assert_within(name, errs):
    dtype = getattr(torch, name.split("/")[-1])
    tol = 1e-4 if name.startswith("runner") else TOL[dtype]  # runner: logits, as tests/test_serve_engine.py
    assert_errors_within(name, errs, tol)


@pytest.fixture(scope="module")
def interpreted():
    """All checks, run once under TRITON_INTERPRET=1 on CPU tensors in a fresh interpreter."""
    pytest.importorskip("triton")
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [f"{k}/{str(d)[6:]}" for k in CHECKS for d in DTYPES[k]])
def test_paged_attention_interpreted_cpu(interpreted, name):
    _assert_within(name, interpreted[name])


def test_reference_equals_the_oracle_and_the_harness_can_fail():
    """The PyTorch reference (what runs on CPU) equals the float64 loop; a wrong window is far over the
    tolerance, so the checks above can fail."""
    for window in (None, 5, 100):
        q, keys, values, tables, lens = _case("cpu", torch.float32)
        want = _oracle(q, keys, values, tables, lens, 0.3, window)
        got = paged_decode_attention_reference(q, keys, values, tables, lens, 0.3, window)
        assert _rel(got, want) < 1e-5, window
        assert bool((got[lens == 0] == 0).all())
    wrong = paged_decode_attention_reference(q, keys, values, tables, lens, 0.3, 6)
    assert _rel(wrong, _oracle(q, keys, values, tables, lens, 0.3, 5)) > 0.1
    wrong = paged_decode_attention_reference(q, keys, values, tables, lens + (lens > 0).int(), 0.3)
    assert _rel(wrong, _oracle(q, keys, values, tables, lens, 0.3)) > 0.1  # one garbage position read


def test_reference_reads_no_padding():
    """The reference (what runs on CPU): NaN in the table padding and past each length changes nothing."""
    _assert_within("padding/float32", check_padding_unread("cpu", torch.float32))


def test_bad_inputs_raise_naming_what():
    q, keys, values, tables, lens = _case("cpu", torch.float32)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, keys, values, tables.long(), lens, 0.3)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_attention(q[:, :5], keys, values, tables, lens, 0.3)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, keys, values, tables, lens[:-1], 0.3)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q.double(), keys, values, tables, lens, 0.3)
    with pytest.raises(ValueError, match="window"):
        paged_decode_attention(q, keys, values, tables, lens, 0.3, window=0)


def test_launch_plan_at_the_1b_shape_follows_the_rows_not_the_width(monkeypatch):
    """Decode graphs' one width at the 1B bench (8192 positions, 8 kv heads): the default splits come from the
    rows alone, each at least 256 positions of a row's own length (balanced on the device); the width's fixed
    splits (DELTATUNE_PAGED_SPLITS=width, the behaviour before) were 2048 positions at 16 rows, so a 600-token
    row ran in one program. An explicit split_tokens stays fixed; a bad mode raises."""
    pytest.importorskip("triton")
    from deltatune.kernels import backend

    kernels = backend.load("deltatune.kernels.triton_paged_attention")
    rows = (1, 2, 4, 8, 16, 32, 64, 128)
    assert [kernels.launch_plan(b, 8, 8192) for b in rows] == \
        [(s, 256, True) for s in (32, 32, 16, 8, 4, 2, 1, 1)]
    assert kernels.launch_plan(16, 8, 8192, split_tokens=100) == (82, 100, False)
    monkeypatch.setenv("DELTATUNE_PAGED_SPLITS", "width")
    assert [kernels.launch_plan(b, 8, 8192)[1:] for b in rows] == \
        [(t, False) for t in (256, 256, 512, 1024, 2048, 4096, 8192, 8192)]
    monkeypatch.setenv("DELTATUNE_PAGED_SPLITS", "rows")
    with pytest.raises(ValueError, match="DELTATUNE_PAGED_SPLITS"):
        kernels.launch_plan(16, 8, 8192)


def test_blocks_bucket_is_the_next_power_of_two():
    from deltatune.serve.model_runner import blocks_bucket

    assert [blocks_bucket(w) for w in (1, 2, 3, 4, 5, 8, 9, 100, 128)] == [1, 2, 4, 4, 8, 8, 16, 128, 128]


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU runs these interpreted)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    pytest.importorskip("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CHECKS))
def test_paged_attention_gpu(name):
    _gpu()
    for dtype in DTYPES[name]:
        _assert_within(f"{name}/{str(dtype)[6:]}", CHECKS[name]("cuda", dtype))


@pytest.mark.gpu
def test_paged_attention_gpu_1b_shape_bf16():
    """A 1B-like decode batch (B=64, Hq=32, Hkv=8, D=64, blocks of 16, contexts 1 .. 2048, a table width of
    128): the kernel against the bf16 reference and both against the float64 oracle, with the default
    split (one at this B), forced splits of 256, and B=4 (several splits by default); with a window too."""
    _gpu()
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, block_size, width = 64, 32, 8, 64, 16, 128
    lens = torch.randint(1, width * block_size + 1, (B,), generator=g)
    lens[:3] = torch.tensor([1, width * block_size, block_size + 1])
    num_blocks = B * width + 1
    keys = torch.randn(num_blocks, block_size, Hkv, D, generator=g).cuda().bfloat16()
    values = torch.randn(num_blocks, block_size, Hkv, D, generator=g).cuda().bfloat16()
    tables = torch.randperm(num_blocks, generator=g)[:B * width].view(B, width).int().cuda()
    q = torch.randn(B, Hq, D, generator=g).cuda().bfloat16()
    lens = lens.int().cuda()
    scale = D ** -0.5
    for rows, window, split in ((B, None, None), (B, None, 256), (4, None, None), (B, 700, None)):
        args = (q[:rows], keys, values, tables[:rows], lens[:rows], scale)
        want = _oracle(*args, window=window)
        got = paged_decode_attention(*args, window=window, split_tokens=split)
        ref = paged_decode_attention_reference(*args, window=window)
        where = f"B={rows} window={window} split={split}"
        assert got.dtype == torch.bfloat16 and got.shape == (rows, Hq, D), where
        assert _rel(ref, want) < TOL[torch.bfloat16], where
        assert _rel(got, want) < TOL[torch.bfloat16], (where, _rel(got, want))
        assert (got.float() - ref.float()).abs().max().item() < 0.05, where  # values are O(1); bf16 steps 2^-8


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps(run_checks("cpu")))
