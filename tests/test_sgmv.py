"""The segmented mixed-adapter kernels (``deltatune.kernels.sgmv``: SGMV for prefill, and the dispatcher) against a
float64 reference, and the pool on the kernels. The gathered decode kernels: tests/test_bgmv.py.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (the interpreter must be chosen
before triton is first imported); on a GPU the same checks run compiled, in process. Each check returns
relative errors ||out - ref|| / ||ref - y|| of the added terms, and whether base tokens came back untouched.
"""

import copy
import json
import os
import tempfile

import _models
import pytest
import torch
from _mixed_lora import assert_within, mixed_case, mixed_reference, pool_of_three, recorded_grids
from _util import run_interpreted

triton = pytest.importorskip("triton")


def check_kernels(device, dtype):
    from deltatune.kernels import sgmv
    from deltatune.serve.lora_mixed import mixed_lora, slot_batch

    out = {}
    for decode in (False, True):
        x, y, A, B, scales, slots = mixed_case(device, dtype, decode, seed=int(decode))
        ref = mixed_reference(x, y, A, B, scales, slots)
        denom = (ref - y.double()).norm().item()
        base = [t for t, s in enumerate(slots) if s < 0]
        for block_m in (16, 64, 128):
            batch = slot_batch(slots, device, block_m=block_m)
            runs = {"sgmv": lambda: sgmv.sgmv(x, y.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m),
                    "bgmv": lambda: sgmv.bgmv(x, y.clone(), A, B, scales, batch.slots)}
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


