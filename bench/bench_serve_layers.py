"""Mixed-adapter layers on one GPU: the base projections vs deltatune's AdapterPool vs PEFT ``adapter_names=``.

The model is the seven projections of each decoder layer of a Llama shape (q, k, v, o, gate, up, down;
SwiGLU between gate/up and down, a residual add; attention left out, so the rows measure the linear
layers alone), bf16, random weights. Adapters: LoRA on all seven projections, ranks cycling through
``--ranks`` (alpha = 2 r), random factors, made and saved by PEFT (adapter dtype bf16 in both, PEFT
without its fp32 autocast of adapters). Rows:

* prefill: ``--prefill-rows`` sequences of ``--prefill-len`` tokens, each sequence its own adapter
  (16 distinct); tokens/s;
* decode: ``--decode-rows`` sequences of one token, all distinct adapters (64); ms per step;
* decode, base rows: the pool with every row routed to None (base rows should cost nothing);
* decode, CUDA graph (GPU only): the base step and the pool's step (``routed(..., gathered=True)``) each
  captured once and replayed, the pool's with the gathered kernel in one launch a projection and in two
  phases (split-K shrink, then expand: ``kernels.bgmv_split``, what ``serve.decode_graphs`` captures); the
  checks say whether both give the same bits;
* decode, reloads: the pool holding ``--decode-rows`` slots with ``--registered`` adapters registered and
  each step naming ``--decode-rows`` adapters not resident (every slot reloaded from pinned host memory).

Each pool step includes entering ``pool.routed`` (index arrays built and copied once per step). Checks:
the pool's outputs against PEFT's on the same batch (relative error; bf16) and against the base (the
adapters change the output). Prints a table and writes JSON:

    python bench/bench_serve_layers.py --shape 1b --json bench_serve_layers.json
    python bench/bench_serve_layers.py --shape tiny   # a CPU check of the harness (the PyTorch reference)

``--profile`` also runs a few prefill and decode steps of the base and of the pool under ``torch.profiler``
and prints each one's top GPU kernels by total time (the SGMV shrink and expand beside the base GEMMs; on a
CPU, the top operators by self CPU time).

The pool's prefill adds the terms to the base output in a forward hook by default; ``DELTATUNE_SGMV_EPILOGUE=1``
runs the epilogue path instead (terms written first, the base GEMM adding into them; slower on an H200). The header says
which mode ran and how many projections took the epilogue (also under ``checks`` and in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deltatune.serve import AdapterPool, pool_call  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, q/o width, k/v width (Llama-3.2-1B, Llama-3.1-8B)
    "1b": (2048, 8192, 16, 2048, 512),
    "8b": (4096, 14336, 32, 4096, 1024),
    "tiny": (64, 160, 2, 64, 32),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, q: int, kv: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(hidden, q, False), nn.Linear(hidden, kv, False), \
            nn.Linear(hidden, kv, False)
        self.o_proj = nn.Linear(q, hidden, False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, False), nn.Linear(hidden, inter, False)
        self.down_proj = nn.Linear(inter, hidden, False)

    def forward(self, x):
        q = self.q_proj(x)
        self.k_proj(x), self.v_proj(x)
        x = x + self.o_proj(q)
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Projections(nn.Module):
    """The decoder layers' projections of a Llama shape (no attention, no norms)."""

    def __init__(self, shape: str):
        super().__init__()
        hidden, inter, layers, q, kv = SHAPES[shape]
        self.layers = nn.ModuleList(Block(hidden, inter, q, kv) for _ in range(layers))
        self.hidden = hidden

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def timed(fn, iters: int, warmup: int, cuda: bool) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


START = time.perf_counter()


def progress(what: str) -> None:
    """One line on stderr as the bench goes (seconds since start): a run cut short by a time limit still says
    how far it got and what each phase took."""
    print(f"[{time.perf_counter() - START:7.1f} s] {what}", file=sys.stderr, flush=True)


class Rows(dict):
    """A case's timed rows (row -> ms), each reported by ``progress`` as it is set."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case

    def __setitem__(self, row: str, ms: float) -> None:
        super().__setitem__(row, ms)
        progress(f"{self.case}: {row}: {ms:.3f} ms")


def graphed(fn):
    """``fn`` captured in a CUDA graph after two warm-up calls on a side stream; returns the graph's replay and
    the output the capture recorded (each replay writes there)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph.replay, out


PROFILE_ITERS = 3
"""Steps run under the profiler for ``--profile`` (after one unprofiled step)."""


