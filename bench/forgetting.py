"""Forgetting study (issue 21): a new task's score against what the model keeps, for full fine-tuning,
LoRA, LLaMA-Pro block expansion, LoRA distilled from the base and LoRA on self-distilled data (SDFT),
on SmolLM2-135M-Instruct.

The new task is the demo's (``deltatune.demo``: answer a sentence about a person with one line of JSON
in a fixed format; the base model scores ~0% exact match). Each arm is ``deltatune train`` on the
generated training rows, then ``deltatune eval`` on the held-out rows with ``--retention general``
(perplexity on Tiny Shakespeare, alpaca responses and chat turns, zero-shot SST-2; see
docs/training.md "Forgetting"), which reports each metric for the base and the tuned model. Results
go to ``--out``/results.jsonl, one line per arm (a run already there is not repeated), and a table.

The SDFT arm (``lora-sdft``) first has the base rewrite the training answers (``deltatune distill-data
--check json``: a rewrite replaces the reference when it is the same JSON object, in any layout) into
``<arm dir>/train.sd.jsonl``, once (an existing file is reused), then trains like ``lora`` on that file;
its record says how many rewrites were kept and how many of those are the reference's text itself.

    python bench/forgetting.py --out runs/forgetting                  # every arm, CPU: ~30 min on 2 cores
    python bench/forgetting.py --out runs/forgetting --arms lora,full --steps 32
    python bench/forgetting.py --report runs/forgetting
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ARMS = {  # arm -> its method flags (the learning rate comes with the arm: what each method needs)
    "full": ["--method", "full", "--lr", "5e-5"],
    "lora": ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "2e-3"],
    "lora-lr2e-4": ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "2e-4"],  # LoRA at a gentler step
    "llama-pro-2": ["--method", "block_expansion", "--num-blocks", "2", "--lr", "2e-4"],
    "llama-pro-4": ["--method", "block_expansion", "--num-blocks", "4", "--lr", "2e-4"],
    "lora-kd-base": ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "2e-3", "--teacher", "base",
                     "--distill-weight", "0.5", "--distill-temperature", "1.0"],
    "lora-sdft": ["--method", "lora", "--r", "8", "--alpha", "16", "--lr", "2e-3"],  # lora's flags, SDFT data
}
SELF_DISTILLED = {"lora-sdft": "json"}  # arm -> distill-data --check: these arms train on the base's rewrites
SDFT_MAX_NEW_TOKENS = "64"  # a reference answer is ~20 tokens; a longer rewrite is no one-line record anyway


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *argv], capture_output=True, text=True)


def self_distill(model: str, train_file: str, out: str, check: str) -> dict:
    """``deltatune distill-data`` of ``train_file`` into ``out``/train.sd.jsonl (skipped when that file and its
    decisions exist); returns {"data": path, "check", "kept", "rewrites", "kept_same_text"} from the decisions
    file, or {"error": ...}."""
    from deltatune.train.distill_data import decisions_path

    path = os.path.join(out, "train.sd.jsonl")
    if not (os.path.exists(path) and decisions_path(path).exists()):
        os.makedirs(out, exist_ok=True)
        run = _cli("distill-data", "--model", model, "--data", train_file, "--output", path, "--check", check,
                   "--max-new-tokens", SDFT_MAX_NEW_TOKENS, "--no-progress")
        if run.returncode != 0:
            return {"error": "distill-data: " + (run.stderr or run.stdout).strip()[-800:]}
    decisions = [json.loads(line) for line in decisions_path(path).read_text().splitlines() if line.strip()]
    kept = [d for d in decisions if d["kept"]]
    return {"data": path, "check": check, "kept": len(kept), "rewrites": sum("rewrite" in d for d in decisions),
            "kept_same_text": sum(bool(d.get("same_text")) for d in kept)}


def run_arm(args, arm: str, model: str, data: str) -> dict:
    """Train one arm and evaluate it (task score and retention); returns its record."""
    out = os.path.join(args.out, arm)
    record = {"arm": arm, "steps": args.steps, "seed": args.seed}
    train_file = os.path.join(data, "train.jsonl")
    if arm in SELF_DISTILLED:
        sd = self_distill(model, train_file, out, SELF_DISTILLED[arm])
        if "error" in sd:
            return {**record, **sd}
        train_file = sd.pop("data")
        record["sdft"] = sd
    train = _cli("train", "--model", model, "--data", train_file, "--output", out,
                 "--max-steps", str(args.steps), "--micro-batch", "8", "--max-length", "128", "--no-packing",
                 "--warmup-steps", str(max(args.steps // 10, 1)), "--save-every", "0", "--seed", str(args.seed),
                 "--no-progress", *ARMS[arm])
    if train.returncode != 0:
        return {**record, "error": (train.stderr or train.stdout).strip()[-800:]}
    trained = ["--model", os.path.join(out, "model"), "--retention-base", model] if arm == "full" else \
        ["--adapter", os.path.join(out, "adapter")]
    ev = _cli("eval", *trained, "--data", os.path.join(data, "test.jsonl"), "--max-length", "128", "--no-progress",
              "--retention", "general", "--retention-rows", str(args.retention_rows))
    if ev.returncode != 0:
        return {**record, "error": "eval: " + ev.stderr.strip()[-800:]}
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    metrics = result.pop("retention")["metrics"]
    return {**record, "exact_match": result.get("exact_match"), "loss": result.get("loss"),
            "retention": {k: v for k, v in metrics.items()}}


def _base(model: str, data: str) -> dict:
    """The base model's exact match on the held-out rows (its retention numbers come with every arm)."""
    ev = _cli("eval", "--model", model, "--data", os.path.join(data, "test.jsonl"), "--max-length", "128",
              "--no-progress")
    if ev.returncode != 0:
        return {"arm": "base", "error": ev.stderr.strip()[-800:]}
    return {"arm": "base", "exact_match": json.loads(ev.stdout.strip().splitlines()[-1]).get("exact_match")}


