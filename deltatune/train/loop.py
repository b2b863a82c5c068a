"""One training loop for every method: LoRA, QLoRA (LoRA on a quantized base) and full fine-tuning.

Methods are model transforms applied before the loop (``prepare_model``); the loop itself only
sees "the parameters that require grad". Everything that varies between runs is a pure function
of the seed and the step: the data order (``data.sample_index``), the dropout RNG (reseeded from
(seed, step) before each step) and the learning rate, so a run resumed from a checkpoint computes
exactly what the uninterrupted run would have (bitwise on CPU in fp32).

    deltatune train --model DIR --data FILE --output DIR --max-steps 200 --save-every 50
    deltatune train --config run.yaml --resume
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from deltatune import checkpoint as ckpt
from deltatune.data import IGNORE, Dataset, collate, load_dataset, sample_index, split_validation
from deltatune.models import save_outputs
from deltatune.optim import AdamW
from deltatune.metrics import OOM_ADVICE, _gib, batch_loss, count_params, estimate_memory, evaluate, plot_metrics

__all__ = ["TrainArgs", "TrainResult", "TrainError", "train", "prepare_model", "evaluate", "plot_metrics",
           "estimate_memory"]


@dataclass
class TrainArgs:
    """Settings of one training run. Every field is also a command-line flag (``--max-steps``) and a YAML key."""

    # -- what to train on ----------------------------------------------------------------------------
    model: str = ""
    """Base model: a Hugging Face model directory, a .gguf file, or a hub id (needs a network)."""
    data: str = ""
    """Training data: alpaca/chat JSON or JSONL, a .txt file, or a TSV/CSV classification file."""
    output: str = "out"
    """Output directory: checkpoints/, adapter/, metrics.jsonl, loss.png."""
    data_format: Literal["auto", "alpaca", "chat", "text", "classification"] = "auto"
    """Data format; "auto" decides from the extension and the first record."""
    val_data: Optional[str] = None
    """Validation file (same format as --data); otherwise --val-fraction of the training data is held out."""
    val_fraction: float = 0.0
    """Fraction of the training data held out for validation when --val-data is not given."""
    max_length: int = 512
    """Maximum tokens per example; longer ones are truncated (plain text is cut into blocks this long)."""
    packing: bool = False
    """Concatenate instruction/chat examples into full --max-length blocks."""
    text_columns: Optional[list[str]] = None
    """Classification: the text column(s) (names, or 0-based numbers for files without a header)."""
    label_column: Optional[str] = None
    """Classification: the label column (name or 0-based number); default "label" or "Quality"."""
    max_examples: int = 0
    """Train on a seeded random subset of this many training examples (0 = all)."""
    max_bad_fraction: float = 0.05
    """Stop if more than this fraction of the data rows is bad (they are listed by line number)."""
    task: Literal["auto", "causal-lm", "classification"] = "auto"
    """Model head: "auto" takes classification for TSV/CSV data and causal-lm otherwise."""

    # -- method ------------------------------------------------------------------------------------------
    method: Literal["lora", "full"] = "lora"
    """"lora" trains low-rank adapters on a frozen base; "full" trains every parameter."""
    quant: Optional[str] = None
    """Quantize the frozen base before adding LoRA (QLoRA), e.g. "nf4"."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] | str = "all-linear"
    """Modules to adapt: "all-linear", a list of name suffixes, or a regex on the full name."""
    exclude: Optional[list[str]] = None
    """Module-name suffixes never adapted."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name pattern: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name pattern: alpha}."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r)."""
    init: Literal["kaiming", "gaussian", "pissa"] = "kaiming"
    """LoRA A initialisation."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full next to LoRA (the classification head is added automatically)."""

    # -- optimisation -------------------------------------------------------------------------------------
    max_steps: int = 100
    """Optimizer steps to train for (ignored when --epochs is set)."""
    epochs: float = 0.0
    """If > 0, train for this many passes over the training data instead of --max-steps."""
    micro_batch: int = 4
    """Examples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch * grad_accum)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    lr_b_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): learning rate of the B matrices = lr * lr_b_ratio (the paper suggests 16)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only, not biases or norms)."""
    optimizer_states: Literal["param", "cpu", "paged"] = "param"
    """Where AdamW keeps its moments: beside the parameters, pinned CPU memory, or CUDA managed memory (paged)."""
    optimizer_bits: Literal[32, 8] = 32
    """AdamW moments in fp32 or as blockwise 8-bit codes (deltatune.optim.AdamW)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass (fp16 adds a gradient scaler on CUDA)."""
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen base weights (adapters stay float32); "auto": the --precision dtype for LoRA on CUDA, else float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more time."""
    checkpoint_fraction: float = 1.0
    """With --gradient-checkpointing on the fast path: the fraction of decoder layers recomputed (less = faster, more memory)."""
    seed: int = 0
    """Seed of the adapter initialisation, the data order and dropout."""
    device: str = "auto"
    """"auto" (CUDA if present), "cpu", "cuda", "cuda:1", ..."""
    fast: Optional[bool] = None
    """Fused LoRA kernels (deltatune.fast); default on with CUDA, off on CPU."""
    cuda_graphs: bool = False
    """With the fast path: replay the decoder layers that are not checkpointed from CUDA graphs (faster when the host limits the step; batches of one shape avoid recaptures)."""

    # -- checkpoints, evaluation, output ------------------------------------------------------------------
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep: int = 3
    """Checkpoints kept (the newest)."""
    resume: bool = False
    """Continue from the newest checkpoint in --output."""
    eval_every: int = 0
    """Evaluate on the validation data every this many steps (0 = only at the end, if there is validation data)."""
    log_every: int = 1
    """Write training metrics every this many steps."""
    merge: bool = False
    """Also save the base model with the adapter merged in (<output>/merged)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class TrainResult:
    """What a run produced. ``status``: "done", "interrupted" (signal) or "nan"."""

    status: str
    step: int
    output: Path
    adapter: Optional[Path] = None
    checkpoint: Optional[Path] = None
    final_loss: Optional[float] = None
    eval: dict = field(default_factory=dict)
    message: str = ""


