"""Host time of the adapter pool's mixed-adapter layers, on CPU, with the Triton launches stubbed out.

A decode step through ``AdapterPool.routed`` is launch-bound on a GPU: what it costs is Python and
dispatch per projection, plus Triton's own launch overhead per kernel (~10-30 us each, not measured
here). This bench measures the first part and counts the second, without a GPU:

* the model is ``bench_serve_layers``' projections of a Llama decoder (16 layers x 7 projections, the
  1B model's layer count) at narrow widths, so the base matmuls cost little on the CPU;
* ``DELTATUNE_TRITON=interpret`` + ``TRITON_INTERPRET=1`` make the pool take its kernel path on CPU
  tensors, and every ``@triton.jit`` kernel of ``deltatune.kernels.sgmv`` is replaced by a stub that
  only counts its launches (so the interpreter never runs);
* counted per projection: Triton launches, and aten ops beyond the base forward's (allocations, views,
  copies: what a decode projection should not need);
* rows: the base forward, the base forward with a no-op forward hook on each projection (what torch's
  hook dispatch costs: the pool's hooks pay it too), the pool step (``routed`` entered and the
  forward run), ``routed`` entered alone; host us per projection = (pool step - base - routed alone) /
  projections. Rounds take the rows in turn; each row's median is reported. Last, one projection's hook
  called directly in a loop: the pool's own work per projection without torch's hook dispatch, the
  least of 9 rounds (a CPU shared with other work makes the differences above noisy; this is steadier).

Prints a table, the cProfile top of a pool step, and JSON:

    python bench/bench_serve_host.py --rows 64 --layout 3d   # x (64, 1, hidden): bench_serve_layers' decode
    python bench/bench_serve_host.py --rows 64 --layout 2d   # x (64, hidden): the serving engine's layout
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel module loads, stubs replace its kernels
os.environ["DELTATUNE_TRITON"] = "interpret"

import argparse  # noqa: E402
from collections import Counter  # noqa: E402
import cProfile  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import deltatune as dt  # noqa: E402
from bench_serve_layers import SHAPES, TARGETS, Projections  # noqa: E402
from deltatune.kernels import backend  # noqa: E402
from deltatune.serve import AdapterPool  # noqa: E402


class _Stub:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` only counts the launch."""

    def __init__(self, name: str):
        self.name, self.launches = name, 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


def stub_kernels() -> list[_Stub]:
    """Replace every Triton kernel of ``deltatune.kernels.sgmv`` by a counting stub; returns the stubs."""
    from triton.runtime.jit import KernelInterface

    sgmv = backend.load("deltatune.kernels.sgmv")
    stubs = []
    for name, obj in list(vars(sgmv).items()):
        if isinstance(obj, KernelInterface) and not name.startswith("_dot"):
            stub = _Stub(name)
            setattr(sgmv, name, stub)
            stubs.append(stub)
    if not stubs:
        raise RuntimeError("no Triton kernels found in deltatune.kernels.sgmv to stub")
    return stubs


def make_pool(base: torch.nn.Module, n: int, ranks: list[int], root: pathlib.Path) -> AdapterPool:
    """A pool of ``n`` random LoRA adapters a0.. on the seven projections, ranks cycling ``ranks``."""
    pool = AdapterPool(base, max_resident=n)
    for i in range(n):
        r = ranks[i % len(ranks)]
        model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=r, alpha=2 * r, targets=TARGETS, init="random"))
        dt.save_adapter(model, root / f"a{i}")
        pool.register(f"a{i}", root / f"a{i}")
    return pool


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run under it (allocations, views, copies, kernels alike)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> Counter:
    """The aten ops of one ``fn()`` call, by name."""
    with _CountOps() as counter:
        fn()
    return counter.ops