def profile_top(fn, cuda: bool, top: int = 10) -> tuple[list[tuple[str, int, float]], float]:
    """``fn`` run ``PROFILE_ITERS`` times under ``torch.profiler``: the ``top`` GPU kernels (memory copies too) by
    total time as (name, calls, total ms), and all kernels' total ms; on a CPU, operators by self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_ITERS):
            fn()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, list] = {}
    if cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                entry = totals.setdefault(event.name, [0, 0.0])
                entry[0] += 1
                entry[1] += event.time_range.elapsed_us() / 1e3
    else:
        for event in prof.key_averages():
            totals[event.key] = [event.count, event.self_cpu_time_total / 1e3]
    rows = sorted(((name, calls, ms) for name, (calls, ms) in totals.items()), key=lambda row: -row[2])
    return rows[:top], sum(ms for _, _, ms in rows)


def print_profile(case: str, row: str, top: list[tuple[str, int, float]], total_ms: float, cuda: bool):
    """One row's profile as a table: name (60 characters), calls, total ms, ms per call."""
    what = "GPU kernels by total time" if cuda else "operators by self CPU time (no GPU)"
    print(f"\nprofile: {case}, {row}: {what}, {PROFILE_ITERS} steps, {total_ms:.3f} ms in all "
          f"({total_ms / PROFILE_ITERS:.3f} ms a step)\n")
    print("| name | calls | total ms | ms per call |")
    print("|---|---|---|---|")
    for name, calls, ms in top:
        print(f"| {name[:60]} | {calls} | {ms:.3f} | {ms / calls:.4f} |")


def make_adapters(base: nn.Module, n: int, ranks: list[int], root: pathlib.Path, dora: bool = False):
    """PEFT with ``n`` LoRA adapters a0..a{n-1} on ``base``'s projections, each saved under ``root/<name>``;
    ``dora``: DoRA adapters, their magnitudes moved off their initial norms (as training leaves them)."""
    import peft

    torch.manual_seed(0)
    model = None
    for i in range(n):
        r = ranks[i % len(ranks)]
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False, use_dora=dora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model is None:
                model = peft.get_peft_model(base, cfg, adapter_name=f"a{i}", autocast_adapter_dtype=False)
            else:
                model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # factors of a trained adapter's size: outputs change by a few percent
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.mul_(0.2)
        for module in model.modules() if dora else ():  # m: the norm of the scaled update, off by up to 10%
            for a, mag in getattr(module, "lora_magnitude_vector", {}).items():
                W = module.get_base_layer().weight.float()
                update = module.scaling[a] * module.lora_B[a].weight.float() @ module.lora_A[a].weight.float()
                norm = torch.linalg.norm(W + update, dim=1)
                mag.weight.copy_(norm * (0.9 + 0.2 * torch.rand_like(norm)))
    for i in range(n):
        model.save_pretrained(str(root), selected_adapters=[f"a{i}"])
    paths = {f"a{i}": (root / f"a{i}" if (root / f"a{i}").is_dir() else root) for i in range(n)}
    return model.eval(), paths


def write_adapters(base: nn.Module, n: int, ranks: list[int], root: pathlib.Path) -> dict[str, pathlib.Path]:
    """The files of ``make_adapters`` (LoRA, PEFT's format; the same ranks, alpha and factor scale) written by
    deltatune on a copy of ``base`` one adapter at a time, without a PEFT model of ``n`` adapters: what the
    runs without PEFT rows use (an 8B shape's PEFT setup alone took minutes)."""
    import deltatune as dt

    model = copy.deepcopy(base)
    torch.manual_seed(0)
    paths = {}
    for i in range(n):
        r, name = ranks[i % len(ranks)], f"a{i}"
        dt.add_adapter(model, dt.LoraConfig(r=r, alpha=2 * r, targets=TARGETS, init="random"), name=name)
        with torch.no_grad():
            for p in dt.adapter_params(model, name):
                p.mul_(0.2)
        paths[name] = root / name
        dt.save_adapter(model, paths[name], name)
        dt.remove_adapter(model, name)
    return paths


