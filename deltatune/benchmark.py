"""LoRA training speed, side by side with PEFT in one process: ``deltatune bench`` / ``bench/bench_lora.py``.

Builds a Llama-shaped model with random bf16 weights on the GPU and trains a few steps of each method on
the same random tokens with the same LoRA settings and AdamW over the adapter parameters:

* ``frozen``: no adapter, base frozen, forward + backward to the inputs (the floor LoRA adds to);
* ``peft``: ``get_peft_model`` with PEFT's defaults (fp32 adapter weights), ``model(..., labels).loss``;
* ``plain``: deltatune's plain PyTorch path, same loss call;
* ``fast``: deltatune's fast path (``enable_fast_path`` + ``fused_causal_lm_loss``); ``fast-lora``,
  ``fast-lora-ce`` and ``fast-cudnn`` are its partial steps, for measuring each change;
* ``peft-dora``, ``plain-dora``, ``fast-dora``: the same with DoRA (``use_dora=True`` in both libraries);
  ``--use-dora`` adds them beside the chosen ``peft``/``plain``/``fast``, and the table gives each DoRA
  row's step time over its LoRA row's (``DoRA/LoRA step``).

It prints a table (tokens/s, peak memory, MFU against a measured bf16 matmul peak, ratio to PEFT) and
writes JSON. ``--longest`` also searches the longest sequence (batch 1) that trains for PEFT and the fast
path (with checkpointing; the fast path offloads its checkpoints to the CPU).

MFU counts model FLOPs per token: 4 N for the frozen linear layers (forward and input gradient; N the
weights of all linear layers and the head), 6 N_lora for the adapters, and 6 L T d for causal attention
(forward 2 T d, backward 4 T d per layer). Recomputation under checkpointing is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

SHAPES = {
    # Llama-3.2-1B: tied embeddings, head dim 64
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3.1-8B
    # a few-MB model for checking the harness on CPU
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("frozen", "peft", "plain", "fast")
# Steps of the fast path, for measuring each change: fused LoRA linears only; + fused head and loss;
# everything (+ attention/MLP/RMSNorm kernels) = "fast"; "fast-cudnn" with cuDNN attention.
VARIANTS = ("fast-lora", "fast-lora-ce", "fast-cudnn")
DORA = ("peft-dora", "plain-dora", "fast-dora")  # DoRA (use_dora) in PEFT and on our two paths


def build_model(shape: str, layers: int | None = None, device: str = "cuda"):
    """A LlamaForCausalLM of ``shape`` with random bf16 weights on ``device`` (sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw, max_position_embeddings=1 << 20, rope_theta=500000.0, rms_norm_eps=1e-5,
                         attn_implementation="sdpa", use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    return model


def matmul_peak(device="cuda", n=8192, reps=20) -> float:
    """Measured bf16 matmul rate in FLOP/s (median of ``reps`` n^3 products on random data)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def flops_per_token(model, seq: int, n_linear: int, lora_params: int) -> float:
    """Model FLOPs per trained token (see the module docstring); ``n_linear`` counts the head too."""
    cfg = model.config
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return 4 * n_linear + 6 * lora_params + 6 * cfg.num_hidden_layers * seq * d_attn


def _linear_params(model) -> int:
    """Weights of the linear layers of a model without adapters (a tied head counts once more: it runs)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _cuda() -> bool:
    return _DEVICE[0] == "cuda"


_DEVICE = ["cuda"]


def _sync():
    if _cuda():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _hf_checkpointing(model, on: bool) -> None:
    """transformers' own non-reentrant activation checkpointing (the older name works in 4.x and 5.x)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


class Method:
    """Attach a method to the model, give (loss function, trainable params), detach it."""

    def __init__(self, name, model, args, checkpoint, offload=False):
        self.name, self.model, self.args, self.ckpt, self.offload = name, model, args, checkpoint, offload
        self.peft_model = None

    def __enter__(self):
        import deltatune as dt

        m, a = self.model, self.args
        name, dora = self.name.removesuffix("-dora"), self.name.endswith("-dora")
        if name == "frozen":
            m.enable_input_require_grads()
            if self.ckpt:
                _hf_checkpointing(m, True)
            self.params = []
            return self._hf_loss(m)
        if name == "peft":
            import peft

            cfg = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS,
                                  use_dora=dora)
            if self.ckpt:
                _hf_checkpointing(m, True)
            self.peft_model = peft.get_peft_model(m, cfg)
            self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
            return self._hf_loss(self.peft_model)
        dt.add_adapter(m, dt.LoraConfig(r=a.rank, alpha=a.alpha, targets=TARGETS, dtype="float32", use_dora=dora),
                       name="bench")
        self.params = dt.adapter_params(m)
        if name == "plain":
            if self.ckpt:
                _hf_checkpointing(m, True)
            return self._hf_loss(m)
        from deltatune.fast import enable_fast_path, fused_causal_lm_loss

        kernels = name in ("fast", "fast-cudnn")
        enable_fast_path(m, kernels=kernels, checkpoint=self.ckpt, offload=self.offload,
                         attention="cudnn" if name == "fast-cudnn" else "sdpa")
        if name == "fast-lora":
            return self._hf_loss(m)
        return lambda ids: fused_causal_lm_loss(m, ids, ids)

    @staticmethod
    def _hf_loss(m):
        return lambda ids: m(input_ids=ids, labels=ids, use_cache=False).loss

    def __exit__(self, *exc):
        import deltatune as dt

        m = self.model
        if self.name == "frozen":
            m.disable_input_require_grads()
        elif self.name.startswith("peft"):
            self.peft_model.unload()
        else:
            if self.name.startswith("fast"):
                from deltatune.fast import disable_fast_path

                disable_fast_path(m)
            dt.remove_adapter(m, "bench")
        if self.ckpt:
            _hf_checkpointing(m, False)
        m.requires_grad_(False)
        self.peft_model = self.params = None
        _free()


def train_steps(loss_fn, params, ids, steps, warmup):
    """Run warmup + timed steps; returns (median seconds per step, peak GiB, first loss, last loss).

    Each timed step ends with a device synchronisation, so one slow step (an allocator stall, a late
    compile) moves the median, not the result; the step times go to ``train_steps.last_times``.
    """
    opt = torch.optim.AdamW(params, lr=1e-4, fused=_cuda()) if params else None
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if _cuda() else float("nan")
    del opt
    train_steps.last_times = times
    return sorted(times)[len(times) // 2], peak, losses[0].item(), losses[-1].item()


def run_shape(model, shape, args, batch, seq, checkpoint, peak_flops, log):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(_DEVICE[0])
    n_linear = _linear_params(model)  # the bare model's linear weights (head included)
    rows = []
    for name in args.methods:
        torch.manual_seed(0)
        row = dict(shape=shape, method=name, batch=batch, seq=seq, checkpoint=checkpoint)
        with Method(name, model, args, checkpoint) as loss_fn:
            params = _params_of(model, name)
            try:
                sec, peak, first, last = train_steps(loss_fn, params, ids, args.steps, args.warmup)
            except torch.OutOfMemoryError as e:
                row["error"] = f"OOM: {e}"[:200]
            except Exception as e:  # report and go on to the next method
                import traceback

                row["error"] = f"{type(e).__name__}: {e}"[:300]
                log(traceback.format_exc())
            else:
                lora = sum(p.numel() for p in params)
                tok_s = batch * seq / sec
                mfu = tok_s * flops_per_token(model, seq, n_linear, lora) / peak_flops
                row.update(tokens_per_s=tok_s, step_s=sec, step_times=train_steps.last_times, peak_gib=peak, mfu=mfu,
                           loss_first=first, loss_last=last, adapter_params=lora)
            del params
        rows.append(row)
        log(json.dumps(row))
    if args.profile:
        for name in [m for m in ("fast", "fast-dora") if m in args.methods] or ["fast"]:
            with Method(name, model, args, checkpoint) as loss_fn:
                log(f"profile of {name}:")
                log(profile(loss_fn, _params_of(model, name), ids))
    done = {r["method"]: r for r in rows if "error" not in r}
    for r in done.values():
        dora = r["method"].endswith("-dora")
        base = done.get("peft-dora" if dora else "peft")  # DoRA rows beside PEFT's DoRA
        if base:
            r["vs_peft_speed"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["vs_peft_memory"] = r["peak_gib"] / base["peak_gib"]
        lora = done.get(r["method"].removesuffix("-dora")) if dora else None
        if lora:  # the measure: DoRA's step time over LoRA's, same path
            r["dora_vs_lora_step"] = r["step_s"] / lora["step_s"]
    return rows


def profile(loss_fn, params, ids, steps=2) -> str:
    """The top GPU kernels of ``steps`` training steps (after one warm-up), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    train_steps(loss_fn, params, ids, 1, 0)
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        train_steps(loss_fn, params, ids, steps, 0)
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)