def per_call_us(fns: dict, iters: int, rounds: int = 9) -> dict:
    """Mean microseconds per call of each ``fns`` value over ``iters`` calls, the median of ``rounds`` rounds
    that take the functions in turn (a shared, noisy CPU drifts alike for all of them)."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[k].append((time.perf_counter() - t0) * 1e6 / iters)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64, help="decode rows, each its own adapter")
    ap.add_argument("--layout", default="3d", choices=["3d", "2d"], help="x as (rows, 1, hidden) or (rows, hidden)")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile", type=int, default=12, help="cProfile lines to print (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hidden, inter, layers, q, kv = 64, 128, SHAPES["1b"][2], 64, 32
    SHAPES["host"] = (hidden, inter, layers, q, kv)
    torch.manual_seed(0)
    base = Projections("host").eval()
    projections = layers * len(TARGETS)
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_pool(base, args.rows, [int(r) for r in args.ranks.split(",")], pathlib.Path(tmp))
    stubs = stub_kernels()
    shape = (args.rows, 1, hidden) if args.layout == "3d" else (args.rows, hidden)
    x = torch.randn(*shape)
    rows = [f"a{i}" for i in range(args.rows)]

    def step():
        with pool.routed(base, rows):
            return base(x)

    hooked_model = copy.deepcopy(base)  # the same model with a no-op forward hook kept on each projection
    for n, m in hooked_model.named_modules():
        if n.rsplit(".", 1)[-1] in TARGETS:
            m.register_forward_hook(lambda mod, a, out: out)

    def hooked():
        return hooked_model(x)

    def enter():
        with pool.routed(base, rows):
            pass

    with torch.inference_mode():
        step()  # slots loaded, everything warm
        for s in stubs:
            s.launches = 0
        step()
        launches = {s.name: s.launches / projections for s in stubs if s.launches}
        extra = count_ops(step)
        extra.subtract(count_ops(lambda: base(x)))
        extra.subtract(count_ops(enter))
        torch_ops = {k: v / projections for k, v in sorted(extra.items()) if v}
        us = per_call_us({"base forward": lambda: base(x), "base forward, a no-op hook on each projection": hooked,
                          "pool step": step, "routed entered alone": enter}, args.iters)
        per_projection = (us["pool step"] - us["base forward"] - us["routed entered alone"]) / projections
        hook_dispatch = (us["base forward, a no-op hook on each projection"] - us["base forward"]) / projections
        # one projection's hook called directly, in a loop: the pool's own per-call work (no torch dispatch,
        # no base matmul); the least of the rounds, the number least disturbed by a shared CPU
        module = base.layers[0].q_proj
        x_in = x if args.layout == "2d" else x.view(args.rows, 1, hidden)
        y_out = module(x_in)
        with pool.routed(base, rows):
            hook = next(iter(module._forward_hooks.values()))
            hook(module, (x_in,), y_out)
            rounds = []
            for _ in range(9):
                t0 = time.perf_counter()
                for _ in range(args.iters * 20):
                    hook(module, (x_in,), y_out)
                rounds.append((time.perf_counter() - t0) * 1e6 / (args.iters * 20))
        direct = min(rounds)
        profile = ""
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                step()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
            profile = buf.getvalue()

    print(f"\nhost time, {args.rows} decode rows ({args.layout}: x {tuple(shape)}), {args.rows} adapters, "
          f"{projections} projections, Triton launches stubbed (CPU, 1 thread)\n")
    print("| row | us |\n|---|---|")
    for k, v in us.items():
        print(f"| {k} | {v:,.0f} |")
    print(f"| **host per projection** (step - base - routed) | **{per_projection:.1f}** |")
    print(f"| of which torch's hook dispatch (hooked - base) | {hook_dispatch:.1f} |")
    print(f"| **the pool's own work per projection: its hook called directly** (least of 9 rounds) | "
          f"**{direct:.1f}** |")
    print(f"\nTriton launches per projection: {sum(launches.values()):g} {launches}")
    print(f"torch (aten) ops per projection beyond the base: {sum(torch_ops.values()):g} {torch_ops}")
    if profile:
        print("\ncProfile of pool steps (tottime):\n" + "\n".join(profile.splitlines()[:40]))
    out = {"rows": args.rows, "layout": args.layout, "projections": projections, "us": us,
           "host_us_per_projection": per_projection,
           "hook_dispatch_us_per_projection": hook_dispatch,
           "hook_direct_us_per_projection": direct, "launches_per_projection": launches,
           "torch_ops_per_projection": torch_ops}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