class TrainError(RuntimeError):
    """A run that cannot go on (out of memory, bad settings); the message says what to do."""


# Settings that may change on --resume without changing the computation.
RESUMABLE_CHANGES = {"resume", "save_every", "keep", "eval_every", "log_every", "progress", "merge", "max_steps",
                     "epochs", "output", "device", "fast"}


# -- model preparation ----------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_model(model: torch.nn.Module, args: TrainArgs, task: str = "causal-lm") -> torch.nn.Module:
    """Apply the method to ``model`` in place: quantize, add LoRA, or unfreeze everything. Returns it."""
    import deltatune as dt

    if args.method == "full":
        if args.quant:
            raise TrainError("--quant trains LoRA on a quantized base; it does not combine with --method full")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    save = list(args.modules_to_save or [])
    if task == "classification":
        from deltatune.models import head_module_name

        head = head_module_name(model)
        if head and head not in save:
            save.append(head)  # a fresh classification head must train in full
    if args.quant:
        try:
            from deltatune.quant import quantize_model
        except ImportError as e:
            raise TrainError(f"--quant {args.quant} needs deltatune.quant, which is not available here ({e})") from None
        quantize_model(model, kind=args.quant, skip=save or None)  # what trains in full stays unquantized
    cfg = dt.LoraConfig(r=args.r, alpha=args.alpha, dropout=args.lora_dropout, targets=args.targets,
                        exclude=args.exclude, rank_pattern=dict(args.rank_pattern),
                        alpha_pattern=dict(args.alpha_pattern), use_rslora=args.use_rslora, init=args.init,
                        modules_to_save=save or None)
    dt.add_adapter(model, cfg, name="default")
    return model


