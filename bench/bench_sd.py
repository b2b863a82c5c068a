"""One LoRA training step of a Stable Diffusion 1.5-shaped UNet (random weights): deltatune against
diffusers + PEFT, side by side in one process.

Both sides build the same model from the same seed: diffusers' ``UNet2DConditionModel`` with SD 1.5's
config (block_out_channels 320/640/1280/1280, 2 layers a block, cross-attention 768, 8 heads) and a
CLIP-L-shaped ``CLIPTextModel`` (12 layers, 768 wide, 77 tokens), frozen weights in bf16, LoRA r=16
(alpha 16, fp32) on the UNet's attention projections (to_q, to_k, to_v, to_out.0), ``torch.optim.AdamW``,
gradient clipping at 1.0. A step: one sample of cached latents (mean + std · N(0, 1), × 0.18215), noise,
random timesteps, the text encoder on the captions, the UNet, MSE on ε, backward, clip, AdamW.

* ``deltatune``: ``deltatune train``'s own step (``deltatune.train.loop.setup`` + ``step``: the
  ``DiffusionObjective``, ``deltatune.add_adapter`` on ``DiffusionModel``, autocast bf16).
* ``peft``: diffusers' ``unet.add_adapter(peft.LoraConfig(...))`` and LoRA parameters cast to fp32
  (``diffusers.training_utils.cast_training_params``), the step of diffusers' ``train_text_to_image_lora.py``
  (``DDPMScheduler.add_noise``, ``F.mse_loss``) under ``torch.autocast(bf16)``.

Median ms/step after ``--warmup`` steps, peak allocated GiB, ratios against PEFT. Table + JSON:

    python bench/bench_sd.py --json bench_sd.json                      # GPU: SD 1.5 shape, batch 4 at 64x64 latents
    python bench/bench_sd.py --shape tiny --steps 3 --warmup 1         # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

SHAPES = {
    "sd15": dict(unet=dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults are SD 1.x's otherwise
                 text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                 latent=64, tokens=77),
    "tiny": dict(unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=8,
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
                 text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
                 latent=8, tokens=16),
}
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
"""SD 1.5's scheduler_config.json (the fields training reads)."""
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SCALE = 0.18215  # SD's VAE scaling factor


def build(shape: str, device, dtype):
    """(unet, text_encoder) with random weights from seed 0, frozen, weights in ``dtype``."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**spec["unet"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=spec["tokens"], **spec["text"]))
    for m in (unet, text):
        m.requires_grad_(False)
        m.to(dtype)
    return unet, text


def inputs(shape: str, batch: int, steps: int):
    """Per step: cached latent Gaussians (mean, std) and caption ids, the same for both sides."""
    spec = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    c, h = 4, spec["latent"]
    return [(torch.randn(batch, c, h, h, generator=g), torch.rand(batch, c, h, h, generator=g) * 0.1,
             torch.randint(0, 49408, (batch, spec["tokens"]), generator=g)) for _ in range(steps)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_deltatune(shape, batch, data, rank, device, dtype, log) -> list[float]:
    """``deltatune train``'s step on the UNet + text encoder: loop.setup with DiffusionObjective, then loop.step."""
    import deltatune as dt
    from deltatune.train.args import DataArgs, TrainArgs
    from deltatune.train.data import Dataset
    from deltatune.train.diffusion import DiffusionModel, DiffusionObjective, NoiseSchedule
    from deltatune.train.loop import setup, step

    unet, text = build(shape, device, dtype)
    model = DiffusionModel(unet, text)
    examples = [{"input_ids": ids[i].tolist(), "latent_mean": mean[i], "latent_std": std[i]}
                for mean, std, ids in data for i in range(batch)]
    ds = Dataset(examples, "diffusion", "bench", "bench")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    times = []
    with tempfile.TemporaryDirectory() as out:
        args = TrainArgs(model="bench", output=out, max_steps=len(data), micro_batch=batch, lr=1e-4, schedule="constant",
                         save_every=0, progress=False, precision=precision, device=str(device), fast=False,
                         base_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"))
        cfg = dt.LoraConfig(r=rank, alpha=rank, targets=r"unet\..*\.(to_q|to_k|to_v|to_out\.0)")
        objective = DiffusionObjective(NoiseSchedule(SCHEDULER), SCALE)
        no_tokenizer = types.SimpleNamespace(pad_token_id=0)  # ids are given; nothing is tokenized
        run = setup(args, DataArgs(task="diffusion"), cfg, model=model, tokenizer=no_tokenizer, train_data=ds,
                    log=lambda m: None, objective=objective)
        for i in range(len(data)):
            _sync(device)
            t0 = time.perf_counter()
            rec = step(run, i)
            _sync(device)
            times.append(time.perf_counter() - t0)
            log(f"  deltatune step {i}: {1e3 * times[-1]:.1f} ms, loss {rec['loss']:.4f}")
        del run
    return times


def run_peft(shape, batch, data, rank, device, dtype, log) -> list[float]:
    """diffusers + PEFT: unet.add_adapter(LoraConfig) and the step of diffusers' LoRA training script."""
    import diffusers
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet, text = build(shape, device, dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    sched = diffusers.DDPMScheduler(**SCHEDULER)
    unet.train()
    times = []
    for i, (mean, std, ids) in enumerate(data):
        torch.manual_seed(i)
        _sync(device)
        t0 = time.perf_counter()
        mean, std, ids = mean.to(device), std.to(device), ids.to(device)
        latents = (mean + std * torch.randn_like(mean)) * SCALE
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            states = text(ids, return_dict=False)[0]
            pred = unet(noisy, t, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        _sync(device)
        times.append(time.perf_counter() - t0)
        log(f"  peft step {i}: {1e3 * times[-1]:.1f} ms, loss {value:.4f}")
    return times


RUNNERS = {"deltatune": run_deltatune, "peft": run_peft}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sd15")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--methods", default="deltatune,peft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--json", default="bench_sd.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    data = inputs(args.shape, args.batch, args.steps)
    rows = []
    for method in args.methods.split(","):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = RUNNERS[method](args.shape, args.batch, data, args.rank, device, dtype, log)
        timed = times[args.warmup:] or times
        rows.append({"method": method, "ms_step": round(1e3 * statistics.median(timed), 2),
                     "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda"
                     else None})
    peft = next((r for r in rows if r["method"] == "peft"), None)
    for r in rows:
        if peft:
            r["speedup_vs_peft"] = round(peft["ms_step"] / r["ms_step"], 3)
            r["memory_vs_peft"] = round(r["peak_gib"] / peft["peak_gib"], 3) if r["peak_gib"] else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape} UNet + text encoder, batch {args.batch}, latents {SHAPES[args.shape]['latent']}^2, "
          f"LoRA r={args.rank} on {'/'.join(TARGETS)}, {dtype}, {name}")
    print(f"{'method':<10} {'ms/step':>9} {'peak GiB':>9} {'speed vs PEFT':>14} {'memory vs PEFT':>15}")
    for r in rows:
        print(f"{r['method']:<10} {r['ms_step']:>9.1f} {r['peak_gib'] if r['peak_gib'] is not None else '-':>9} "
              f"{r.get('speedup_vs_peft', '-'):>14} {r.get('memory_vs_peft') or '-':>15}")
    result = dict(device=name, torch=torch.__version__, shape=args.shape, batch=args.batch, rank=args.rank,
                  dtype=str(dtype), steps=args.steps, warmup=args.warmup, rows=rows)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
