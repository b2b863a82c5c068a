"""QLoRA training speed and memory on one GPU: deltatune NF4 vs deltatune bf16 LoRA vs PEFT + bitsandbytes.

Llama-3.2-1B and Llama-3-8B shapes (transformers ``LlamaConfig``, random bf16 weights built on the
GPU), LoRA r=16 on all seven linear projections, fp32 adapters and ``torch.optim.AdamW`` for every
method, ``model(input_ids, labels=...).loss`` (transformers' own loss), random tokens:

* ``dt-qlora``: ``deltatune.quantize_model(nf4, blocksize 64, double quant, bf16 compute)`` then
  ``deltatune.add_adapter``; the base dequantizes with deltatune's Triton kernel, then cuBLAS.
* ``dt-bf16``: ``deltatune.add_adapter`` on the bf16 model.
* ``dt-qlora-fast`` / ``dt-bf16-fast``: the same plus ``deltatune.fast.enable_fast_path`` (fused LoRA
  linears, attention, MLP and RMSNorm where they apply, its own lean checkpointing on 8B) and
  ``fused_causal_lm_loss`` (head + cross-entropy chunked, no full logits). Quantized projections run
  inside the fused nodes, dequantized by the Triton kernel in forward and backward.
* ``peft-bnb``: every projection replaced by ``bitsandbytes.nn.Linear4bit`` (nf4, double quant, bf16
  compute; the module ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` builds, made
  here from the same random weights without a round trip through disk), ``model.is_loaded_in_4bit``
  set, then ``peft.get_peft_model`` (PEFT's defaults). No ``prepare_model_for_kbit_training``.
* ``peft-bnb-prepare``: the same after ``peft.prepare_model_for_kbit_training`` (PEFT's documented QLoRA
  recipe: non-quantized weights cast to fp32, its own reentrant checkpointing on every shape).
* ``peft-bnb-nockpt``: ``peft-bnb`` without gradient checkpointing on any shape.
* ``<dt method>-fast@F`` (8B): the fast path recomputing only the fraction F of the decoder layers (0: none).
* ``<dt method>+paged``: ``deltatune.train.optim.AdamW(state_device="paged")`` instead of torch's AdamW (its
  states live in CUDA managed memory, outside torch's allocator, so outside ``peak GiB``).
* ``<dt method>-fast...+graphs``: the fast path with ``cuda_graphs=True`` (the layers that are not
  checkpointed replay from CUDA graphs, ``deltatune.fast.graphs``). Graph replays allocate nothing, so the
  allocator's peak does not see them: ``peak reserved GiB`` (memory the process holds, including the
  graphs' pool) is the column to compare for these rows.

The 8B shape uses transformers' gradient checkpointing (non-reentrant) for all three. Before the
timing, the script checks on the GPU that the Triton dequantizer equals the PyTorch reference and
compares deltatune's quantizer with bitsandbytes' CUDA one. Prints a table, writes JSON:

    python bench/bench_qlora.py --shapes 1b,8b --json bench_qlora.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, batch=4, seq=2048, checkpointing=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, batch=2, seq=2048, checkpointing=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("dt-qlora", "dt-bf16", "peft-bnb", "dt-qlora-fast", "dt-bf16-fast")
EXTRA_METHODS = ("peft-bnb-prepare", "peft-bnb-nockpt")  # PEFT's recipe; no checkpointing (the baselines?)
GIB = 2 ** 30
FUSED_ADAM = False  # --fused-adam: torch's single-kernel AdamW for every method


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq", "checkpointing")}
    cfg = LlamaConfig(**spec, max_position_embeddings=4096, rope_theta=500000.0, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def to_bnb(model):
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and name.rpartition(".")[2] in TARGETS:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", blocksize=64).to(module.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            del module
    model.is_loaded_in_4bit = True
    return model


def prepare(method: str, shape: str, rank: int):
    """(model to call, trainable params) for ``method`` on a fresh random model of ``shape``."""
    import deltatune as dt

    model = build(shape)
    if method.startswith("peft-bnb"):
        import peft

        to_bnb(model)
        if method == "peft-bnb-prepare":  # PEFT's documented QLoRA recipe; it turns checkpointing on itself
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    else:
        if method.startswith("dt-qlora"):
            dt.quantize_model(model, kind="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
        dt.add_adapter(model, dt.LoraConfig(r=rank, alpha=2 * rank, targets=TARGETS))
    if "-fast" in method:  # deltatune's fast path: fused blocks where they apply, lean checkpointing
        from deltatune.fast import enable_fast_path

        base = method.split("+")[0]
        fraction = float(base.partition("@")[2] or 1.0)  # "dt-qlora-fast@0.5": half the layers recomputed
        enable_fast_path(model, checkpoint=fraction if SHAPES[shape]["checkpointing"] and fraction > 0 else False,
                         cuda_graphs="+graphs" in method)
    elif SHAPES[shape]["checkpointing"] and method not in ("peft-bnb-prepare", "peft-bnb-nockpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def run(method: str, shape: str, steps: int, warmup: int, rank: int, profile: bool = False,
        trace: str | None = None) -> dict:
    spec = SHAPES[shape]
    row = {"method": method, "shape": shape, "tokens_per_step": spec["batch"] * spec["seq"]}
    from deltatune.fast import fused_causal_lm_loss

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        model, params = prepare(method, shape, rank)
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        row["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        row["trainable_params"] = sum(p.numel() for p in params)
        if "+paged" in method:  # deltatune's AdamW with its states in CUDA managed memory
            from deltatune.train.optim import AdamW

            opt = AdamW(params, lr=1e-4, weight_decay=0.01, state_device="paged")
        else:
            opt = torch.optim.AdamW(params, lr=1e-4, fused=FUSED_ADAM or None)
        gen = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.empty_cache()  # the reserved peak starts from what the model holds
        torch.cuda.reset_peak_memory_stats()
        times, losses, phases = [], [], []
        for i in range(warmup + steps):
            ids = torch.randint(0, 128000, (spec["batch"], spec["seq"]), device="cuda", generator=gen)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            events[0].record()
            loss = fused_causal_lm_loss(model, ids, ids) if "-fast" in method else model(input_ids=ids, labels=ids).loss
            t_fwd = time.perf_counter()
            events[1].record()
            loss.backward()
            t_bwd = time.perf_counter()
            events[2].record()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t_opt = time.perf_counter()
            events[3].record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
                # host time to issue each phase vs GPU time from the previous mark (the GPU may lag the host)
                phases.append([t_fwd - t, t_bwd - t_fwd, t_opt - t_bwd] + [events[j].elapsed_time(events[j + 1]) / 1e3
                                                                          for j in range(3)])
            losses.append(loss.item())
        row["step_s"] = round(sorted(times)[len(times) // 2], 4)
        mid = sorted(phases, key=lambda ph: sum(ph[3:]))[len(phases) // 2]
        row["phases_ms"] = {name: round(v * 1e3, 1) for name, v in
                            zip(("host fwd", "host bwd", "host opt", "gpu fwd", "gpu bwd", "gpu opt"), mid)}
        row["tokens_per_s"] = round(row["tokens_per_step"] / row["step_s"])
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        row["loss_first_last"] = [round(losses[0], 3), round(losses[-1], 3)]
        if profile:
            safe = re.sub(r"[^\w.-]", "_", method)
            row["profile"] = profile_steps(model, method, spec, opt, trace=trace and f"{trace}.{shape}.{safe}.json")
        del model, params, opt
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM: " + str(e).split("\n")[0][:160]
    except Exception as e:  # keep the other rows
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    gc.collect()
    torch.cuda.empty_cache()
    return row


def profile_steps(model, method: str, spec: dict, opt, steps: int = 2, trace: str | None = None) -> dict:
    """Host and GPU time of ``steps`` training steps under torch.profiler, and the top host-side ops.

    ``trace``: also write the last step's kernels in launch order (name, start and duration in us) as JSON.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from deltatune.fast import fused_causal_lm_loss

    ids = torch.randint(0, 128000, (spec["batch"], spec["seq"]), device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            loss = fused_causal_lm_loss(model, ids, ids) if "-fast" in method else model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # GPU-side events only (no double count)
    gpu = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                          "cudaLaunchKernelExC", "cudaGraphLaunch")) / steps
    categories: dict = {}
    for e in kernels:
        name = e.key.lower()
        cat = next((c for c, pats in KERNEL_CATEGORIES if any(p in name for p in pats)), "other")
        categories[cat] = categories.get(cat, 0.0) + e.self_device_time_total / steps / 1e3
    if trace:
        seq = sorted(((e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[1])
        if seq:
            last = seq[-(len(seq) // steps):]
            with open(trace, "w") as f:
                json.dump([(n, round(s - last[0][1], 2), round(d, 2)) for n, s, d in last], f)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"wall_ms_profiled": round(wall * 1e3, 1), "gpu_kernels_ms": round(gpu, 1), "launches": launches,
            "gpu_ms_by_category": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_host_ops_ms": {e.key[:70]: round(e.self_cpu_time_total / steps / 1e3, 2) for e in top},
            "top_kernels_ms": {f"{e.key[:90]} x{e.count // steps}": round(e.self_device_time_total / steps / 1e3, 2)
                               for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:40]}}


# Kernel-name patterns per category, first match wins (profile_steps).
KERNEL_CATEGORIES = (
    ("attention", ("sdpa", "flash", "attention", "fmha")),
    ("dequant", ("dequant",)),
    ("swiglu", ("swiglu",)),
    ("rmsnorm", ("rmsnorm",)),
    ("rope", ("rope",)),
    ("cross-entropy", ("_ce_", "cross_entropy", "log_softmax")),
    ("optimizer", ("multi_tensor", "adam")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "splitk", "reduce_kernel")),
    ("copy/cast", ("copy", "cast")),
    ("elementwise", ("elementwise", "vectorized")),
)


def kernel_checks() -> dict:
    """Triton dequantizer vs the PyTorch reference, its bandwidth, and deltatune vs bitsandbytes' CUDA quantizer."""
    from deltatune.quant import nf4, triton_dequant

    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    mismatches = 0
    for kind in ("nf4", "fp4"):
        for dq in (False, True):
            for shape, bs in (((37, 29), 32), ((9, 130), 64), ((300, 700), 256), ((2, 4100), 4096)):
                x = torch.randn(shape, device="cuda", generator=g) * 0.1
                q = nf4.quantize_4bit(x, kind, bs, dq)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    mismatches += not torch.equal(triton_dequant.dequantize_4bit(q, dtype), nf4.dequantize_4bit(q, dtype))
    out["triton_vs_reference_mismatching_cases"] = mismatches

    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = nf4.quantize_4bit(w, "nf4", 64, True)

    def timed(fn, n=20):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    buf = torch.empty_like(w)
    t_triton = timed(lambda: triton_dequant.dequantize_4bit(q, torch.bfloat16, out=buf))
    t_ref = timed(lambda: nf4.dequantize_4bit(q, torch.bfloat16))
    moved = w.numel() * 2 + q.nbytes
    out["dequant_14336x4096_us"] = {"triton": round(t_triton * 1e6, 1), "torch_reference": round(t_ref * 1e6, 1)}
    out["dequant_triton_GBps"] = round(moved / t_triton / 1e9)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out["matmul_4096tok_x_14336x4096_us"] = round(timed(lambda: torch.nn.functional.linear(x, buf)) * 1e6, 1)
    try:
        import bitsandbytes.functional as F

        for kind in ("nf4", "fp4"):
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=True)
            ours = nf4.quantize_4bit(w, kind, 64, True)
            out[f"bnb_cuda_{kind}_packed_bytes_equal_fraction"] = (packed == ours.packed).float().mean().item()
            out[f"bnb_cuda_{kind}_absmax_codes_equal_fraction"] = (state.absmax == ours.absmax).float().mean().item()
            theirs = F.dequantize_4bit(packed, state)
            mine = ours.dequantize(torch.bfloat16)
            out[f"bnb_cuda_{kind}_dequant_equal_fraction"] = (theirs == mine).float().mean().item()
            out[f"bnb_cuda_{kind}_dequant_max_rel_diff"] = ((theirs.float() - mine.float()).abs().max() / w.abs().max()).item()
            out[f"bnb_cuda_{kind}_dequant_own_packed_equal"] = torch.equal(
                F.dequantize_4bit(ours.packed, state), nf4.QuantizedTensor(
                    ours.packed, state.absmax, w.shape, w.dtype, kind, 64, state.state2.absmax, state.offset).dequantize())
            bnb_t = timed(lambda: F.dequantize_4bit(packed, state))
            out[f"bnb_cuda_dequant_{kind}_us"] = round(bnb_t * 1e6, 1)
    except ImportError as e:
        out["bitsandbytes"] = f"not importable: {e}"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default="bench_qlora.json")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile two steps per row (host/GPU time, top ops)")
    ap.add_argument("--trace", help="with --profile: write each row's kernel sequence to TRACE.<shape>.<method>.json")
    ap.add_argument("--fused-adam", action="store_true", help="torch.optim.AdamW(fused=True) for every method")
    args = ap.parse_args(argv)
    global FUSED_ADAM
    FUSED_ADAM = args.fused_adam
    if not torch.cuda.is_available():
        raise SystemExit("bench_qlora.py needs a CUDA GPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "rows": []}
    for mod in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            result[mod] = __import__(mod).__version__
        except Exception as e:
            result[mod] = f"missing ({type(e).__name__})"
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if not args.skip_checks:
        result["checks"] = kernel_checks()
        print(json.dumps(result["checks"], indent=1), flush=True)
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            row = run(method, shape, args.steps, args.warmup, args.rank, args.profile, args.trace)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    print(table(result["rows"]))


def table(rows) -> str:
    """Markdown table; ratios against our bf16 LoRA on the same path and against each PEFT baseline run."""
    by = {(r["shape"], r["method"]): r for r in rows}
    baselines = [m for m in ("peft-bnb", "peft-bnb-nockpt") if any(r["method"] == m for r in rows)]
    head = ["shape", "tokens/step", "method", "tokens/s", "peak GiB", "peak reserved GiB", "weights GiB",
            "vs dt-bf16 (same path) speed"]
    for m in baselines:
        head += [f"vs {m} speed", f"vs {m} memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratio = lambda a, b, k: f"{a[k] / b[k]:.2f}x" if k in a and k in b else "-"
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['tokens_per_step']} | {r['method']} | {r['error'][:60]} |" + " |" * (len(head) - 4))
            continue
        cells = [r["shape"], r["tokens_per_step"], r["method"], r["tokens_per_s"], r["peak_gib"],
                 r.get("peak_reserved_gib", "-"), r["weights_gib"],
                 ratio(r, by.get((r["shape"], r["method"].replace("qlora", "bf16")), {}), "tokens_per_s")
                 if r["method"].startswith("dt-") else "-"]
        for m in baselines:
            base = by.get((r["shape"], m), {})
            cells += [ratio(r, base, "tokens_per_s"), ratio(r, base, "peak_gib")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