def _enable_fast(model, args: TrainArgs, device: torch.device, log) -> bool:
    """Switch on deltatune.fast (fused LoRA, kernels, its own lean checkpointing) where asked; returns whether on."""
    use = args.fast if args.fast is not None else device.type == "cuda"
    if not use or args.method == "full":
        return False
    try:
        from deltatune.fast import enable_fast_path
    except ImportError as e:
        if args.fast:
            log(f"--fast: deltatune.fast is not available ({e}); using the plain path")
        return False
    try:
        enable_fast_path(model, checkpoint=args.checkpoint_fraction if args.gradient_checkpointing else False,
                         cuda_graphs=args.cuda_graphs)
    except ValueError as e:  # --cuda-graphs with every layer checkpointed, or no decoder layers
        raise TrainError(f"--cuda-graphs: {e}") from None
    return True


def base_dtype(args: TrainArgs, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base: ``args.base_dtype``, or for "auto" the --precision dtype for LoRA on CUDA."""
    name = args.base_dtype
    if name == "auto":
        lora_on_cuda = args.method == "lora" and device.type == "cuda"
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(args.precision, "float32") if lora_on_cuda else "float32"
    return getattr(torch, name)


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point parameters in ``dtype`` (half the memory, and what fused kernels expect)."""
    for p in model.parameters():  # parameters only: buffers such as RoPE frequencies keep their precision
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[dict]:
    """AdamW groups: LoRA B matrices at lr * lr_b_ratio (LoRA+); decay on matrices only."""
    import deltatune as dt

    b_ids = set()
    if args.lr_b_ratio != 1.0:
        for m in model.modules():
            if isinstance(m, dt.LoraLayer):
                b_ids |= {id(p) for p in m.lora_B.values()}
    groups: dict[tuple, list] = {}
    for _, p in model.named_parameters():
        if p.requires_grad:
            key = (id(p) in b_ids, p.ndim >= 2)
            groups.setdefault(key, []).append(p)
    out = []
    for (is_b, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": args.lr * (args.lr_b_ratio if is_b else 1.0),
                    "weight_decay": args.weight_decay if decay else 0.0})
    return out


def lr_lambda(args: TrainArgs, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for (0-based) step s: linear warmup, then cosine/linear decay to 0."""
    warm = max(args.warmup_steps, 0)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if args.schedule == "constant":
            return 1.0
        progress = (s - warm) / max(total_steps - warm, 1)
        if args.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return f


# -- reporting -------------------------------------------------------------------------------------------------
class _Signals:
    """Turn SIGTERM/SIGINT into a request to save and stop at the end of the current step."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
              f"(send again to stop without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def _check_resume_args(saved: dict, args: TrainArgs, log) -> None:
    now = asdict(args)
    changed = {k: (saved.get(k), now[k]) for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]}
    if changed:
        raise TrainError("--resume with settings that change the run: "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + "; resume with the original settings or start a new --output")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def load_data(args: TrainArgs, tokenizer, log=print) -> tuple[Dataset, Optional[Dataset]]:
    """The training and validation sets that ``args`` describe."""
    kw = dict(fmt=args.data_format, max_length=args.max_length, packing=args.packing,
              max_bad_fraction=args.max_bad_fraction, text_columns=args.text_columns,
              label_column=args.label_column, log=log)
    train_ds = load_dataset(args.data, tokenizer, **kw)
    if 0 < args.max_examples < len(train_ds):
        keep = sorted(random.Random(args.seed).sample(range(len(train_ds)), args.max_examples))
        train_ds.examples = [train_ds.examples[i] for i in keep]
    val_ds = None
    if args.val_data:
        val_ds = load_dataset(args.val_data, tokenizer, label_names=train_ds.label_names, **kw)
    elif args.val_fraction > 0:
        train_ds, val_ds = split_validation(train_ds, args.val_fraction, args.seed)
    return train_ds, val_ds


