"""Fused NF4 dequantize-matmul vs dequantize-then-cuBLAS on one GPU: where the crossover lies.

For each weight (N, K) (NF4, blocksize 64, double quantization, random bf16 weights) and token count
M, times with ``triton.testing.do_bench`` (median; it flushes L2 before every call, so the weight
comes from HBM as in a real forward):

* ``dq+cublas``: ``F.linear(x, q.dequantize(bf16))``, the Triton dequantizer then cuBLAS (today's path);
* ``cublas``: ``F.linear(x, w)`` on an already dense bf16 weight (the floor for large M, for reference);
* ``fused``: ``fused_quant_matmul(x, q)`` with its default tile config, and the best of a small sweep.

First it checks on the GPU that the fused kernel matches a float64 reference at these sizes.
Prints the table last, writes JSON:

    python bench/bench_quant_matmul.py --json $OUT/bench_quant_matmul.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K) = (out, in): attention, MLP up/gate, MLP down
TOKENS = [1, 8, 32, 128, 512, 2048, 4096]

# (block_m, block_n, block_k, num_warps, num_stages) per M bucket; split K is auto (and 1 for the first).
SWEEP = {
    "small": [(16, 64, 256, 4, 3), (16, 32, 256, 4, 3), (16, 128, 128, 4, 3), (16, 64, 128, 4, 4), (16, 128, 256, 8, 3)],
    "mid": [(32, 64, 128, 4, 3), (64, 64, 128, 4, 3), (32, 128, 128, 4, 3), (64, 128, 64, 4, 4)],
    "large": [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)],
}


def bucket(M: int) -> str:
    return "small" if M <= 16 else "mid" if M <= 64 else "large"


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench_quant_matmul.json")
    ap.add_argument("--no-sweep", action="store_true", help="time only the default config")
    args = ap.parse_args()

    import triton
    from triton.testing import do_bench

    from deltatune.quant import nf4
    from deltatune.quant.triton_matmul import Config, auto_split, default_config, fused_quant_matmul

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__)
    print(info, flush=True)

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us

    rows, checks = [], []
    for N, K in SHAPES:
        w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        q = nf4.quantize_4bit(w, "nf4", 64, True)
        dense = q.dequantize(torch.bfloat16)
        w64 = nf4.dequantize_4bit(q, torch.float64)
        for M in (1, 8, 128, 4096):  # correctness at the benchmark sizes, fresh x each time
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y = fused_quant_matmul(x, q)
            ref = x.double() @ w64.T
            checks.append(dict(N=N, K=K, M=M, rel_fp64=rel(y, ref), rel_fp64_dq_cublas=rel(F.linear(x, dense), ref),
                               rel_vs_dq_cublas=rel(y, F.linear(x, dense))))
            print("check", checks[-1], flush=True)
        del w64
        for M in TOKENS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            t_dq = bench(lambda: F.linear(x, q.dequantize(torch.bfloat16)))
            t_cublas = bench(lambda: F.linear(x, dense))
            cfg0 = default_config(M, N, K, dev)
            t_default = bench(lambda: fused_quant_matmul(x, q, cfg0))
            sweep = []
            if not args.no_sweep:
                for i, (bm, bn, bk, warps, stages) in enumerate(SWEEP[bucket(M)]):
                    splits = {auto_split(M, N, K, bm, bn, bk, dev)} | ({1} if i == 0 else set())
                    for split in sorted(splits):
                        cfg = Config(bm, bn, bk, split, warps, stages)
                        try:
                            err = rel(fused_quant_matmul(x, q, cfg), F.linear(x, dense))
                            t = bench(lambda: fused_quant_matmul(x, q, cfg))
                        except Exception as e:  # e.g. out of shared memory
                            print("config failed", cfg, type(e).__name__, str(e)[:200], flush=True)
                            continue
                        sweep.append(dict(config=list(cfg), us=t, rel_vs_dq_cublas=err))
            best = min(sweep, key=lambda s: s["us"]) if sweep else dict(config=list(cfg0), us=t_default)
            if best["us"] > t_default:
                best = dict(config=list(cfg0), us=t_default)
            row = dict(N=N, K=K, M=M, dq_cublas_us=t_dq, cublas_us=t_cublas, fused_default_us=t_default,
                       default_config=list(cfg0), fused_best_us=best["us"], best_config=best["config"], sweep=sweep)
            rows.append(row)
            print(f"{N}x{K} M={M}: dq+cublas {t_dq:.1f} cublas {t_cublas:.1f} fused default {t_default:.1f} "
                  f"best {best['us']:.1f} {best['config']}", flush=True)
        del dense, q, w
        torch.cuda.empty_cache()

    with open(args.json, "w") as f:
        json.dump(dict(info=info, checks=checks, rows=rows, date=time.strftime("%Y-%m-%d")), f, indent=1)

    print("\nchecks: max rel err vs fp64 (fused / dq+cublas):",
          f"{max(c['rel_fp64'] for c in checks):.2e} / {max(c['rel_fp64_dq_cublas'] for c in checks):.2e}")
    print(f"\n{info['device']}, NF4 blocksize 64 double quant, bf16, median us (do_bench, L2 flushed)\n")
    print("| weight (N x K) | M | dq+cuBLAS | cuBLAS dense | fused default | fused best | best config (bm,bn,bk,split,warps,stages) | dq+cuBLAS / fused |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fused = min(r["fused_default_us"], r["fused_best_us"])
        print(f"| {r['N']}x{r['K']} | {r['M']} | {r['dq_cublas_us']:.1f} | {r['cublas_us']:.1f} | "
              f"{r['fused_default_us']:.1f} | {r['fused_best_us']:.1f} | {tuple(r['best_config'])} | "
              f"{r['dq_cublas_us'] / r['fused_default_us']:.2f}x (best {r['dq_cublas_us'] / fused:.2f}x) |")


if __name__ == "__main__":
    main()