def check_split(device, dtype):
    """The split-K shrink: K = 300 (5 blocks of 64, not a multiple of any split), ranks 40, 8, 17 and 0 zero-padded
    to R = 40, base tokens, slots 3 and 5 absent from the batch, a 40-token segment (3 tiles of 16, or one of 64),
    300 outputs (3 blocks of 128: with two blocks a program, the expand's last program runs past the end). SPLIT
    from the heuristic, from ``DELTATUNE_SGMV_SPLIT``, forced to 1 (the one-pass shrink), to 3, and to 100 (clamped
    to one split per block of K): each against float64, with the launch grids recorded (the splits really ran),
    and a split-K run equal to itself run to run."""
    from deltatune.kernels import sgmv
    from deltatune.serve.lora_mixed import slot_batch

    g = torch.Generator().manual_seed(11)
    S, R, K, N = 6, 40, 300, 300
    ranks = [40, 8, 17, 40, 0, 40]
    A = torch.randn(S, R, K, generator=g) / K ** 0.5
    B = torch.randn(S, N, R, generator=g)
    for s, r in enumerate(ranks):
        A[s, r:], B[s, :, r:] = 0, 0
    slots = [[-1, 0, 1, 2, 4][i] for i in torch.randint(0, 5, (70,), generator=g).tolist()]
    slots[10:50] = [0] * 40
    T = len(slots)
    x, y = torch.randn(T, K, generator=g).to(device), torch.randn(T, N, generator=g).to(device)
    A, B = A.to(device, dtype), B.to(device, dtype)
    scales = (torch.rand(S, generator=g) + 0.5).to(device)
    ref = mixed_reference(x, y, A, B, scales, slots)
    denom = (ref - y.double()).norm().item()
    base = [t for t, s in enumerate(slots) if s < 0]
    out = {}
    with recorded_grids(sgmv, ("_sgmv_shrink", "_sgmv_expand")) as grids:
        sms = sgmv._sm_count(torch.device(device))  # 4 off CUDA: the heuristic gives 1 at 16-token tiles, 2 at 64
        for block_m in (16, 64):
            batch = slot_batch(slots, device, block_m=block_m)
            tiles = batch.tiles.shape[0]
            want = {"heuristic": sgmv.shrink_split(tiles, 5, sms), "one_pass": 1, "three": 3, "clamped": 5, "env": 2}
            if sms == 4:
                assert want["heuristic"] == (1 if block_m == 16 else 2)
            # 300 outputs are 3 blocks of 128; on 4 multiprocessors 16-token tiles give each program 2 of them
            expand = (tiles, -(-3 // sgmv.expand_tiles(tiles, 3, sms)))
            runs = {"heuristic": None, "one_pass": 1, "three": 3, "clamped": 100, "env": None}
            got = {}
            for name, split in runs.items():
                if name == "env":
                    os.environ["DELTATUNE_SGMV_SPLIT"] = "2"
                try:
                    got[name] = sgmv.sgmv(x, y.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m,
                                          split=split)
                finally:
                    os.environ.pop("DELTATUNE_SGMV_SPLIT", None)
                out[f"bm{block_m}/{name}/split_ran"] = grids["_sgmv_shrink"] == (tiles, want[name])
                out[f"bm{block_m}/{name}/expand_grid"] = grids["_sgmv_expand"] == expand
            for name, value in got.items():
                out[f"bm{block_m}/{name}"] = (value.double() - ref).norm().item() / denom
                out[f"bm{block_m}/{name}/base_untouched"] = bool(torch.equal(value[base], y[base]))
            again = sgmv.sgmv(x, y.clone(), A, B, scales, batch.order, batch.tiles, batch.block_m, split=3)
            out[f"bm{block_m}/deterministic"] = bool(torch.equal(again, got["three"]))
    return out


def check_pool(device, dtype):
    """The pool through the kernels equals the pool through the PyTorch reference, on a tiny Llama: a prefill
    layout (SGMV), decode layouts (the one-launch gathered kernel: one token per row, two tokens per row, rows
    routed per token) with ranks 4 and 8 padded to 8 and adapter "b" absent from most layers (rank 0 there).
    Forced gathered (``routed(..., gathered=True)``, a graphed decode step): the two-phase kernels, equal to the
    reference in every layout and, in decode layouts, to the eager step's logits bit for bit."""
    from deltatune.kernels import backend

    vocab = _models.VOCAB
    gen = torch.Generator().manual_seed(1)
    layouts = {"prefill": (["a", None, "b", "a"], (4, 5), False),
               "decode": (["a", None, "b", "c", "a"], (5, 1), True),
               "decode2": (["b", "a", None], (3, 2), True),
               "per_token": (["b", None, "a", "c", "b", "a"], (1, 6), True)}
    sgmv = backend.load("deltatune.kernels.sgmv")
    launches = []
    launch = sgmv.Bgmv.__call__
    out = {}
    with tempfile.TemporaryDirectory() as root:
        base, pool = pool_of_three(device, dtype, root)
        sgmv.Bgmv.__call__ = lambda self, *a, **k: (launches.append(a[4] if len(a) > 4 else k.get("phases", 1)),
                                                     launch(self, *a, **k))[1]
        try:
            for case, (rows, shape, gathered) in layouts.items():
                ids = torch.randint(0, vocab, shape, generator=gen).to(device)
                launches.clear()
                with torch.no_grad(), pool.routed(base, rows):
                    kernels = base(input_ids=ids).logits
                out[f"pool/{case}/gathered_kernel_ran={gathered}"] = bool(launches) == gathered
                mode = os.environ.get("DELTATUNE_TRITON")
                os.environ["DELTATUNE_TRITON"] = "0"  # read once per routed call
                try:
                    with torch.no_grad(), pool.routed(base, rows):
                        reference = base(input_ids=ids).logits
                finally:
                    os.environ["DELTATUNE_TRITON"] = mode if mode is not None else "1"
                plain = base(input_ids=ids).logits
                out[f"pool/{case}"] = ((kernels.double() - reference.double()).norm().item()
                                       / reference.double().norm().item())
                out[f"pool/{case}/adapters_change_logits"] = (reference - plain).abs().max().item() > 1e-3
                # forced gathered (a graphed decode step): the two-phase kernels, for any layout
                launches.clear()
                with torch.no_grad(), pool.routed(base, rows, gathered=True):
                    graphed = base(input_ids=ids).logits
                out[f"pool/{case}/gathered"] = ((graphed.double() - reference.double()).norm().item()
                                                / reference.double().norm().item())
                out[f"pool/{case}/gathered/two_phases_ran"] = bool(launches) and set(launches) == {2}
                if gathered:  # the same logits, bit for bit, as the eager step's one-launch kernel
                    out[f"pool/{case}/gathered/bitwise_eager"] = bool(torch.equal(graphed, kernels))
            # a routed call inside another with as many rows (on a copy of the model) keeps the outer one's slots
            rows, inner_rows = ["a", None, "b", "c", "a"], ["c", "b", "a", None, "c"]
            ids = torch.randint(0, vocab, (5, 1), generator=gen).to(device)
            other = copy.deepcopy(base)
            with torch.no_grad():
                with pool.routed(base, rows):
                    before = base(input_ids=ids).logits
                    with pool.routed(other, inner_rows):
                        inner = other(input_ids=ids).logits
                    after = base(input_ids=ids).logits
                with pool.routed(other, inner_rows):
                    inner_alone = other(input_ids=ids).logits
            out["pool/nested/outer_slots_kept"] = bool(torch.equal(before, after))
            out["pool/nested/inner_right"] = bool(torch.equal(inner, inner_alone))
            out["pool/nested/rows_differ"] = not torch.equal(before, inner)
        finally:
            sgmv.Bgmv.__call__ = launch
    return out


CHECKS = {"kernels": check_kernels, "split": check_split, "pool": check_pool}


def run_checks(device):
    out = {}
    for name, check in CHECKS.items():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            out[f"{name}/{str(dtype)[6:]}"] = check(device, dtype)
    return out


@pytest.fixture(scope="module")
def interpreted():
    """All checks, run once under TRITON_INTERPRET=1 on CPU tensors in a fresh interpreter."""
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [f"{k}/{d}" for k in CHECKS for d in ("float32", "bfloat16")])
def test_sgmv_interpreted_cpu(interpreted, name):
    assert_within(name, interpreted[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs these interpreted)")
@pytest.mark.parametrize("name", list(CHECKS))
def test_sgmv_gpu(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        assert_within(f"{name}/{str(dtype)[6:]}", CHECKS[name]("cuda", dtype))


def test_split_heuristics_follow_their_rules():
    """``shrink_split``: the smallest power of two giving >= 1.5 programs a multiprocessor unless capped (16; >= 2
    blocks of K a split); ``expand_tiles``: the largest power of two of output blocks a program leaving >= 3
    programs a multiprocessor. Over tile counts from one to thousands, on the interpreter's 4 and an H200's 132."""
    from deltatune.kernels.sgmv import expand_tiles, shrink_split

    for sms in (4, 132):
        for n_tiles in (1, 3, 16, 64, 128, 1000):
            for k_blocks in (1, 2, 5, 32, 128):
                split = shrink_split(n_tiles, k_blocks, sms)
                assert split & (split - 1) == 0 and 1 <= split <= 16, (sms, n_tiles, k_blocks, split)
                assert split == 1 or k_blocks >= 2 * split, (sms, n_tiles, k_blocks, split)
                assert split == 1 or 2 * n_tiles * (split // 2) < 3 * sms, (sms, n_tiles, k_blocks, split)  # smallest
                capped = split == 16 or k_blocks < 4 * split
                assert capped or 2 * n_tiles * split >= 3 * sms, (sms, n_tiles, k_blocks, split)
            for n_blocks in (1, 3, 4, 16, 64):
                per = expand_tiles(n_tiles, n_blocks, sms)
                assert per & (per - 1) == 0 and 1 <= per <= n_blocks, (sms, n_tiles, n_blocks, per)
                assert per == 1 or n_tiles * -(-n_blocks // per) >= 3 * sms, (sms, n_tiles, n_blocks, per)
                assert 2 * per > n_blocks or n_tiles * -(-n_blocks // (2 * per)) < 3 * sms, (sms, n_tiles, n_blocks)
    # issue 18's prefill (16 x 512 tokens in tiles of 128) on an H200: 64 tiles x 4 splits, about 2 a multiprocessor
    assert 64 * shrink_split(64, 2048 // 64, 132) == 256


def test_split_rejects_bad_values(monkeypatch):
    """A split that is not a positive integer, as an argument or in ``DELTATUNE_SGMV_SPLIT``, is refused before any
    launch, naming what was wrong."""
    from deltatune.kernels import sgmv
    from deltatune.serve.lora_mixed import slot_batch

    x, y, A, B, scales, slots = mixed_case("cpu", torch.float32, decode=False, seed=0)
    batch = slot_batch(slots, "cpu", block_m=16)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="split must be a positive integer"):
            sgmv.sgmv(x, y, A, B, scales, batch.order, batch.tiles, batch.block_m, split=bad)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DELTATUNE_SGMV_SPLIT", bad)
        with pytest.raises(ValueError, match="DELTATUNE_SGMV_SPLIT must be a positive integer"):
            sgmv.sgmv(x, y, A, B, scales, batch.order, batch.tiles, batch.block_m)


def test_reference_catches_a_wrong_answer():
    """The harness fails on a wrong answer: dropping one token's term is far over the tolerance."""
    from deltatune.serve.lora_mixed import mixed_lora_reference, slot_batch

    x, y, A, B, scales, slots = mixed_case("cpu", torch.float32, decode=True, seed=0)
    ref = mixed_reference(x, y, A, B, scales, slots)
    wrong = list(slots)
    wrong[1] = -1
    got = mixed_lora_reference(x, y, A, B, scales, slot_batch(wrong, "cpu"))
    assert (got.double() - ref).norm().item() / (ref - y.double()).norm().item() > 0.1
    got = mixed_lora_reference(x, y, A, B, scales, slot_batch(slots, "cpu"))
    assert (got.double() - ref).norm().item() / (ref - y.double()).norm().item() < 1e-6


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps(run_checks("cpu")))
