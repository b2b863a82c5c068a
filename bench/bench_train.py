"""What a user gets from ``deltatune train`` on a real data file, beside HF Trainer + PEFT on the same
model, data and batch: real (non-padding) tokens/s, peak GPU memory and final loss.

Each row is one process. The deltatune rows run the real command line (``deltatune.cli.main`` with
the flags shown, in-process so the peak memory can be read); the peers train the same tokenized
examples (deltatune's data loader, so both see identical tokens and loss masks) with
``transformers.Trainer`` + ``peft`` LoRA r16 on all linear layers, bf16, padded
(``DataCollatorForSeq2Seq``) or padding-free (``DataCollatorWithFlattening``). Tokens/s counts the
non-padding tokens of the steps after the first ``--warmup``. ``--micro-batch`` is the peers' (8, as issue 15
sets them up); a deltatune row takes ``deltatune train``'s own default (4 packed rows of ``--max-length``)
unless its flags name one. ``--max-length`` applies to every row; unset, each uses deltatune train's default.

    python bench/bench_train.py --model DIR --data FILE --steps 40 --json bench_train.json
    python bench/bench_train.py --make-model 1b --tokenizer DIR --model /tmp/m   # a random Llama-shaped model
    python bench/bench_train.py --model /tmp/m8 --data FILE --quant nf4   # QLoRA (peers: bitsandbytes NF4)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROWS = {
    "dt-default": [],  # deltatune train's defaults: bf16 on the GPU, packed rows of --max-length, 4 a micro-batch
    "dt-mb8": ["--micro-batch", "8"],  # 8 packed rows a micro-batch (twice the tokens and activations)
    "dt-no-packing": ["--no-packing", "--micro-batch", "8"],  # bf16, one example a row, padded, as the peers
    "dt-fp32-padded": ["--precision", "fp32", "--no-packing", "--micro-batch", "8"],  # the defaults before issue 15
    "dt-rows2048": ["--max-length", "2048", "--micro-batch", "4"],  # packed rows of 2048: the harness's 4x2048 shape
    "dt-no-graphs": ["--no-cuda-graphs"],  # eager steps (the default replays CUDA graphs where it can)
    "dt-graphs": ["--cuda-graphs"],  # the decoder layers replayed from CUDA graphs (static packed shapes)
    "dt-rows2048-graphs": ["--max-length", "2048", "--micro-batch", "4", "--cuda-graphs"],
    "dt-dora-rows2048": ["--max-length", "2048", "--micro-batch", "4", "--use-dora"],  # DoRA on the real CLI
    "dt-dora-rows2048-graphs": ["--max-length", "2048", "--micro-batch", "4", "--use-dora", "--cuda-graphs"],
    "hf-peft": "padded",
    "hf-peft-flat": "flattening",
    "hf-peft-flat-liger": "flattening+liger",  # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear CE)
    "trl-padding-free": "trl",  # TRL SFTTrainer(padding_free=True) on the same tokenized rows
}
DEFAULT_ROWS = "dt-default,dt-no-packing,hf-peft,hf-peft-flat"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def make_model(shape: str, tokenizer: str, out: str) -> None:
    """A Llama-shaped model with random bf16 weights and ``tokenizer``'s vocabulary, saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B init takes minutes on a CPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _peak() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0


def run_deltatune(flags: list[str], args) -> dict:
    """``deltatune train`` with ``flags``; real tokens/s from its metrics.jsonl."""
    from deltatune.cli import main

    with tempfile.TemporaryDirectory() as out:
        argv = ["train", "--model", args.model, "--data", args.data, "--output", out, "--max-steps", str(args.steps),
                "--save-every", "0", "--no-progress", "--lr", "2e-4",
                "--r", "16", "--alpha", "32", *(["--quant", args.quant] if args.quant else []),
                *(["--max-length", str(args.max_length)] if args.max_length else []), *flags]
        code = main(argv)
        if code != 0:
            return {"error": f"deltatune train exited {code}"}
        steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"tok_s"' in line]
    timed = steps[args.warmup:]
    tokens = sum(s["tokens"] for s in timed)
    seconds = sum(s["tokens"] / s["tok_s"] for s in timed)
    return {"tokens_per_s": round(tokens / seconds), "peak_gib": round(_peak(), 2), "final_loss": steps[-1]["loss"],
            "tokens_per_step": round(tokens / len(timed))}


