"""A/B of two code trees on the QLoRA training benchmark: alternating processes on one GPU.

Timing differences of 1-3% are inside the spread between processes and hosts (docs/speed_notes.md),
so a change is judged by rows of both trees interleaved on one machine. Each row is one process of
``bench/bench_qlora.py --skip-checks`` with ``PYTHONPATH`` pointing at a tree's ``deltatune``: this
checkout ("new") or a directory holding another ``deltatune`` package ("base"), made for example with

    mkdir -p .ab_base && git archive 03fbcc1 deltatune | tar -x -C .ab_base

(``.gitignore`` ignores ``.ab_base``: name it in the device call's ``carry`` to take it to the GPU machine).
Prints each row as it finishes, then a table with the mean and range per tree and their ratio:

    python3 bench/ab_qlora.py --base .ab_base --shape 8b --method dt-qlora-fast@0+graphs --repeats 2 \\
        --baseline peft-bnb-nockpt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def row(tree: str, shape: str, method: str, steps: int) -> dict:
    """One process of bench_qlora.py for ``method`` with ``tree``'s deltatune first on the path."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, os.path.join(HERE, "bench_qlora.py"), "--shapes", shape, "--methods", method,
               "--steps", str(steps), "--skip-checks", "--json", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"method": method, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        with open(out) as f:
            return json.load(f)["rows"][0]


def summary(rows: list) -> str:
    """Markdown table: per (tree, method) the mean and range of tokens/s, the peak memory, and the new
    tree's mean over the base tree's."""
    groups: dict = {}
    for r in rows:
        if "tokens_per_s" in r:
            groups.setdefault((r["tree"], r["method"]), []).append(r)
    lines = ["| tree | method | runs | tokens/s mean | range | peak GiB | peak reserved GiB |",
             "|---|---|---|---|---|---|---|"]
    means = {}
    for (tree, method), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        means[(tree, method)] = sum(tps) / len(tps)
        lines.append(f"| {tree} | {method} | {len(tps)} | {means[(tree, method)]:,.0f} | {min(tps):,}-{max(tps):,} "
                     f"| {max(r['peak_gib'] for r in rs)} | {max(r['peak_reserved_gib'] for r in rs)} |")
    for (tree, method), mean in means.items():
        if tree == "new" and ("base", method) in means:
            lines.append(f"\nnew / base, {method}: {mean / means[('base', method)]:.3f}x")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="directory holding the base tree's deltatune package")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--method", default="dt-qlora-fast@0+graphs")
    ap.add_argument("--repeats", type=int, default=2, help="processes per tree, interleaved")
    ap.add_argument("--baseline", help="a method run once with the new tree between the pairs (e.g. peft-bnb-nockpt)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="ab_qlora.json")
    args = ap.parse_args(argv)
    base = os.path.abspath(args.base)
    if not os.path.isfile(os.path.join(base, "deltatune", "__init__.py")):
        raise SystemExit(f"--base {args.base}: no deltatune package there (expected {base}/deltatune/__init__.py)")
    plan = []
    for i in range(args.repeats):
        plan += [("new", ROOT, args.method), ("base", base, args.method)]
        if i == 0 and args.baseline:
            plan.append(("new", ROOT, args.baseline))
    rows = []
    for tree, path, method in plan:
        r = dict(row(path, args.shape, method, args.steps), tree=tree)
        rows.append(r)
        print(json.dumps({k: r.get(k) for k in ("tree", "method", "tokens_per_s", "peak_gib", "peak_reserved_gib",
                                                "phases_ms", "error") if k in r}), flush=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(summary(rows))


if __name__ == "__main__":
    main()
