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

Requests arrive at ``--rate`` per second (exponential gaps, seeded). Reported per mode: requests/s and
generated tokens/s over the makespan, latency (arrival to last token) and time to first token, p50
and p99, and the ratio to the base row. Prints a table and one JSON line (``--json FILE`` too):

    python bench/bench_serve.py --shape 1b --json bench_serve.json
    python bench/bench_serve.py --shape tiny --requests 12 --rate 50 --adapters 4   # a CPU check of the harness
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import deltatune as dt  # noqa: E402
from deltatune.serve import AdapterPool, Engine  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (Llama-3.2-1B, Llama-3.1-8B)
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (64, 160, 2, 4, 2, 512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, device: str, dtype: torch.dtype):
    import transformers

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def make_adapters(model, root: pathlib.Path, count: int, ranks: list[int]) -> list[pathlib.Path]:
    """``count`` LoRA adapter directories under ``root`` (made once; reused when present)."""
    paths = []
    for i in range(count):
        path = root / f"adapter_{i:04d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").is_file():
            continue
        r = ranks[i % len(ranks)]
        torch.manual_seed(1000 + i)
        dt.add_adapter(model, dt.LoraConfig(r=r, alpha=2 * r, targets=TARGETS, init="random"), name="new")
        with torch.no_grad():
            for p in dt.adapter_params(model):
                p.normal_(0, 0.02)
        dt.save_adapter(model, path, "new")
        dt.remove_adapter(model, "new")
    return paths


def workload(args, vocab: int) -> list[dict]:
    """The requests: arrival time (s), prompt token ids, adapter index."""
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        n = rng.randint(args.prompt_min, args.prompt_max)
        out.append({"at": t, "prompt": [rng.randrange(vocab) for _ in range(n)], "adapter": rng.randrange(args.adapters)})
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--modes", default="base,pool",
                    help="comma-separated: base, pool, routing; base-graphs, pool-graphs: decode steps from CUDA graphs")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--resident", type=int, default=64, help="pool slots on the device")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--gpu-memory-fraction", type=float, default=0.5,
                    help="weights + KV cache; the pool's slots come from the rest")
    ap.add_argument("--adapter-dir", default=None, help="where the adapters are saved (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(args.shape, device, dtype)
    tmp = tempfile.TemporaryDirectory() if args.adapter_dir is None else None
    root = pathlib.Path(args.adapter_dir or tmp.name)
    ranks = [int(r) for r in args.ranks.split(",")]
    paths = make_adapters(model, root, args.adapters, ranks)
    requests = workload(args, model.config.vocab_size)
    engine_kw = dict(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                     gpu_memory_fraction=args.gpu_memory_fraction, seed=args.seed)
    if not cuda:
        engine_kw["num_blocks"] = 4 * args.max_num_seqs * (args.prompt_max + args.max_new_tokens) // 16
    rows = {}
    for mode in args.modes.split(","):
        kind = mode.removesuffix("-graphs")  # "base-graphs", "pool-graphs": decode steps from CUDA graphs
        # max_rank: the pool's slots are planned beside the KV cache (Engine.memory_plan)
        pool = AdapterPool(model, max_resident=args.resident, max_rank=max(ranks)) if kind == "pool" else None
        engine = Engine(model, None, pool=pool, max_resident_adapters=args.adapters,
                        cuda_graphs=mode.endswith("-graphs"), **engine_kw)
        if kind != "base":
            for i, path in enumerate(paths):
                engine.add_adapter(f"a{i}", str(path))
        names = [None if kind == "base" else f"a{r['adapter']}" for r in requests]
        serve(engine, requests[:4], names[:4], 8)  # warm-up: kernels compiled, slots allocated
        rows[mode] = serve(engine, requests, names, args.max_new_tokens)
        rows[mode]["distinct_adapters"] = len({n for n in names if n})
        rows[mode]["kv_blocks"] = engine.memory_plan["num_blocks"]
        rows[mode]["adapter_pool_bytes"] = engine.memory_plan["adapter_pool_bytes"]
        rows[mode]["decode_graph_bytes"] = engine.memory_plan["decode_graph_bytes"]  # the estimate set aside
        if kind == "routing":
            for i in range(len(paths)):
                engine.remove_adapter(f"a{i}")
        del engine, pool
        if cuda:
            torch.cuda.empty_cache()

    base = rows.get("base")
    print(f"\nserving, shape {args.shape}, {args.requests} requests at {args.rate}/s, prompts "
          f"{args.prompt_min}-{args.prompt_max}, {args.max_new_tokens} new tokens, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"{'mode':11s} {'req/s':>8s} {'tok/s':>9s} {'p50 s':>7s} {'p99 s':>7s} {'ttft50':>7s} {'ttft99':>7s} "
          f"{'tok/s vs base':>13s}")
    for mode, r in rows.items():
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "-"
        print(f"{mode:11s} {r['requests_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['latency_p50_s']:7.2f} "
              f"{r['latency_p99_s']:7.2f} {r['ttft_p50_s']:7.3f} {r['ttft_p99_s']:7.3f} {ratio:>13s}")
    result = {"bench": "serve", "shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "settings": vars(args), "rows": rows}
    print(json.dumps(result))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