def train(args: TrainArgs, model=None, tokenizer=None, train_data: Optional[Dataset] = None,
          val_data: Optional[Dataset] = None, on_step: Optional[Callable[[int, dict], None]] = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the training that ``args`` describe, holding the lock of its output directory;
    see ``_train``. Raises ``CheckpointError`` if another training is writing that directory."""
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with ckpt.run_lock(args.output):
        return _train(args, model, tokenizer, train_data, val_data, on_step, log)


def _train(args: TrainArgs, model=None, tokenizer=None, train_data: Optional[Dataset] = None,
           val_data: Optional[Dataset] = None, on_step: Optional[Callable[[int, dict], None]] = None,
           log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) the training that ``args`` describe; returns a ``TrainResult``.

    ``model``/``tokenizer``/``train_data``/``val_data`` may be given directly (Python use); otherwise
    they are loaded from ``args.model`` and ``args.data``. ``model`` must not have the method applied
    yet. ``on_step(step, metrics)`` is called after every optimizer step. Raises ``TrainError`` on
    out-of-memory or settings that conflict with a checkpoint, ``DataError`` on unusable data.
    """
    import contextlib

    if not 0.0 < args.checkpoint_fraction <= 1.0:
        raise TrainError(f"--checkpoint-fraction must be in (0, 1], got {args.checkpoint_fraction}")
    out = Path(args.output)
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    args_path = out / "train_args.json"
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing and not args.resume:
        raise TrainError(f"{out} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume to "
                         f"continue that run, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_stale(ckpt_dir)
    resume_from = ckpt.latest_checkpoint(ckpt_dir) if args.resume else None
    if resume_from is not None and args_path.exists():
        _check_resume_args(json.loads(args_path.read_text()), args, log)

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if tokenizer is None:
        from deltatune.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    if train_data is None:
        train_data, val_data = load_data(args, tokenizer, log)
        log(train_data.summary())
    task = train_data.task if args.task == "auto" else args.task
    if model is None:
        from deltatune.models import load_model

        log(f"loading {args.model} ...")
        torch.manual_seed(args.seed)  # a fresh classification head is drawn here
        model, _ = load_model(args.model, task=task, label_names=train_data.label_names, tokenizer=tokenizer)
    torch.manual_seed(args.seed)  # adapter initialisation
    frozen_dtype = base_dtype(args, device)
    if args.quant and frozen_dtype != torch.float32:
        model.to(frozen_dtype)  # quantize from the compute dtype, so the quantized layers compute in it
    prepare_model(model, args, task)
    model.to(device)
    _cast_frozen(model, frozen_dtype)
    fast = _enable_fast(model, args, device, log)
    if args.cuda_graphs and not fast:
        raise TrainError("--cuda-graphs needs the fast path (--fast, the default on CUDA)")
    if args.gradient_checkpointing and not fast:
        # Newer transformers call it activation_checkpointing_enable; older ones gradient_checkpointing_enable.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise TrainError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    model.train()

    per_step = args.micro_batch * args.grad_accum
    max_steps = math.ceil(args.epochs * len(train_data) / per_step) if args.epochs > 0 else args.max_steps
    if max_steps <= 0:
        raise TrainError("nothing to train: --max-steps (or --epochs) gives 0 steps")
    trainable, total = count_params(model)
    if trainable == 0:
        raise TrainError("no parameter requires grad after preparing the model")
    seq = max(len(ex["input_ids"]) for ex in train_data.examples)
    mem = estimate_memory(model, args, seq, task)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    log(f"estimated peak memory: {_gib(mem['total'])} (weights {_gib(mem['weights'])}, grads+AdamW "
        f"{_gib(mem['optimizer'])}, activations {_gib(mem['activations'])}, logits {_gib(mem['logits'])}) "
        f"at micro-batch {args.micro_batch} x {seq} tokens on {device}")

    if args.optimizer_states == "param" and args.optimizer_bits == 32:
        optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    else:  # states off the GPU and/or in 8 bits
        if args.optimizer_states == "paged" and device.type != "cuda":
            raise TrainError("--optimizer-states paged needs a CUDA device (CUDA managed memory); use cpu")
        optimizer = AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                          state_device=args.optimizer_states, state_bits=args.optimizer_bits)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, max_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    start = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
        start = state["step"]
        _truncate_metrics(metrics_path, start)
        log(f"resumed from {resume_from} (step {start}, {state['samples_seen']} samples seen)")
    else:
        if args.resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        metrics_path.write_text("")
    args_path.write_text(json.dumps(asdict(args), indent=1))

    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    n = len(train_data)
    result = TrainResult("done", start, out)
    last_ckpt = resume_from
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start, desc="train", dynamic_ncols=True)

    def save(step):
        return ckpt.save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, scaler, keep=args.keep,
                                    extra={"samples_seen": step * per_step, "max_steps": max_steps})

    def log_metrics(rec):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_eval(step):
        res = evaluate(model, val_data, args.micro_batch, device, autocast)
        log_metrics({"step": step, **{f"val_{k}": v for k, v in res.items()}})
        log(f"step {step}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
        return res

    loss_value = None
    with _Signals() as signals:
        try:
            for step in range(start, max_steps):
                t0 = time.perf_counter()
                # Dropout and any other randomness of this step depend on (seed, step) only.
                torch.manual_seed(_step_seed(args.seed, step))
                first = step * per_step
                micro = [collate([train_data.examples[sample_index(first + i * args.micro_batch + j, n, args.seed)]
                                  for j in range(args.micro_batch)], pad_id, train_data.task)
                         for i in range(args.grad_accum)]
                # Normalise by the targets of the whole step, so accumulation equals one big batch.
                if train_data.task == "classification":
                    targets = sum(b["labels"].numel() for b in micro)
                else:
                    targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
                step_loss, tokens = 0.0, 0
                for batch in micro:
                    loss_sum, _, _ = batch_loss(model, batch, train_data.task, device, autocast, fast)
                    value = loss_sum.detach().item()
                    if not math.isfinite(value):
                        return _stop_nan(result, step + 1, value, last_ckpt, bar, log)
                    loss = loss_sum / max(targets, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += value
                    tokens += int(batch["attention_mask"].sum())
                if scaler:
                    scaler.unscale_(optimizer)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                if not torch.isfinite(norm) and scaler is None:
                    return _stop_nan(result, step + 1, float(norm), last_ckpt, bar, log, what="gradient norm")
                lr = optimizer.param_groups[0]["lr"]
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                loss_value = step_loss / max(targets, 1)
                dt_s = time.perf_counter() - t0
                rec = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(norm), "tokens": tokens,
                       "tok_s": tokens / dt_s}
                if done % args.log_every == 0 or done == max_steps:
                    log_metrics(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt_s:.0f}")
                    bar.update(1)
                if val_data is not None and args.eval_every > 0 and done % args.eval_every == 0 and done < max_steps:
                    run_eval(done)
                result.step = done
                if on_step is not None:
                    on_step(done, rec)
                if (args.save_every > 0 and done % args.save_every == 0) or done == max_steps \
                        or signals.received is not None:
                    last_ckpt = save(done)
                if signals.received is not None and done < max_steps:
                    if bar is not None:
                        bar.close()
                    plot_metrics(metrics_path, out / "loss.png")
                    result.status, result.checkpoint = "interrupted", last_ckpt
                    result.message = (f"stopped by {signal.Signals(signals.received).name} after step {done}; "
                                      f"checkpoint {last_ckpt}; continue with --resume")
                    log(result.message)
                    return result
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            raise TrainError(OOM_ADVICE.format(mb=args.micro_batch, len=seq)) from None
    if bar is not None:
        bar.close()

    result.final_loss = loss_value
    result.checkpoint = last_ckpt
    if val_data is not None:
        result.eval = run_eval(max_steps)
    result.adapter = save_outputs(model, tokenizer, args, out, train_data)
    png = plot_metrics(metrics_path, out / "loss.png")
    log(f"saved {result.adapter}" + (f", loss curve {png}" if png else "") + f", metrics {metrics_path}")
    return result


def _stop_nan(result: TrainResult, step: int, value: float, last_ckpt, bar, log, what: str = "loss") -> TrainResult:
    if bar is not None:
        bar.close()
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
    result.status, result.step, result.checkpoint = "nan", step, last_ckpt
    result.message = (f"non-finite {what} ({value}) at step {step}: stopped without saving; {where}. "
                      f"Try a lower --lr, --max-grad-norm, or --precision fp32/bf16 instead of fp16")
    log(result.message)
    return result
