"""NF4 dequantization on the GPU: the three Triton kernels, bitsandbytes' CUDA kernel, and the CPU cost of a call.

For each Llama weight shape (blocksize 64, double quantization, bf16 output): GPU time of the
per-element, byte-pair and blocks kernels (``triton.testing.do_bench``, L2 flushed), of the byte-pair
and blocks kernels into the left columns of a wider matrix (the stacked backward weights), a plain copy of
the bf16 weight (the bandwidth to aim at: it moves more bytes), bitsandbytes' ``dequantize_4bit`` when
importable, and the bytes moved per second. Then the host-side cost of one
call as the training path makes it (``QuantLinearKind.fused_weight`` + ``dequantize``), measured on a
small weight in a loop without synchronisation, where the GPU work is shorter than the launch.

    python bench/bench_dequant.py --json bench_dequant.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (1024, 4096), (14336, 4096),
          (4096, 14336), (6144, 4096), (28672, 4096)]


def gpu_times(shape) -> dict:
    import triton

    from deltatune.quant import nf4, triton_dequant

    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    q = nf4.quantize_4bit(w, "nf4", 64, True)
    out = torch.empty_like(w)
    ref = nf4.dequantize_4bit(q, torch.bfloat16)
    row = {"shape": list(shape)}
    for kernel in triton_dequant.KERNELS:
        out.fill_(float("nan"))
        got = triton_dequant.dequantize_4bit(q, torch.bfloat16, out=out, kernel=kernel)
        row[f"{kernel}_equal"] = torch.equal(got, ref)
        row[f"{kernel}_us"] = round(triton.testing.do_bench(
            lambda: triton_dequant.dequantize_4bit(q, torch.bfloat16, out=out, kernel=kernel), return_mode="median") * 1e3, 1)
    # into the left columns of a wider matrix (the stacked weights' backward: 32 spare columns)
    wide = torch.empty((shape[0], shape[1] + 32), device="cuda", dtype=torch.bfloat16)
    left = wide[:, :shape[1]]
    for kernel in ("pairs", "blocks"):
        wide.fill_(float("nan"))
        triton_dequant.dequantize_4bit(q, torch.bfloat16, out=left, kernel=kernel)
        row[f"strided_{kernel}_equal"] = torch.equal(left, ref)
        row[f"strided_{kernel}_us"] = round(triton.testing.do_bench(
            lambda: triton_dequant.dequantize_4bit(q, torch.bfloat16, out=left, kernel=kernel),
            return_mode="median") * 1e3, 1)
    moved = w.numel() * 2 + q.nbytes
    row["blocks_GBps"] = round(moved / (row["blocks_us"] * 1e-6) / 1e9)
    row["copy_us"] = round(triton.testing.do_bench(lambda: out.copy_(ref), return_mode="median") * 1e3, 1)
    try:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        row["bnb_us"] = round(triton.testing.do_bench(lambda: F.dequantize_4bit(packed, state), return_mode="median") * 1e3, 1)
    except ImportError:
        pass
    return row


def sweep(shape=(14336, 4096)) -> list:
    """GPU time of the blocks kernel per (bytes per program, warps) on one weight."""
    import triton

    from deltatune.quant import nf4, triton_dequant

    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    q = nf4.quantize_4bit(w, "nf4", 64, True)
    out = torch.empty_like(w)
    default = triton_dequant.BLOCKS_BYTES, triton_dequant.BLOCKS_WARPS
    rows = []
    try:
        for block in (2048, 4096, 8192):
            for warps in (2, 4, 8):
                triton_dequant.BLOCKS_BYTES, triton_dequant.BLOCKS_WARPS = block, warps
                us = triton.testing.do_bench(lambda: triton_dequant.dequantize_4bit(q, torch.bfloat16, out=out),
                                             return_mode="median") * 1e3
                rows.append({"block_bytes": block, "warps": warps, "us": round(us, 1)})
    finally:
        triton_dequant.BLOCKS_BYTES, triton_dequant.BLOCKS_WARPS = default
    return rows


def host_cost(n: int = 2000) -> dict:
    """Microseconds of host time per call, GPU work negligible (a 512x2048 weight)."""
    import deltatune as dt

    layer = torch.nn.Linear(2048, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    model = torch.nn.Sequential(layer)
    dt.quantize_model(model, kind="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    dt.add_adapter(model, dt.LoraConfig(r=16, alpha=32, targets=["0"]))
    wrapped = model[0]
    assert isinstance(wrapped, dt.DeltaLayer)
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)

    def per_call(fn):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n
        torch.cuda.synchronize()
        return round(host * 1e6, 1)

    return {
        "fused_weight_plus_dequantize_us": per_call(lambda: wrapped.fused_weight().dequantize(torch.bfloat16)),
        "fused_weight_only_us": per_call(lambda: wrapped.fused_weight()),
        "torch_linear_us (reference launch)": per_call(lambda: torch.nn.functional.linear(x, w)),
        "torch_empty_us": per_call(lambda: torch.empty((512, 2048), dtype=torch.bfloat16, device="cuda")),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench_dequant.json")
    args = ap.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for shape in SHAPES:
        row = gpu_times(shape)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    result["sweep_14336x4096"] = sweep()
    print(json.dumps(result["sweep_14336x4096"]), flush=True)
    result["host"] = host_cost()
    print(json.dumps(result["host"]), flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