def run_hf(collator_kind: str, args) -> dict:
    """transformers.Trainer + PEFT LoRA on deltatune's tokenized examples."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)

    from deltatune.train.data import load_dataset

    tok = AutoTokenizer.from_pretrained(args.model)
    from deltatune.train.args import DataArgs, resolve_max_length

    length = resolve_max_length(DataArgs(max_length=args.max_length), tok).max_length  # deltatune train's default
    ds = load_dataset(args.data, tok, max_length=length, log=lambda *_: None)
    rows = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in ds.examples]
    if collator_kind.endswith("+liger"):  # patch the Llama classes before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
        collator_kind = collator_kind.removesuffix("+liger")
    quant = {}
    if args.quant:  # QLoRA as its paper and PEFT's docs set it up: bitsandbytes NF4, bf16 compute
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa", **quant)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    base = [DataCollatorForSeq2Seq(tok, label_pad_token_id=-100) if collator_kind == "padded"
            else DataCollatorWithFlattening()]  # TRL's row: replaced by the trainer's own collator below
    counted = []

    def collate(features):
        counted.append(sum(len(f["input_ids"]) for f in features))  # the real tokens of this batch
        return base[0](features)

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        settings = dict(output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=args.steps,
                        learning_rate=2e-4, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
                        lr_scheduler_type="cosine", dataloader_num_workers=0, disable_tqdm=True)
        if collator_kind == "trl":  # SFTTrainer on pre-tokenized rows with labels: no re-tokenization
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            sargs = SFTConfig(**settings, padding_free=True, max_length=None,
                              dataset_kwargs={"skip_prepare_dataset": True})
            trainer = SFTTrainer(model=model, args=sargs, train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
            base[0], trainer.data_collator = trainer.data_collator, collate  # it refuses a custom one: wrap its own
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=rows,
                              data_collator=collate, callbacks=[Clock()])
        result = trainer.train()
    # counted[i] is collated before step i; steps warmup.. are timed between consecutive step ends
    tokens = sum(counted[args.warmup + 1:args.steps])
    seconds = times[-1] - times[args.warmup]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": round(tokens / seconds), "peak_gib": round(_peak(), 2),
            "final_loss": losses[-1] if losses else result.training_loss,
            "tokens_per_step": round(tokens / max(args.steps - args.warmup - 1, 1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=8, help="the peers' micro-batch (deltatune rows: their flags)")
    ap.add_argument("--json", default="bench_train.json")
    ap.add_argument("--max-length", type=int, help="for every row (default: deltatune train's own default; a row's "
                    "own --max-length wins for that row)")
    ap.add_argument("--quant", choices=["nf4"], help="QLoRA: the base in 4 bits (ours; bitsandbytes for the peers)")
    ap.add_argument("--make-model", choices=list(SHAPES))
    ap.add_argument("--tokenizer")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process (what the parent runs)
    args = ap.parse_args(argv)
    if args.make_model:
        make_model(args.make_model, args.tokenizer, args.model)
        return
    if args.row:
        kind = ROWS[args.row]
        result = run_deltatune(kind, args) if isinstance(kind, list) else run_hf(kind, args)
        print("ROW " + json.dumps(result), flush=True)
        return
    results = []
    for name in args.rows.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--data", args.data, "--row", name,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch),
               *(["--quant", args.quant] if args.quant else []),
               *(["--max-length", str(args.max_length)] if args.max_length else [])]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's deltatune first
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("ROW ")), None)
        row = json.loads(line[4:]) if line else {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
        row["row"] = name
        results.append(row)
        print(json.dumps(row), flush=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    peer = next((r["tokens_per_s"] for r in results if r["row"] == "hf-peft" and "tokens_per_s" in r), None)
    print("| row | real tokens/s | vs hf-peft | peak GiB | tokens/step | final loss |\n|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" in r:
            ratio = f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-"
            print(f"| {r['row']} | {r['tokens_per_s']:,} | {ratio} | {r['peak_gib']} | {r['tokens_per_step']:,} "
                  f"| {r['final_loss']:.3f} |")
        else:
            print(f"| {r['row']} | error: {r['error'][:200]} | | | | |")


if __name__ == "__main__":
    main()
