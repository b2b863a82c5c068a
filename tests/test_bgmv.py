"""The gathered mixed-adapter decode kernels (``deltatune.kernels.sgmv.Bgmv``: one launch, or the two phases of
``deltatune.kernels.bgmv_split`` for graphed steps) against a float64 reference and each other, the host work of a
pooled decode step, and a decode step replayed from a CUDA graph.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (tests/test_sgmv.py says why); on a GPU the
same checks run compiled, in process.
"""

import copy
import json
import os
import tempfile
from collections import Counter

import _models
import pytest
import torch
from _mixed_lora import assert_within, mixed_case, mixed_reference, pool_of_three, recorded_grids
from _util import run_interpreted
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")


def check_bgmv(device, dtype):
    """The one-launch gathered kernel: per-slot ranks read from the device (factors beyond a slot's rank are
    not zero here, so reading them would show), a slot of rank 0 (absent on this layer: its tokens are left as
    the base's), base tokens (-1), 3-D inputs with several tokens per slot entry, several output blocks per
    program, and the ``Bgmv`` launch object reused for a second batch size."""
    from deltatune.kernels import sgmv

    g = torch.Generator().manual_seed(7)
    S, R, K, N = 5, 24, 72, 600  # N over one output block: programs loop over several
    A = (torch.randn(S, R, K, generator=g) / K ** 0.5).to(device, dtype)
    B = torch.randn(S, N, R, generator=g).to(device, dtype)
    scales = (torch.rand(S, generator=g) + 0.5).to(device)
    ranks = [24, 5, 0, 16, 1]
    table = torch.tensor(ranks, dtype=torch.int32, device=device)
    layer = sgmv.Bgmv(A, B, scales, table)
    out = {}
    cases = {"tokens": ([3, -1, 0, 1, 2, 4, -1, 3, 1, 0], 1, None),  # (T, in), one slot per token
             "rows": ([1, -1, 4, 0], 2, 2),  # (rows, 2, in): each slot entry covers a row's 2 tokens
             "all_base": ([-1, -1, -1], 1, None)}
    for name, (entries, per_row, row_len) in cases.items():
        T = len(entries) * per_row
        x = torch.randn(T, K, generator=g).to(device)
        y = torch.randn(T, N, generator=g).to(device)
        token_slots = [s for s in entries for _ in range(per_row)]
        ref = mixed_reference(x, y, A, B, scales, token_slots, ranks)
        slots = torch.tensor(entries, dtype=torch.int32, device=device)
        if row_len is None:
            got = layer(x, y.clone(), slots, per_row)
        else:
            got = layer(x.view(-1, row_len, K), y.clone().view(-1, row_len, N), slots, per_row).view(T, N)
        untouched = [t for t, s in enumerate(token_slots) if s < 0 or ranks[s] == 0]
        out[f"bgmv/{name}/base_untouched"] = bool(torch.equal(got[untouched], y[untouched]))
        denom = (ref - y.double()).norm().item()
        if denom > 0:
            out[f"bgmv/{name}"] = (got.double() - ref).norm().item() / denom
    # the plain function: every slot at its full (zero-padded) rank
    x, y, A2, B2, scales2, slots = mixed_case(device, dtype, decode=True, seed=3)
    ref = mixed_reference(x, y, A2, B2, scales2, slots)
    got = sgmv.bgmv(x, y.clone(), A2, B2, scales2, torch.tensor(slots, dtype=torch.int32, device=device))
    out["bgmv/function"] = (got.double() - ref).norm().item() / (ref - y.double()).norm().item()
    return out


