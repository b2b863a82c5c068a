"""GLUE with every method, through the command line: method x task x seed, a small learning-rate /
epoch sweep per method chosen on dev, mean ± std over seeds, a table and a plot of score against the
fraction of parameters trained.

Each run is ``deltatune train`` on the task's train.tsv (``--task`` fixes columns, labels and metric)
and ``deltatune eval`` on its dev.tsv; results go to ``--out``/results.jsonl one line per run, and a
run already there is not repeated (a call cut off by a time limit continues where it stopped). GLUE's
test labels are not public, so the sweep picks on dev and reports dev: the selection inflates the
best recipe slightly, for every method alike (reported as such in docs/results.md).

    python bench/glue.py --model MINILM_DIR --data ../shared/data --out runs/glue            # everything
    python bench/glue.py ... --tasks sst2,mrpc --methods full,lora --seeds 0 --sweep small   # a part
    python bench/glue.py --report runs/glue                      # table + plot from results.jsonl
    python bench/glue.py --fp16-copy MINILM_DIR OUT              # a half-size copy to carry to the GPU
                                                                 # (loaded in fp32, as it was trained)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading

TASKS = ("sst2", "mrpc", "cola", "rte")

# the method's own flags; lr and epochs come from the sweep. Encoder targets are MiniLM/BERT names.
BERT_LINEAR = "[query,key,value,attention.output.dense,intermediate.dense,output.dense]"
METHODS = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora", "--r", "8", "--alpha", "16", "--targets", "[query,value]"],
    "lora-all": ["--method", "lora", "--r", "8", "--alpha", "16", "--targets", BERT_LINEAR],
    "dora": ["--method", "lora", "--use-dora", "--r", "8", "--alpha", "16", "--targets", "[query,value]"],
    "loha": ["--method", "loha", "--r", "8", "--alpha", "8", "--targets", "[query,value]"],
    "lokr": ["--method", "lokr", "--r", "8", "--alpha", "8", "--targets", "[query,value]"],
    "ia3": ["--method", "ia3"],
    "houlsby": ["--method", "bottleneck", "--placement", "houlsby"],
    "pfeiffer": ["--method", "bottleneck", "--placement", "pfeiffer"],
    "prompt": ["--method", "prompt_tuning"],
    "ptuning": ["--method", "p_tuning"],
    "prefix": ["--method", "prefix_tuning"],
}
SWEEPS = {  # method kind -> [(lr, epochs)]
    "small": {"full": [(5e-5, 3)], "default": [(2e-3, 3)], "input": [(3e-2, 3)]},
    "full": {"full": [(2e-5, 3), (5e-5, 3), (5e-5, 10)], "default": [(5e-4, 3), (2e-3, 3), (2e-3, 10)],
             "input": [(1e-2, 10), (3e-2, 10)]},
}
INPUT_METHODS = {"prompt", "ptuning", "prefix"}


def sweep_of(method: str, sweep: str) -> list[tuple[float, float]]:
    table = SWEEPS[sweep]
    kind = "full" if method == "full" else "input" if method in INPUT_METHODS else "default"
    return table[kind]


def run_one(args, task: str, method: str, lr: float, epochs: float, seed: int) -> dict:
    """Train and evaluate one configuration through the CLI; returns its record."""
    data = os.path.join(args.data, task)
    with tempfile.TemporaryDirectory(dir=args.out) as out:
        train = [sys.executable, "-m", "deltatune.cli", "train", "--model", args.model, "--task", task,
                 "--data", os.path.join(data, "train.tsv"), "--output", out, "--lr", str(lr), "--epochs", str(epochs),
                 "--seed", str(seed), "--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length),
                 "--schedule", "linear", "--warmup-steps", "30", "--save-every", "0", "--no-progress",
                 *(["--max-examples", str(args.max_examples)] if args.max_examples else []), *METHODS[method]]
        proc = subprocess.run(train, capture_output=True, text=True)
        record = {"task": task, "method": method, "lr": lr, "epochs": epochs, "seed": seed}
        if proc.returncode != 0:
            return {**record, "error": (proc.stderr or proc.stdout).strip()[-600:]}
        found = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", proc.stdout + proc.stderr)
        if found:
            record["trainable"], record["total"] = (int(g.replace(",", "")) for g in found.groups())
        trained = os.path.join(out, "model" if method == "full" else "adapter")
        where = ["--model", trained, "--task", task] if method == "full" else ["--adapter", trained]
        ev = subprocess.run([sys.executable, "-m", "deltatune.cli", "eval", *where, "--data",
                             os.path.join(data, "dev.tsv"), "--max-length", str(args.max_length), "--no-progress"],
                            capture_output=True, text=True)
        if ev.returncode != 0:
            return {**record, "error": "eval: " + ev.stderr.strip()[-600:]}
        return {**record, **json.loads(ev.stdout.strip().splitlines()[-1])}


def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def report(out: str) -> str:
    """Markdown table: per method the best recipe (mean dev score over seeds) on each task, and the mean."""
    rows = [r for r in load_results(os.path.join(out, "results.jsonl")) if "score" in r]
    best: dict[tuple[str, str], tuple[float, float, str, int]] = {}
    groups = itertools.groupby(sorted(rows, key=lambda r: (r["method"], r["task"], r["lr"], r["epochs"])),
                               key=lambda r: (r["method"], r["task"], r["lr"], r["epochs"]))
    trainable = {}
    for (method, task, lr, epochs), runs in groups:
        runs = list(runs)
        scores = [100 * r["score"] for r in runs]
        mean = statistics.mean(scores)
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        if (method, task) not in best or mean > best[(method, task)][0]:
            best[(method, task)] = (mean, std, f"lr {lr:g}, {epochs:g} ep", len(runs))
        if "trainable" in runs[0]:
            trainable[method] = runs[0]["trainable"] / runs[0]["total"]
    methods = sorted({m for m, _ in best}, key=list(METHODS).index)
    lines = ["| method | trained | " + " | ".join(TASKS) + " | mean |", "|---" * (len(TASKS) + 3) + "|"]
    for m in methods:
        cells = []
        for t in TASKS:
            b = best.get((m, t))
            cells.append(f"{b[0]:.1f} ± {b[1]:.1f} ({b[2]}; {b[3]} seeds)" if b else "-")
        got = [best[(m, t)][0] for t in TASKS if (m, t) in best]
        frac = f"{100 * trainable[m]:.2f}%" if m in trainable else "?"
        mean = f"{statistics.mean(got):.1f}" if len(got) == len(TASKS) else "-"
        lines.append(f"| {m} | {frac} | " + " | ".join(cells) + f" | {mean} |")
    _plot(out, methods, best, trainable)
    return "\n".join(lines)


def _plot(out, methods, best, trainable) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        got = [best[(m, t)][0] for t in TASKS if (m, t) in best]
        if m in trainable and got:
            ax.scatter(100 * trainable[m], statistics.mean(got))
            ax.annotate(m, (100 * trainable[m], statistics.mean(got)), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters trained (%)")
    ax.set_ylabel("mean GLUE dev score (SST-2, MRPC, CoLA, RTE)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "glue.png"), dpi=120)


def fp16_copy(src: str, dst: str) -> None:
    """The model directory ``src`` with its weights in fp16 (half the bytes to carry); the training run
    loads it in fp32."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="runs/glue")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sweep", choices=list(SWEEPS), default="full")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-examples", type=int, default=0, help="cap each training set (0: all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (one process each; a GPU holds many MiniLMs)")
    ap.add_argument("--report", metavar="OUT", help="only print the table (and write glue.png) of OUT")
    ap.add_argument("--fp16-copy", nargs=2, metavar=("SRC", "DST"))
    args = ap.parse_args(argv)
    if args.fp16_copy:
        fp16_copy(*args.fp16_copy)
        return
    if args.report:
        print(report(args.report))
        return
    if not args.model:
        ap.error("--model is required")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.jsonl")
    done = {(r["task"], r["method"], r["lr"], r["epochs"], r["seed"]) for r in load_results(path)}
    todo = [(task, method, lr, epochs, seed) for task in args.tasks.split(",") for method in args.methods.split(",")
            for (lr, epochs), seed in itertools.product(sweep_of(method, args.sweep), map(int, args.seeds.split(",")))
            if (task, method, lr, epochs, seed) not in done]
    lock = threading.Lock()

    def run_and_record(job):
        record = run_one(args, *job)
        with lock:  # one line per finished run: a cut-off call loses only the runs in flight
            print(json.dumps(record), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    with concurrent.futures.ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        list(pool.map(run_and_record, todo))
    print(report(args.out))


if __name__ == "__main__":
    main()
