"""Fast path vs plain path: the same LoRA training run, loss by loss, on a SmolLM2-135M-shaped model.

Trains ``--steps`` steps of r=16 LoRA (all linear layers of the blocks) from the same seed, data and
initial adapter twice, once per path, and reports the largest and mean per-step loss difference. With
``--model PATH`` it loads those weights (e.g. a local SmolLM2-135M); otherwise the SmolLM2-135M shape
with random bf16 weights. The data are the bytes of tinyshakespeare as token ids.

    python bench/loss_curve.py --steps 200 --json loss_curve.json
"""

import argparse
import json
import pathlib

import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import deltatune as dt  # noqa: E402
from deltatune.fast import disable_fast_path, enable_fast_path, fused_causal_lm_loss

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)
ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = [ROOT / "shared" / "data" / "tinyshakespeare" / "input.txt", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt",
        ROOT / ".bench_data" / "input.txt"]


def load_model(path, device):
    """(model in bf16 on ``device``, its tokenizer or None for the random-weight stand-in)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if path:  # a model directory, a .gguf file (e.g. deltatune.hub.smollm2_path()) or "smollm2"
        from deltatune.hub import load_model as load, smollm2_path

        model, tokenizer = load(smollm2_path() if path == "smollm2" else path)
        return model.to(device=device, dtype=torch.bfloat16), tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16), None


def batches(steps, batch, seq, device, vocab, tokenizer=None):
    """Random windows of Tiny Shakespeare: real tokens with a real tokenizer, else bytes (random weights)."""
    found = [f for f in DATA if f.exists()]
    if not found:
        raise SystemExit(f"no tinyshakespeare input.txt at any of {[str(f) for f in DATA]}")
    if tokenizer is not None:
        data = torch.tensor(tokenizer(found[0].read_text()[:400_000])["input_ids"], dtype=torch.long)
    else:
        data = torch.tensor(list(found[0].read_bytes()), dtype=torch.long) % vocab
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s:s + seq] for s in starts]).to(device)


def train(model, fast, args, tokenizer=None):
    dt.add_adapter(model, dt.LoraConfig(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]), name="curve")
    torch.manual_seed(1)  # same initial A for both runs
    for p in dt.adapter_params(model):
        if p.dim() == 2 and p.abs().sum() > 0:
            torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
    opt = torch.optim.AdamW(dt.adapter_params(model), lr=args.lr)
    if fast:
        enable_fast_path(model)
    losses = []
    for ids in batches(args.steps, args.batch, args.seq, args.device, model.config.vocab_size, tokenizer):
        loss = fused_causal_lm_loss(model, ids, ids) if fast else model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if fast:
        disable_fast_path(model)
    dt.remove_adapter(model, "curve")
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="loss_curve.json")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model, args.device)
    model.requires_grad_(False)
    plain = train(model, False, args, tokenizer)
    fast = train(model, True, args, tokenizer)
    diff = [abs(a - b) for a, b in zip(plain, fast)]
    summary = dict(model=args.model or "SmolLM2-135M shape, random weights", steps=args.steps,
                   first=(plain[0], fast[0]), last=(plain[-1], fast[-1]), max_abs_diff=max(diff),
                   mean_abs_diff=sum(diff) / len(diff), max_rel_diff=max(d / a for d, a in zip(diff, plain)))
    with open(args.json, "w") as f:
        json.dump(dict(summary=summary, plain=plain, fast=fast), f)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