def check_bgmv_phases(device, dtype):
    """The two-phase gathered kernels (split-K shrink, then expand) against float64 and against the one launch:
    K = 600 (5 blocks of 128 at R = 40, the last partly masked), ranks 40, 8, 17, 0, 3 and 40 of R = 40 with
    nonzero factors past each rank (reading them would show), base tokens (-1), a slot of rank 0 on the layer,
    3-D inputs with 2 tokens a slot entry, all-base rows, 300 outputs (3 blocks of 128). SPLIT 1, 3 (ranges of
    2, 2 and 1 blocks), 100 (clamped to 5) and the heuristic's 2 (3 and 2 blocks), each with its launch grids
    recorded. Bit for bit the one-launch output for the same SPLIT (the same arithmetic in the same order; a
    range of several blocks summed apart differs in fp32 from one running sum, so this can fail)."""
    from deltatune.kernels import sgmv

    g = torch.Generator().manual_seed(17)
    S, R, K, N = 6, 40, 600, 300
    ranks = [40, 8, 17, 0, 3, 40]
    A = (torch.randn(S, R, K, generator=g) / K ** 0.5).to(device, dtype)
    B = torch.randn(S, N, R, generator=g).to(device, dtype)
    scales = (torch.rand(S, generator=g) + 0.5).to(device)
    table = torch.tensor(ranks, dtype=torch.int32, device=device)
    cases = {"tokens": ([3, -1, 0, 1, 2, 4, -1, 5, 1, 0, 2], 1, None),
             "rows": ([1, -1, 4, 0, 3], 2, 2),
             "all_base": ([-1, -1, -1], 1, None)}
    out = {}
    with recorded_grids(sgmv, ("bgmv_shrink", "bgmv_expand")) as grids:
        for forced, want in ((1, 1), (3, 3), (100, 5), (None, sgmv.decode_split(5))):
            layer = sgmv.Bgmv(A, B, scales, table, split=forced)
            tag = f"split{forced or 'auto'}"
            out[f"{tag}/split"] = layer.split == want
            for name, (entries, per_row, row_len) in cases.items():
                T = len(entries) * per_row
                x = torch.randn(T, K, generator=g).to(device)
                y = torch.randn(T, N, generator=g).to(device)
                token_slots = [s for s in entries for _ in range(per_row)]
                slots = torch.tensor(entries, dtype=torch.int32, device=device)
                got = {}
                for phases in (1, 2):
                    grids.clear()
                    if row_len is None:
                        got[phases] = layer(x, y.clone(), slots, per_row, phases)
                    else:
                        got[phases] = layer(x.view(-1, row_len, K), y.clone().view(-1, row_len, N), slots, per_row,
                                            phases).view(T, N)
                    if phases == 2:
                        expand = (T, -(-3 // sgmv.expand_tiles(T, 3, layer._sms)))
                        out[f"{tag}/{name}/grids"] = grids == {"bgmv_shrink": (T, want), "bgmv_expand": expand}
                    else:
                        out[f"{tag}/{name}/one_launch_ran_nothing_else"] = not grids
                untouched = [t for t, s in enumerate(token_slots) if s < 0 or ranks[s] == 0]
                out[f"{tag}/{name}/base_untouched"] = bool(torch.equal(got[2][untouched], y[untouched]))
                out[f"{tag}/{name}/bitwise_one_launch"] = bool(torch.equal(got[1], got[2]))
                ref = mixed_reference(x, y, A, B, scales, token_slots, ranks)
                denom = (ref - y.double()).norm().item()
                if denom > 0:
                    out[f"{tag}/{name}"] = (got[2].double() - ref).norm().item() / denom
    # the partials buffer: allocated on a token count's first call, the same one on every later call; shared
    # with a layer of the same workspace needing no more, replaced for one needing more (the first keeps its own)
    workspace = {}
    first = sgmv.Bgmv(A, B, scales, table, split=2, workspace=workspace)
    x, y = torch.randn(4, K, generator=g).to(device), torch.randn(4, N, generator=g).to(device)
    slots = torch.tensor([0, 2, -1, 5], dtype=torch.int32, device=device)
    first(x, y.clone(), slots, 1, 2)
    h = first._launches[(x.shape, y.shape, slots.shape, 1, 2)][2]
    again = first(x, y.clone(), slots, 1, 2)
    out["buffer/shape"] = tuple(h.shape) == (2, 4, R)
    out["buffer/kept"] = first._launches[(x.shape, y.shape, slots.shape, 1, 2)][2].data_ptr() == h.data_ptr()
    out["buffer/one_per_token_count"] = list(workspace) == [4]
    smaller = sgmv.Bgmv(A[:, :8].contiguous(), B[:, :, :8].contiguous(), scales, None, split=1, workspace=workspace)
    smaller(x, y.clone(), slots, 1, 2)
    out["buffer/shared"] = smaller._launches[(x.shape, y.shape, slots.shape, 1, 2)][2].data_ptr() == h.data_ptr()
    larger = sgmv.Bgmv(A, B, scales, table, split=3, workspace=workspace)
    larger(x, y.clone(), slots, 1, 2)
    out["buffer/grown"] = workspace[4].data_ptr() != h.data_ptr() and workspace[4].numel() == 3 * 4 * R
    out["buffer/first_keeps_its_own"] = bool(torch.equal(first(x, y.clone(), slots, 1, 2), again))
    return out


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run under it (allocations, views and copies too)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def check_decode_host_work(device, dtype):
    """A decode step through the pool: each pooled projection is one launch of the gathered kernel (eager) or
    two, the shrink and the expand (forced gathered: a step being captured as a CUDA graph), and no torch op
    (no allocation, copy or view beyond the base model's own; the two-phase partials are allocated by the
    first step only); entering ``routed`` is one upload. On CPU the kernels are counting stubs (the
    interpreter's own tensor traffic would count); on a GPU they run, under
    ``torch.cuda.set_sync_debug_mode("error")`` (a host read of the device would raise)."""
    from deltatune.kernels import backend

    sgmv = backend.load("deltatune.kernels.sgmv")
    names = ("_bgmv", "bgmv_shrink", "bgmv_expand")
    kernels, calls, launches = {n: getattr(sgmv, n) for n in names}, [], []

    class Counting:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            launches.append(self.name)
            return (lambda *a, **k: None) if device == "cpu" else kernels[self.name][grid]

    launch = sgmv.Bgmv.__call__
    ids = torch.randint(0, _models.VOCAB, (4, 1), generator=torch.Generator().manual_seed(2)).to(device)
    rows = ["a", None, "b", "c"]
    with tempfile.TemporaryDirectory() as root:
        base, pool = pool_of_three(device, dtype, root)
    for n in names:
        setattr(sgmv, n, Counting(n))
    sgmv.Bgmv.__call__ = lambda self, *a, **k: (calls.append(1), launch(self, *a, **k))[1]

    def ops(fn):
        with _CountOps() as counter:
            fn()
        return counter.ops

    out = {}
    try:
        for tag, gathered, kernel_names in (("", False, ["_bgmv"]), ("graphed/", True, ["bgmv_shrink", "bgmv_expand"])):
            def step():
                with pool.routed(base, rows, gathered=gathered):
                    return base(input_ids=ids).logits

            def enter():
                with pool.routed(base, rows, gathered=gathered):
                    pass

            with torch.no_grad():
                step()  # slots loaded, the table (and the partials) allocated, kernels compiled
                calls.clear(), launches.clear()
                extra = ops(step)
                projections, launched = len(calls), list(launches)
                extra.subtract(ops(lambda: base(input_ids=ids)))
                extra.subtract(ops(enter))
                synced = False
                if device != "cpu":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        step()
                    except RuntimeError:
                        synced = True
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            out[f"host/{tag}every_pooled_projection_gathered"] = projections == len(pool.planned_shapes()) > 0
            out[f"host/{tag}launches_per_projection"] = launched == kernel_names * projections
            out[f"host/{tag}no_torch_ops_per_projection"] = not {k: v for k, v in extra.items() if v}
            out[f"host/{tag}no_sync"] = not synced
    finally:
        for n in names:
            setattr(sgmv, n, kernels[n])
        sgmv.Bgmv.__call__ = launch
    return out


CHECKS = {"bgmv": check_bgmv, "phases": check_bgmv_phases, "host": check_decode_host_work}


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
def test_bgmv_interpreted_cpu(interpreted, name):
    assert_within(name, interpreted[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs these interpreted)")
@pytest.mark.parametrize("name", list(CHECKS))
def test_bgmv_gpu(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        assert_within(f"{name}/{str(dtype)[6:]}", CHECKS[name]("cuda", dtype))


class _Projections(torch.nn.Module):
    """Three projections with no host work of their own between them (a CUDA graph captures them whole)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.up_proj = torch.nn.Linear(32, 48), torch.nn.Linear(32, 64)
        self.down_proj = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.up_proj(x))) + self.q_proj(x)[..., :32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
@pytest.mark.parametrize("phases", [1, 2])
def test_pool_decode_step_replays_as_a_cuda_graph(tmp_path, phases):
    """A decode step's pooled projections capture into a CUDA graph (one launch each, or the shrink and the
    expand with ``phases`` 2; no host read, shapes fixed by the row count), and the graph replayed after
    ``routed`` wrote other rows' slots into the same table gives what the eager step gives for those rows."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; CUDA graphs need compiled kernels")
    import deltatune as dt
    from deltatune.serve import AdapterPool

    torch.manual_seed(0)
    base = _Projections().cuda().to(torch.bfloat16).eval()
    pool = AdapterPool(base)
    for name, r, targets in (("a", 4, ["q_proj", "up_proj", "down_proj"]), ("b", 16, ["q_proj"]),
                             ("c", 8, ["up_proj", "down_proj"])):
        dt.save_adapter(dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=r, alpha=2 * r, targets=targets,
                                                                          init="random")), tmp_path / name)
        pool.register(name, tmp_path / name)
    x = torch.randn(6, 32, device="cuda", dtype=torch.bfloat16)  # (T, hidden): the engine's decode layout
    first, second = ["a", None, "b", "c", "a", "b"], ["c", "c", None, "a", "b", None]
    with torch.no_grad():
        with pool.routed(base, first, phases=phases):
            for _ in range(3):  # kernels compiled, cuBLAS warm, partials allocated, outside the capture
                base(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = base(x)
        wants = {}
        for name, rows in (("first", first), ("second", second)):
            with pool.routed(base, rows):
                wants[name] = base(x).clone()
        for name, rows in (("second", second), ("first", first)):
            with pool.routed(base, rows):  # writes the rows' slots where the graph reads them
                graph.replay()
                got = out.clone()
            # same kernels on the same inputs; 1e-2 leaves room for cuBLAS picking another bf16 algorithm in capture
            assert (got - wants[name]).abs().max().item() <= 1e-2, f"{name}: {(got - wants[name]).abs().max()}"
        assert (wants["first"] - wants["second"]).abs().max().item() > 0.1  # the rows' adapters do change it
        assert (wants["first"] - base(x)).abs().max().item() > 0.1


def test_decode_phases_choice(monkeypatch):
    """Eager decode takes the one launch, a call forced gathered (a graphed step) the two phases;
    ``DELTATUNE_BGMV_PHASES`` overrides both, an explicit ``phases`` overrides it; other values are refused,
    naming where they came from (``routed`` refuses before loading anything)."""
    from deltatune.serve.pool_call import decode_phases

    monkeypatch.delenv("DELTATUNE_BGMV_PHASES", raising=False)
    assert (decode_phases(False), decode_phases(True)) == (1, 2)
    for env in ("1", "2"):
        monkeypatch.setenv("DELTATUNE_BGMV_PHASES", env)
        assert decode_phases(False) == decode_phases(True) == int(env)
        assert decode_phases(True, 3 - int(env)) == 3 - int(env)
    for bad in ("0", "3", "two"):
        monkeypatch.setenv("DELTATUNE_BGMV_PHASES", bad)
        with pytest.raises(ValueError, match="DELTATUNE_BGMV_PHASES must be 1"):
            decode_phases(True)
    monkeypatch.delenv("DELTATUNE_BGMV_PHASES")
    for bad in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="phases must be 1"):
            decode_phases(False, bad)
    with tempfile.TemporaryDirectory() as root:
        base, pool = pool_of_three("cpu", torch.float32, root)
        with pytest.raises(ValueError, match="phases must be 1"):
            with pool.routed(base, ["a"], phases=3):
                pass
        assert pool.resident() == []


def test_bgmv_refuses_bad_phases_and_splits():
    """``Bgmv`` refuses a split that is not a positive integer at construction, and a ``phases`` other than 1 or 2
    at the first call of a shape, before any launch."""
    from deltatune.kernels import sgmv

    A, B, scales = torch.zeros(2, 8, 32), torch.zeros(2, 16, 8), torch.ones(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="split must be a positive integer"):
            sgmv.Bgmv(A, B, scales, split=bad)
    layer = sgmv.Bgmv(A, B, scales)
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="phases must be 1"):
            layer(torch.zeros(2, 32), torch.zeros(2, 16), torch.zeros(2, dtype=torch.int32), 1, bad)
    assert not layer._launches


