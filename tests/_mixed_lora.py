"""Shared by tests/test_sgmv.py and tests/test_bgmv.py (the mixed-adapter kernels; importable under pytest and in
their interpreted subprocess alike): small mixed batches, the float64 reference, a tiny Llama's pool, launch-grid
recording and the tolerances."""

import contextlib
import copy

import _models
import torch
from _util import assert_errors_within

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def mixed_case(device, dtype, decode: bool, seed: int):
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


def mixed_reference(x, y, A, B, scales, slots, ranks=None):
    """float64: y[t] + scale_s B_s A_s x[t] for every token with a slot (only its first ``ranks[s]`` ranks)."""
    out = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            r = A.shape[1] if ranks is None else ranks[s]
            out[t] += scales[s].double() * (B[s, :, :r].double() @ (A[s, :r].double() @ x[t].double()))
    return out


def pool_of_three(device, dtype, root):
    """A tiny Llama in ``dtype`` and a pool of adapters "a" (r 4), "b" (r 8, rsLoRA, q/v only) and "c" (r 2,
    down/q only): ranks padded per layer, and slots absent from some layers."""
    import deltatune as dt
    from deltatune.serve import AdapterPool

    torch.manual_seed(0)
    base = _models.llama().to(device, dtype).eval()
    pool = AdapterPool(base)
    for name, cfg in {"a": dt.LoraConfig(r=4, alpha=8.0, init="random"),
                      "b": dt.LoraConfig(r=8, use_rslora=True, targets=["q_proj", "v_proj"], init="random"),
                      "c": dt.LoraConfig(r=2, alpha=4.0, targets=["down_proj", "q_proj"], init="random")}.items():
        dt.save_adapter(dt.add_adapter(copy.deepcopy(base), cfg), f"{root}/{name}")
        pool.register(name, f"{root}/{name}")
    return base, pool


@contextlib.contextmanager
def recorded_grids(module, names):
    """The ``@triton.jit`` kernels ``names`` of ``module`` replaced by ones that record each launch's grid (in the
    dict yielded, by kernel name) and then launch; the kernels are put back on exit."""
    kernels, grids = {name: getattr(module, name) for name in names}, {}

    class Recording:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids[self.name] = grid
            return kernels[self.name][grid]

    for name in names:
        setattr(module, name, Recording(name))
    try:
        yield grids
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def assert_within(name, errs):
    """A check's flags all true and its errors within ``TOL`` (the pool's logits: 1e-4 / 5e-2)."""
    dtype = torch.float32 if name.endswith("float32") else torch.bfloat16
    tol = TOL[dtype] if not name.startswith("pool") else (1e-4 if dtype == torch.float32 else 5e-2)
    assert_errors_within(name, errs, tol, "relative error")
