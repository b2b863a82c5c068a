"""The LoRA MLP's SwiGLU kernels on the GPU: tile sweeps, against the plain SwiGLU kernels.

Llama-3-8B's MLP at 4096 tokens (N=4096, I=14336, r=16): ``swiglu_lora_forward`` (g/u column blocks of
one (N, 2I) tensor, both adapters' low-rank terms added in the kernel) for each (BLOCK_N, BLOCK_I,
warps), and ``swiglu_lora_backward`` (the down adapter's term too, and the sums dB_g, dB_u, dA_d over
the rows) for each (BLOCK_N, BLOCK_I, warps, programs per multiprocessor); ``triton.testing.do_bench``
medians in us and the bytes moved per second. The plain ``swiglu_forward``/``swiglu_backward`` (no
low-rank terms, contiguous g/u; its backward also writes h: 6 tensors against the LoRA backward's 5)
give the bandwidth to aim at.

    python bench/bench_swiglu.py --json bench_swiglu.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default="bench_swiglu.json")
    ap.add_argument("--only", choices=("fwd", "bwd"), help="sweep one direction only")
    args = ap.parse_args()
    import triton

    from deltatune.kernels import triton_swiglu as k

    n, i, r = args.tokens, args.inter, args.rank
    dev, dt = "cuda", torch.bfloat16
    gu = torch.randn(n, 2 * i, device=dev, dtype=dt)
    g, u = gu[:, :i], gu[:, i:]
    h = torch.randn(n, 2 * r, device=dev, dtype=dt)
    sbg, sbu = (torch.randn(i, r, device=dev, dtype=dt) * 0.1 for _ in range(2))
    gd, ad = torch.randn(n, r, device=dev, dtype=dt), torch.randn(r, i, device=dev, dtype=dt) * 0.1
    lg, lu, ld = (h[:, :r], sbg), (h[:, r:], sbu), (gd, ad)
    dh = torch.randn(n, i, device=dev, dtype=dt)

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median") * 1e3

    elem = n * i * 2  # bytes of one (N, I) bf16 tensor
    rows = []
    gc, uc = g.contiguous(), u.contiguous()
    fwd = bench(lambda: k.swiglu_forward(gc, uc))
    dh_plain = dh.clone()  # the plain backward writes dg over its dh: keep dh itself unchanged
    bwd = bench(lambda: k.swiglu_backward(dh_plain, gc, uc))
    rows.append({"kernel": "plain", "fwd_us": round(fwd, 1), "bwd_us": round(bwd, 1),
                 "fwd_GBps": round(3 * elem / fwd / 1e3), "bwd_GBps": round(6 * elem / bwd / 1e3)})
    ref_f = k.swiglu_lora_forward(g, u, lg, lu)
    ref_b = k.swiglu_lora_backward(dh, g, u, lg, lu, ld, (2.0, 2.0))
    default = k.LORA_FWD_TILE, k.LORA_BWD_TILE, k.PROGRAMS_PER_SM
    try:
        for bn, bi, warps in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8)):
            if bn * bi > 8192 or bn * bi < 2048 or args.only == "bwd":
                continue
            k.LORA_FWD_TILE = (bn, bi, warps)
            name = f"lora fwd {bn}x{bi} w{warps}"
            try:
                same = torch.equal(k.swiglu_lora_forward(g, u, lg, lu), ref_f)
                fwd = bench(lambda: k.swiglu_lora_forward(g, u, lg, lu))
            except Exception as e:  # a tile the compiler refuses (shared memory)
                rows.append({"kernel": name, "error": str(e)[:200]})
                continue
            rows.append({"kernel": name, "fwd_us": round(fwd, 1), "fwd_GBps": round(3 * elem / fwd / 1e3),
                         "same_result": same})
        k.LORA_FWD_TILE = default[0]
        # the backward reads dh, g, u and writes dg, du (5 tensors), summing dB_g, dB_u, dA_d on the way
        for bn, bi, warps, stages, per_sm in itertools.product((32, 64), (64, 128), (4, 8), (2, 3), (1, 2, 4)):
            if args.only == "fwd" or (warps == 8 and bn * bi < 8192):
                continue
            k.LORA_BWD_TILE, k.PROGRAMS_PER_SM = (bn, bi, warps, stages), per_sm
            name = f"lora bwd {bn}x{bi} w{warps} s{stages} {per_sm}/SM"
            try:
                got = k.swiglu_lora_backward(dh, g, u, lg, lu, ld, (2.0, 2.0))
                same = torch.equal(got[0], ref_b[0]) and all(
                    ((a - b).norm() / b.norm()).item() < 1e-5 for a, b in zip(got[1:], ref_b[1:]))
                bwd = bench(lambda: k.swiglu_lora_backward(dh, g, u, lg, lu, ld, (2.0, 2.0)))
            except Exception as e:
                rows.append({"kernel": name, "error": str(e)[:200]})
                continue
            rows.append({"kernel": name, "bwd_us": round(bwd, 1), "bwd_GBps": round(5 * elem / bwd / 1e3),
                         "same_result": same})
    finally:
        k.LORA_FWD_TILE, k.LORA_BWD_TILE, k.PROGRAMS_PER_SM = default
    print("| kernel | forward us | GB/s | backward us | GB/s | same result |\n|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['kernel']} | error: {row['error'][:60]} | | | | |")
        else:
            print(f"| {row['kernel']} | {row.get('fwd_us', '-')} | {row.get('fwd_GBps', '-')} | {row.get('bwd_us', '-')} "
                  f"| {row.get('bwd_GBps', '-')} | {row.get('same_result', '-')} |")
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