def test_decode_split_and_grids_follow_their_rules():
    """``decode_split``: a power of two up to 16, every K range at least 2 blocks, of K alone. On the 1B shape of
    issue 18 (rank 64, 64 decode rows, an H200's 132 multiprocessors): K 2048 in 8 ranges, K 8192 in 16, so the
    shrink has >= 2 programs a multiprocessor; the expand's output runs from ``expand_tiles`` (>= 3 programs a
    multiprocessor where the outputs allow); the partials buffer (SPLIT, T, R)."""
    from deltatune.kernels import sgmv
    from deltatune.kernels.bgmv_split import decode_split

    for k_blocks in range(1, 200):
        split = decode_split(k_blocks)
        assert split & (split - 1) == 0 and 1 <= split <= 16, (k_blocks, split)
        assert split == 1 or k_blocks >= 2 * split, (k_blocks, split)
        assert split == 16 or k_blocks < 4 * split, (k_blocks, split)  # the largest
    with pytest.raises(ValueError, match="k_blocks must be at least 1"):
        decode_split(0)
    meta = torch.device("meta")
    for K, N, want in ((2048, 8192, 8), (2048, 2048, 8), (2048, 512, 8), (8192, 2048, 16)):
        A = torch.empty(2, 64, K, device=meta, dtype=torch.bfloat16)
        B = torch.empty(2, N, 64, device=meta, dtype=torch.bfloat16)
        layer = sgmv.Bgmv(A, B, torch.empty(2, device=meta), torch.empty(2, device=meta, dtype=torch.int32))
        layer._sms = 132
        assert layer.split == want, (K, N, layer.split)
        T = 64
        x, y = torch.empty(T, K, device=meta), torch.empty(T, N, device=meta)
        (shrink_grid, _), (expand_grid, expand), h = layer._launch(x, y, torch.empty(T, device=meta,
                                                                                     dtype=torch.int32), 1, 2)
        assert shrink_grid == (T, want) and T * want >= 2 * 132
        blocks = N // 128
        assert expand["N_TILES"] == sgmv.expand_tiles(T, blocks, 132)
        assert expand_grid == (T, -(-blocks // expand["N_TILES"]))
        assert expand_grid[1] * T >= 3 * 132 or expand["N_TILES"] == 1
        assert tuple(h.shape) == (want, T, 64) and h.dtype == torch.float32
    assert decode_split(5) == 2  # what check_bgmv_phases's heuristic case (K 600: 5 blocks of 128) runs


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps(run_checks("cpu")))
