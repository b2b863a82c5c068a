"""End-to-end serving: a Poisson stream of requests over many adapters, beside the base model alone.

The model is a Llama of the chosen shape with random weights (bf16 on a GPU), built from its config
(nothing is downloaded). Adapters: LoRA on all seven projections, ranks cycling through ``--ranks``
(alpha = 2 r), random factors, saved once under ``--adapter-dir`` (reused when present). Every mode
serves the same requests (same arrival times, prompts and lengths; EOS ignored, so every request
generates ``--max-new-tokens``):

* base: every request on the base model (no adapter);
* pool: each request names one of ``--adapters`` adapters (uniformly), served through an
  ``AdapterPool`` with ``--resident`` slots (SGMV/BGMV kernels on a GPU);
* routing (optional, slow): the same adapters loaded into the model, routed by the PyTorch reference.
* base-graphs, pool-graphs: the same with ``Engine(cuda_graphs=True)`` (decode steps replayed from CUDA graphs).

Requests arrive at ``--rate`` per second (exponential gaps, seeded); ``--rate inf``: all of them at t=0, a
saturating load that measures the engine's throughput whatever the arrival rate (at a finite rate an
engine that keeps up reports rate x tokens, which hides differences). Reported per mode: requests/s and
generated tokens/s over the makespan, latency (arrival to last token) and time to first token, p50
and p99 (at ``--rate inf`` both include the wait in the queue), the ratio to the base row, and for the
pool modes the registration (seconds, adapters/s, host GiB) and the loads into slots (``pool_loads``). Prints a table and one JSON line (``--json
FILE`` too).

Many adapters (issue 18: 1,000 registered, 128 resident): ``--adapter-files`` distinct files are written
(random factors in the model's dtype straight to safetensors; default min(adapters, 100)) and adapter i is
registered from file i mod files. ``AdapterPool.register`` reads the file for every name and keeps each
name's own host copy (pinned on a GPU), so host memory and the pool's bookkeeping are those of
``--adapters`` separate adapters; reads after a file's first come from the page cache, so the registration
time is not that of reading ``--adapters`` distinct files from disk. Before anything is built the plan is
printed (bytes per adapter; disk, pinned host memory, device slots, weights, KV cache: ``serve_plan.py``)
and a run that does not fit the machine is refused; ``--plan-only`` stops there. ``--json`` is rewritten
after every mode (``complete`` false until the last), so a run cut short keeps its finished rows.

    python bench/bench_serve.py --shape 1b --json bench_serve.json
    python bench/bench_serve.py --shape tiny --requests 12 --rate 50 --adapters 4   # a CPU check of the harness

Issue 18's runs on one H200 (139 GiB; host 128 GiB, disk 64 GiB). 1b: 1,000 registered at ranks 8-64 =
39.4 GiB of pinned host copies, 100 files = 3.9 GiB on disk, 128 slots padded to rank 64 = 10.8 GiB
beside 2.3 GiB of weights. 8b: 128 slots = 40 GiB beside 14 GiB of weights, within the default
--gpu-memory-fraction 0.5 with a KV cache for ~190 full-length sequences; 200 registered = 31.5 GiB pinned
(1,000 at ranks 8-64 would be 157 GiB: refused; at --ranks 8,16 they would fit):

    python bench/bench_serve.py --shape 1b --adapters 1000 --resident 128 --rate inf --requests 400 \
        --modes base,pool,base-graphs,pool-graphs --adapter-dir /tmp/dt_adapters_1b --json serve_1b_1000.json
    python bench/bench_serve.py --shape 8b --adapters 200 --adapter-files 64 --resident 128 --rate inf \
        --requests 256 --modes base-graphs,pool-graphs --adapter-dir /tmp/dt_adapters_8b --json serve_8b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # serve_plan, also when loaded by a test

import deltatune as dt  # noqa: E402
from deltatune.formats.atomic import atomic_write  # noqa: E402
from deltatune.formats.files import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from deltatune.serve import AdapterPool, Engine  # noqa: E402
from serve_plan import GiB, Geometry, Plan, PlanError, check_fit, disk_free_bytes, host_available_bytes  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (Llama-3.2-1B, Llama-3.1-8B)
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (64, 160, 2, 4, 2, 512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROW_FIELDS = ("requests", "makespan_s", "requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s",
              "ttft_p50_s", "ttft_p99_s", "preemptions")


def build_model(shape: str, device: str, dtype: torch.dtype):
    """A Llama of ``shape`` with random weights, made in ``dtype`` on ``device`` (never a float32 copy first:
    at 8b that would be 30 GB the allocator keeps reserved, which the engine's KV plan counts as used)."""
    import transformers

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def make_adapters(model, root: pathlib.Path, plan: Plan) -> list[pathlib.Path]:
    """``plan.files`` LoRA adapter directories under ``root`` (PEFT format; made once, reused when present).

    For each rank one adapter is added to the model and saved to a scratch directory, for its config and its
    keys and shapes; every file then gets that config and random factors (normal, std 0.02, seeded by the
    file's index) in the model's dtype, written straight to safetensors (``save_adapter`` would write the
    adapter's own float32 parameters: twice the bytes, and a conversion at every register)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    templates = {}  # rank -> (config text, {key: shape})
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(plan.files):
        path, r = root / f"adapter_{i:04d}", plan.file_rank(i)
        paths.append(path)
        if (path / WEIGHTS_NAME).is_file():  # from an earlier run (its rank checked by existing_files)
            continue
        if r not in templates:
            with tempfile.TemporaryDirectory(dir=root) as scratch:
                dt.add_adapter(model, dt.LoraConfig(r=r, alpha=2 * r, targets=TARGETS), name="template")
                dt.save_adapter(model, scratch, "template")
                dt.remove_adapter(model, "template")
                with safe_open(str(pathlib.Path(scratch) / WEIGHTS_NAME), "pt") as f:
                    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
                templates[r] = ((pathlib.Path(scratch) / CONFIG_NAME).read_text(), shapes)
        config, shapes = templates[r]
        g = torch.Generator(device=device).manual_seed(1000 + i)
        tensors = {k: (torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02).cpu()
                   for k, shape in shapes.items()}
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CONFIG_NAME, lambda tmp, text=config: pathlib.Path(tmp).write_text(text))
        # the weights last: a directory with its weights file is complete (what the reuse check above looks for)
        atomic_write(path / WEIGHTS_NAME, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
    return paths


def workload(args, vocab: int) -> list[dict]:
    """The requests: arrival time (s; all 0 at ``--rate inf``), prompt token ids, adapter index. The same
    prompts and adapters at every rate (the gaps are drawn either way)."""
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for _ in range(args.requests):
        gap = rng.expovariate(args.rate)  # drawn at every rate, inf too: the prompts are the same at any rate
        t += gap if math.isfinite(args.rate) else 0.0
        n = rng.randint(args.prompt_min, args.prompt_max)
        out.append({"at": t, "prompt": [rng.randrange(vocab) for _ in range(n)],
                    "adapter": rng.randrange(args.adapters)})
    return out


def serve(engine: Engine, requests: list[dict], names: list[str | None], max_new: int) -> dict:
    """Replay ``requests`` in real time against ``engine``; per-request latency and TTFT."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i]["at"])
    rid_of, first, done = {}, {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and requests[pending[0]]["at"] <= now:
            i = pending.pop(0)
            rid_of[engine.add_request(requests[i]["prompt"], names[i], max_new_tokens=max_new, ignore_eos=True)] = i
        if not engine.has_unfinished():
            time.sleep(max(0.0, requests[pending[0]]["at"] - now))
            continue
        stepped = engine.step()
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter() - start
        for seq in stepped:
            i = rid_of[seq.seq_id]
            first.setdefault(i, now)
            if seq.status == "finished":
                done[i] = now
                engine.pop_output(seq.seq_id)
    makespan = max(done.values()) - min(r["at"] for r in requests)
    latency = sorted(done[i] - requests[i]["at"] for i in done)
    ttft = sorted(first[i] - requests[i]["at"] for i in first)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"requests": len(done), "makespan_s": makespan, "requests_per_s": len(done) / makespan,
            "tokens_per_s": len(done) * max_new / makespan, "latency_p50_s": pct(latency, 0.5),
            "latency_p99_s": pct(latency, 0.99), "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "preemptions": engine.scheduler.num_preemptions}


def register(engine: Engine, paths: list[pathlib.Path], plan: Plan) -> dict:
    """Register ``plan.adapters`` names (a0, a1, ...; adapter i from file i mod files); timed."""
    start = time.perf_counter()
    for i in range(plan.adapters):
        engine.add_adapter(f"a{i}", str(paths[plan.adapter_file(i)]))
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    host = engine.pool.host_bytes() if hasattr(engine.pool, "host_bytes") else None
    return {"registered": plan.adapters, "register_s": seconds, "register_adapters_per_s": plan.adapters / seconds,
            "host_gib": None if host is None else host / GiB}


def cpu_blocks(args) -> int:
    """KV blocks (16 tokens) of a CPU run: four times what ``--max-num-seqs`` full-length sequences take."""
    return 4 * args.max_num_seqs * (args.prompt_max + args.max_new_tokens) // 16


def existing_files(root: pathlib.Path, plan: Plan) -> set[int]:
    """The adapter files an earlier run left under ``root`` (reused); PlanError where one has another rank."""
    found = set()
    for i in range(plan.files):
        path = root / f"adapter_{i:04d}"
        if (path / WEIGHTS_NAME).is_file():
            r = json.loads((path / CONFIG_NAME).read_text()).get("r")
            if r != plan.file_rank(i):
                raise PlanError(f"{path}: an adapter of rank {r} from an earlier run, where this run's --ranks put "
                                f"rank {plan.file_rank(i)}: use another --adapter-dir")
            found.add(i)
    return found


def fit(args, plan: Plan, root: pathlib.Path, cuda: bool) -> dict:
    """Print the plan and check it against this machine (``serve_plan.check_fit``); PlanError if it won't fit."""
    missing = [f for f in range(plan.files) if f not in existing_files(root, plan)] if plan.pool else []
    budget = host_extra = None
    if cuda:
        budget = int(args.gpu_memory_fraction * torch.cuda.mem_get_info()[1])
    else:  # the model, the pool's slots and the cache (cpu_blocks(args) of 16 tokens) live in host memory too
        host_extra = plan.weights_bytes() + plan.slots_bytes() + plan.kv_bytes(cpu_blocks(args) * 16 // plan.seq_len)
    for line in plan.lines():
        print(line)
    left = check_fit(plan, host_available_bytes(), disk_free_bytes(root), plan.file_bytes(missing),
                     device_budget=budget, host_extra=host_extra or 0)
    print(f"  fits: {left['host_spare'] / GiB:.1f} GiB host and {left['disk_spare'] / GiB:.1f} GiB disk to spare"
          + (f"; the KV cache holds ~{left['kv_sequences']} full-length sequences within "
             f"--gpu-memory-fraction {args.gpu_memory_fraction} (before the decode graphs' share)" if cuda else ""))
    if cuda and left["kv_sequences"] < args.max_num_seqs:
        print(f"  note: fewer than --max-num-seqs {args.max_num_seqs} full-length sequences fit: expect preemptions")
    return {**plan.as_dict(), **left, "files_to_write": len(missing)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--modes", default="base,pool",
                    help="comma-separated: base, pool, routing; base-graphs, pool-graphs: decode steps from CUDA "
                         "graphs")
    ap.add_argument("--adapters", type=int, default=100, help="adapters registered")
    ap.add_argument("--adapter-files", type=int, default=None,
                    help="distinct adapter files written (default min(adapters, 100)); adapter i is registered "
                         "from file i mod this, each name its own host copy")
    ap.add_argument("--resident", type=int, default=64, help="pool slots on the device")
    ap.add_argument("--ranks", default="8,16,32,64", help="ranks cycled over the files; slots padded to the largest")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=16.0,
                    help="mean arrivals per second (Poisson); inf: every request at t=0 (saturation)")
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.5,
                    help="share of the GPU for weights, adapter slots, activations and the KV cache")
    ap.add_argument("--adapter-dir", default=None, help="where the adapters are saved (default: a temp dir)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan, check that it fits, and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.rate > 0:
        ap.error(f"--rate must be positive (inf: all requests at once), got {args.rate}")
    if args.requests < 1 or args.max_new_tokens < 1 or not 1 <= args.prompt_min <= args.prompt_max:
        ap.error("--requests and --max-new-tokens must be >= 1 and 1 <= --prompt-min <= --prompt-max")
    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError:
        ap.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    modes = args.modes.split(",")
    pooled = any(m.removesuffix("-graphs") != "base" for m in modes)
    files = args.adapter_files or min(args.adapters, 100)
    plan = Plan(Geometry(*SHAPES[args.shape]), torch.empty((), dtype=dtype).element_size(), args.adapters, files,
                ranks, args.resident, args.max_num_seqs, args.max_num_batched_tokens,
                args.prompt_max + args.max_new_tokens, pool=pooled, pinned=cuda)
    tmp = tempfile.TemporaryDirectory() if args.adapter_dir is None else None
    root = pathlib.Path(args.adapter_dir or tmp.name)
    planned = fit(args, plan, root, cuda)  # PlanError (before anything is built) if the run won't fit
    if args.plan_only:
        return {"bench": "serve", "shape": args.shape, "settings": vars(args), "plan": planned}

    model = build_model(args.shape, device, dtype)
    start = time.perf_counter()
    paths = make_adapters(model, root, plan) if pooled else []
    planned["files_s"] = time.perf_counter() - start
    if cuda:
        torch.cuda.empty_cache()  # what writing the files left cached is not the engine's to plan around
    requests = workload(args, model.config.vocab_size)
    engine_kw = dict(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                     gpu_memory_fraction=args.gpu_memory_fraction, seed=args.seed)
    if not cuda:
        engine_kw["num_blocks"] = cpu_blocks(args)
    rows = {}
    for mode in modes:
        kind = mode.removesuffix("-graphs")  # "base-graphs", "pool-graphs": decode steps from CUDA graphs
        # max_rank: the pool's slots are planned beside the KV cache (Engine.memory_plan)
        pool = AdapterPool(model, max_resident=args.resident, max_rank=max(ranks)) if kind == "pool" else None
        engine = Engine(model, None, pool=pool, max_resident_adapters=args.adapters,
                        cuda_graphs=mode.endswith("-graphs"), **engine_kw)
        registration = register(engine, paths, plan) if kind != "base" else {}
        names = [None if kind == "base" else f"a{r['adapter']}" for r in requests]
        serve(engine, requests[:4], names[:4], 8)  # warm-up: kernels compiled, slots allocated
        rows[mode] = serve(engine, requests, names, args.max_new_tokens)
        rows[mode].update(registration)
        rows[mode]["distinct_adapters"] = len({n for n in names if n})
        if pool is not None:  # adapters loaded into slots (warm-up included; reloads after eviction counted again)
            rows[mode]["pool_loads"] = pool.loads
        rows[mode]["kv_blocks"] = engine.memory_plan["num_blocks"]
        rows[mode]["adapter_pool_bytes"] = engine.memory_plan["adapter_pool_bytes"]
        rows[mode]["decode_graph_bytes"] = engine.memory_plan["decode_graph_bytes"]  # the estimate set aside
        if kind == "routing":
            for i in range(plan.adapters):
                engine.remove_adapter(f"a{i}")
        print(row_line(mode, rows[mode], rows.get("base")), flush=True)
        report(args, planned, rows, cuda, done=False)
        del engine, pool
        gc.collect()  # the pool's host copies go before the next mode registers its own
        if cuda:
            torch.cuda.empty_cache()

    result = report(args, planned, rows, cuda)
    if tmp is not None:
        tmp.cleanup()
    return result


def row_line(mode: str, r: dict, base: dict | None) -> str:
    """One row of the table."""
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "-"
    reg = (f"{r['register_adapters_per_s']:.0f}/s {r['host_gib']:.1f} GiB" if r.get("host_gib") is not None
           else f"{r['register_adapters_per_s']:.0f}/s" if "register_s" in r else "-")
    return (f"{mode:11s} {r['requests_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['latency_p50_s']:7.2f} "
            f"{r['latency_p99_s']:7.2f} {r['ttft_p50_s']:7.3f} {r['ttft_p99_s']:7.3f} {ratio:>13s} {reg:>17s}")


def report(args, planned: dict, rows: dict, cuda: bool, done: bool = True) -> dict:
    """The result so far; written to ``--json`` (after every mode, so that a run cut short keeps its
    finished rows: ``complete`` False), and at the end printed as a table and one JSON line."""
    device = torch.cuda.get_device_name() if cuda else "cpu"
    settings = {**vars(args), "rate": args.rate if math.isfinite(args.rate) else "inf"}  # JSON has no Infinity
    result = {"bench": "serve", "shape": args.shape, "device": device, "settings": settings, "plan": planned,
              "rows": rows, "complete": done}
    if args.json:
        text = json.dumps(result, indent=1)
        atomic_write(pathlib.Path(args.json), lambda tmp: pathlib.Path(tmp).write_text(text))
    if not done:
        return result
    rate = "all at t=0" if math.isinf(args.rate) else f"at {args.rate}/s"
    print(f"\nserving, shape {args.shape}, {args.requests} requests {rate}, prompts "
          f"{args.prompt_min}-{args.prompt_max}, {args.max_new_tokens} new tokens, {args.adapters} adapters "
          f"registered, {args.resident} resident, {device}")
    print(f"{'mode':11s} {'req/s':>8s} {'tok/s':>9s} {'p50 s':>7s} {'p99 s':>7s} {'ttft50':>7s} {'ttft99':>7s} "
          f"{'tok/s vs base':>13s} {'register':>17s}")
    for mode, r in rows.items():
        print(row_line(mode, r, rows.get("base")))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except PlanError as e:
        sys.exit(f"bench_serve: {e}")