def _records(out: str) -> list[dict]:
    path = os.path.join(out, "results.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def report(out: str) -> str:
    """Markdown: per arm the task's exact match and each retention metric (its change against the base)."""
    records = _records(out)
    rows = [r for r in records if "retention" in r]
    if not rows:
        return "(no results)"
    base = next((r for r in records if r["arm"] == "base" and "exact_match" in r), None)
    names = list(rows[0]["retention"])
    lines = ["| arm | exact match | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|",
             "| base | " + (f"{100 * base['exact_match']:.0f}%" if base else "-")
             + " | " + " | ".join(f"{rows[0]['retention'][n]['base']:.3f}" for n in names) + " |"]
    for r in rows:
        cells = [f"{r['retention'][n]['tuned']:.3f} ({r['retention'][n]['change']:+.3f})" for n in names]
        lines.append(f"| {r['arm']} | {100 * r['exact_match']:.0f}% | " + " | ".join(cells) + " |")
    for r in rows:
        if "sdft" in r:
            sd = r["sdft"]
            lines.append(f"\n{r['arm']}: kept {sd['kept']} of {sd['rewrites']} rewrites (check {sd['check']}); "
                         f"{sd['kept_same_text']} of the kept are the reference's text itself")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/forgetting")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retention-rows", type=int, default=32)
    ap.add_argument("--report", metavar="OUT", help="only print the table of OUT")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    from deltatune.demo import _write_jsonl, make_examples
    from deltatune.hub import smollm2_path

    model, data = smollm2_path(), os.path.join(args.out, "data")
    os.makedirs(data, exist_ok=True)
    train_rows, test_rows = make_examples(400, 100, args.seed)
    _write_jsonl(pathlib.Path(data, "train.jsonl"), train_rows)
    _write_jsonl(pathlib.Path(data, "test.jsonl"), test_rows)
    path = os.path.join(args.out, "results.jsonl")
    done = {r["arm"] for r in _records(args.out) if "error" not in r}
    for arm in ["base", *args.arms.split(",")]:
        if arm in done:
            continue
        record = run_arm(args, arm, model, data) if arm != "base" else _base(model, data)
        print(json.dumps(record), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(report(args.out))


if __name__ == "__main__":
    main()