def _params_of(model, name):
    import deltatune as dt

    if name == "frozen":
        return []
    if name.startswith("peft"):
        return [p for n, p in model.named_parameters() if p.requires_grad]
    return dt.adapter_params(model)


def longest(model, args, method, lengths, log):
    """The longest sequence (batch 1) in ``lengths`` for which one training step of ``method`` fits."""
    best = None
    for seq in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device=_DEVICE[0])
        ok = True
        with Method(method, model, args, checkpoint=True, offload=(method == "fast")) as loss_fn:
            try:
                t0 = time.perf_counter()
                train_steps(loss_fn, _params_of(model, method), ids, 1, 0)
                peak = torch.cuda.max_memory_allocated() / 2 ** 30 if _cuda() else float("nan")
                log(json.dumps(dict(method=method, seq=seq, ok=True, peak_gib=peak, seconds=time.perf_counter() - t0)))
            except torch.OutOfMemoryError:
                ok = False
                log(json.dumps(dict(method=method, seq=seq, ok=False)))
            except Exception as e:  # report, count as not training, go on
                import traceback

                ok = False
                log(traceback.format_exc())
                log(json.dumps(dict(method=method, seq=seq, ok=False, error=f"{type(e).__name__}: {e}"[:300])))
        del ids
        _free()
        if not ok:
            break
        best = seq
    return best