def decode_floor(base: nn.Module, pool, names: list[str], ms: dict) -> dict:
    """What a decode step of ``names``' adapters costs at least if memory bound: the base weights and each
    distinct adapter's factors (their real ranks, no padding) read once, at the bandwidth the base step reached
    (its CUDA-graph row where there is one: the GPU's own time). Issue 18's <= 1.2x is checked against this."""
    row = "base, CUDA graph" if "base, CUDA graph" in ms else "base"
    base_bytes = sum(p.nbytes for p in base.parameters())
    adapter_bytes = sum(pool._adapters[n].nbytes() for n in dict.fromkeys(names))
    floor_ms = ms[row] * (1 + adapter_bytes / base_bytes)
    return {"base_row": row, "base_gb": base_bytes / 1e9, "adapter_gb": adapter_bytes / 1e9, "floor_ms": floor_ms,
            "floor_x": floor_ms / ms[row]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    ap.add_argument("--prefill-rows", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-rows", type=int, default=64)
    ap.add_argument("--registered", type=int, default=128, help="adapters registered for the reload row")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out (quicker A/B runs): peft (its "
                    "rows and checks; ~1.3 s a decode step at 1B), reload (the every-slot-reloaded row)")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters (each token's output scaled per slot; PEFT "
                    "refuses adapter_names with DoRA, so its rows are left out)")
    ap.add_argument("--profile", action="store_true",
                    help="print the top kernels of a few prefill and decode steps, base and pool (torch.profiler)")
    args = ap.parse_args(argv)
    skip = {r for r in args.skip.split(",") if r}
    if skip - {"peft", "reload"}:
        ap.error(f"--skip takes peft and reload, got {sorted(skip - {'peft', 'reload'})}")
    if args.dora:
        skip.add("peft")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    ranks = [int(r) for r in args.ranks.split(",")]
    n = max(args.prefill_rows, args.decode_rows)

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an 8B shape's 7B weights take a minute on a CPU
        base = Projections(args.shape).to(dtype).eval()
    progress(f"{args.shape} projections built")
    tmp = tempfile.TemporaryDirectory()
    if "peft" in skip and not args.dora:  # no PEFT model needed (the DoRA check compares with PEFT's)
        peft_model, paths = None, write_adapters(base, n, ranks, pathlib.Path(tmp.name))
        progress(f"{n} adapters made and saved (deltatune)")
    else:
        peft_model, paths = make_adapters(copy.deepcopy(base), n, ranks, pathlib.Path(tmp.name), args.dora)
        progress(f"{n} adapters made and saved (PEFT)")
    t0 = time.perf_counter()
    pool = AdapterPool(base, max_resident=args.decode_rows, device=device, dtype=dtype)
    for name, p in paths.items():
        pool.register(name, p)
    register_s = time.perf_counter() - t0
    progress(f"{n} adapters registered in the pool")

    g = torch.Generator(device="cpu").manual_seed(1)
    prefill_x = torch.randn(args.prefill_rows, args.prefill_len, base.hidden, generator=g).to(device, dtype)
    decode_x = torch.randn(args.decode_rows, 1, base.hidden, generator=g).to(device, dtype)
    prefill_names = [f"a{i}" for i in range(args.prefill_rows)]
    decode_names = [f"a{i}" for i in range(args.decode_rows)]

    def pool_step(x, rows):
        with pool.routed(base, rows):
            return base(x)

    def epilogue_layers(x, rows) -> int:
        """How many projections of one pool step took the prefill epilogue path (``serve.lora_mixed.
        linear_mixed_lora``: terms first, the base GEMM adding into them; ``DELTATUNE_SGMV_EPILOGUE``)."""
        real, count = pool_call.linear_mixed_lora, [0]
        pool_call.linear_mixed_lora = lambda *a, **k: (count.__setitem__(0, count[0] + 1), real(*a, **k))[1]
        try:
            pool_step(x, rows)
        finally:
            pool_call.linear_mixed_lora = real
        return count[0]

    results, checks, profiles = [], {}, []
    projections = len(TARGETS) * SHAPES[args.shape][2]
    checks["sgmv_epilogue"] = {"switch": pool_call.sgmv_epilogue(), "projections": projections}
    checks["bgmv_groups"] = pool_call.shrink_groups_on()  # graphed decode: one shrink for q/k/v, one for gate/up
    with torch.inference_mode():
        for case, x, rows in (("prefill", prefill_x, prefill_names), ("decode", decode_x, decode_names)):
            ms = Rows(case)
            ms["base"] = timed(lambda: base(x), args.iters, args.warmup, cuda)
            ms["deltatune pool"] = timed(lambda: pool_step(x, rows), args.iters, args.warmup, cuda)
            if "peft" not in skip:
                ms["PEFT adapter_names"] = timed(lambda: peft_model(x, adapter_names=rows), args.iters, args.warmup, cuda)
            if case == "decode":
                ms["pool, base rows only"] = timed(lambda: pool_step(x, [None] * len(rows)), args.iters, args.warmup,
                                                   cuda)
            if case == "decode" and cuda:  # the GPU's own time: each step replayed from a CUDA graph
                try:
                    ms["base, CUDA graph"] = timed(graphed(lambda: base(x))[0], args.iters, args.warmup, cuda)
                    outs = {}
                    for phases, row in ((1, "1 launch"), (2, "2 phases")):  # the gathered kernel's two variants
                        with pool.routed(base, rows, gathered=True, phases=phases):  # slots uploaded outside capture
                            replay, outs[phases] = graphed(lambda: base(x))
                        ms[f"deltatune pool, CUDA graph, {row}"] = timed(lambda: (pool.prepare(rows), replay()),
                                                                          args.iters, args.warmup, cuda)
                    checks["decode_graph_phases"] = {"bitwise_equal": bool(torch.equal(outs[1], outs[2])),
                                                     "rel": rel(outs[2], outs[1])}
                except Exception as e:  # report, keep the other rows
                    print(f"graphed rows failed: {type(e).__name__}: {e}")
            results.append((case, x.shape[0] * x.shape[1], ms))
            if args.profile:
                for row, fn in (("base", lambda: base(x)), ("deltatune pool", lambda: pool_step(x, rows))):
                    profiles.append((case, row) + profile_top(fn, cuda))
            checks["sgmv_epilogue"][f"{case}_epilogue_layers"] = epilogue_layers(x, rows)
            ours, plain = pool_step(x, rows), base(x)
            checks[case] = {"pool_vs_base": rel(ours, plain), **checks.pop("decode_graph_phases", {})}
            if args.dora:  # PEFT's DoRA on one adapter at a time (its mixed batches refuse DoRA): rows of a0
                peft_model.set_adapter("a0")
                checks[case]["pool_vs_peft_a0"] = rel(pool_step(x, ["a0"] * len(rows)), peft_model(x))
            if "peft" not in skip:
                theirs = peft_model(x, adapter_names=rows)
                checks[case].update(pool_vs_peft=rel(ours, theirs), peft_vs_base=rel(theirs, plain))
        # reloads: every step names adapters that are not resident
        if "reload" in skip:
            args.registered = 0
        extra = {f"r{i}": paths[f"a{i % n}"] for i in range(args.registered)}
        t0 = time.perf_counter()
        for name, p in extra.items():
            pool.register(name, p)
        register_s += time.perf_counter() - t0
        if "reload" not in skip:
            groups = [[f"r{(j * args.decode_rows + i) % args.registered}" for i in range(args.decode_rows)]
                      for j in range(max(2, args.registered // args.decode_rows))]
            step = iter(range(10 ** 9))
            reload_ms = timed(lambda: pool_step(decode_x, groups[next(step) % len(groups)]), args.iters, args.warmup,
                              cuda)
            results[1][2]["pool, all slots reloaded each step"] = reload_ms

    checks["decode_floor"] = decode_floor(base, pool, decode_names, results[1][2])
    dora = ", DoRA" if args.dora else ""
    print(f"\n{args.shape} projections, {device} {str(dtype)[6:]}, ranks {ranks}{dora}; registered {len(pool.names())} "
          f"adapters in {register_s:.1f} s; pool slots {pool.resident_bytes() / 2**30:.2f} GiB "
          f"({pool.capacity} x {pool.slot_bytes() / 2**20:.1f} MiB)")
    mode = checks["sgmv_epilogue"]
    how = "epilogue (terms first, the GEMM adds into them)" if mode["switch"] else "hook (terms added to the output)"
    print(f"pool prefill mode: {how}, {pool_call.EPILOGUE_ENV}={int(mode['switch'])}: "
          f"{mode['prefill_epilogue_layers']} of "
          f"{projections} projections took the epilogue in prefill, {mode['decode_epilogue_layers']} in decode; "
          f"{pool_call.GROUPS_ENV}={int(checks['bgmv_groups'])} (graphed decode: shared-input shrinks in one launch)\n")
    print("| case | row | ms | tokens/s | x base |")
    print("|---|---|---|---|---|")
    for case, tokens, ms in results:
        for row, v in ms.items():
            print(f"| {case} ({tokens} tokens) | {row} | {v:.3f} | {tokens / v * 1e3:,.0f} | {v / ms['base']:.3f} |")
    floor = checks["decode_floor"]
    print(f"\ndecode floor: {floor['base_gb']:.2f} GB of base weights and {floor['adapter_gb']:.2f} GB of the "
          f"{len(decode_names)} rows' adapter factors, read once a step at the bandwidth of the {floor['base_row']} "
          f"row: {floor['floor_ms']:.3f} ms, {floor['floor_x']:.2f}x that row")
    print(f"\nchecks: {json.dumps(checks)}")
    for case, row, top, total_ms in profiles:
        print_profile(case, row, top, total_ms, cuda)
    if args.json:
        out = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "ranks": ranks,
               "sgmv_epilogue": checks["sgmv_epilogue"]["switch"],
               "register_s": register_s, "resident_bytes": pool.resident_bytes(), "checks": checks,
               "rows": [{"case": c, "tokens": t, "ms": ms} for c, t, ms in results]}
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