def format_table(rows, peak_flops) -> str:
    lines = [f"bf16 matmul peak measured: {peak_flops / 1e12:.0f} TFLOP/s",
             "| shape | batch x seq | ckpt | method | tokens/s | peak GiB | MFU | speed vs PEFT | memory vs PEFT "
             "| DoRA/LoRA step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['shape']} | {r['batch']}x{r['seq']} | {'yes' if r['checkpoint'] else 'no'} | {r['method']} |"
        if "error" in r:
            lines.append(head + " OOM | | | | | |")
            continue
        vs = f"{r['vs_peft_speed']:.2f}x | {r['vs_peft_memory']:.2f}x" if "vs_peft_speed" in r else "| "
        dora = f"{r['dora_vs_lora_step']:.2f}x" if "dora_vs_lora_step" in r else ""
        lines.append(head + f" {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {100 * r['mfu']:.0f}% | {vs} | {dora} |")
    return "\n".join(lines)


def main(argv=None):
    """``deltatune bench``: parse ``argv``, run the benchmark, print the table, write JSON; returns the rows."""
    p = argparse.ArgumentParser(prog="deltatune bench", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b, tiny (a CPU check of the harness)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the harness (no timings that matter)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated: " + ", ".join(METHODS + VARIANTS + DORA))
    p.add_argument("--use-dora", action="store_true",
                   help="also run DoRA beside each of peft, plain, fast chosen (peft-dora, plain-dora, fast-dora)")
    p.add_argument("--profile", action="store_true", help="profile two fast-path steps per shape (top kernels), fast-dora too with --use-dora")
    p.add_argument("--batch-1b", type=int, default=4)
    p.add_argument("--seq-1b", type=int, default=2048)
    p.add_argument("--batch-8b", type=int, default=2)
    p.add_argument("--seq-8b", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--steps", type=int, default=7, help="timed steps; tokens/s uses the median step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--longest", default="", help="comma-separated sequence lengths to try on the 8b shape")
    p.add_argument("--json", default="bench_lora.json")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.use_dora:
        args.methods += [f"{m}-dora" for m in args.methods if f"{m}-dora" in DORA and f"{m}-dora" not in args.methods]
    _DEVICE[0] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("deltatune bench needs a CUDA GPU (or --device cpu --shapes tiny to check the harness)")
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    device_name = torch.cuda.get_device_name() if _cuda() else "cpu"
    peak_flops = matmul_peak() if _cuda() else float("nan")
    log(f"device: {device_name}, torch {torch.__version__}, matmul peak {peak_flops / 1e12:.0f} TFLOP/s")
    rows, longest_rows = [], {}
    for shape in args.shapes.split(","):
        model = build_model(shape, args.layers, args.device)
        batch, seq = (args.batch_8b, args.seq_8b) if shape == "8b" else (args.batch_1b, args.seq_1b)
        rows += run_shape(model, shape, args, batch, seq, shape != "1b", peak_flops, log)
        if shape != "1b" and args.longest:
            lengths = [int(s) for s in args.longest.split(",")]
            for method in ("peft", "fast"):
                longest_rows[method] = longest(model, args, method, lengths, log)
            log(json.dumps({"longest_seq_8b": longest_rows}))
        del model
        _free()
    table = format_table(rows, peak_flops)
    with open(args.json, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__, matmul_peak=peak_flops,
                       rows=rows, longest_seq_8b=longest_rows, args=vars(args)), f, indent=1)
    print(table)
    if longest_rows:
        print("longest sequence that trains on the 8b shape (batch 1): "
              + ", ".join(f"{k} {v}" for k, v in longest_rows.items()))
    return rows


if __name__ == "__main__":
    main()
