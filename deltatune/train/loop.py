"""One training loop for every method: LoRA, QLoRA (LoRA on a quantized base), any adapter method, and
full fine-tuning, as ``setup`` -> ``step`` (repeated) -> ``finish``.

Methods are model transforms applied in ``setup`` (``deltatune.train.prepare``); the step only sees
"the parameters that require grad" and hands each collated micro-batch to the model's adapters
(``deltatune.adapters.prepare_batch``) for methods that change the input. Everything that varies
between runs is a pure function of the seed and the step: the data order (``data.sample_index``),
the dropout RNG (reseeded from (seed, step) before each step) and the learning rate, so a run
resumed from a checkpoint computes exactly what the uninterrupted run would have (bitwise on CPU
in fp32).

    deltatune train --model DIR --data FILE --output DIR --max-steps 200 --save-every 50
    deltatune train --config run.yaml --resume
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from deltatune.adapters import batch_preparers, prepare_batch
import deltatune.train.checkpoint as ckpt
from deltatune.train.args import (
    DataArgs, TrainArgs, TrainError, check_resume, resolve_device, resolve_max_length, resolve_precision, run_record,
)
from deltatune.train.console import StopSignals
from deltatune.train.seeding import seed_generators, step_seed
from deltatune.dist import World, call, full_tensor, gathered, grad_sync, init_world
from deltatune.train.parallel import check_world, quiet, sharding_of, wrap_model
from deltatune.train.data import Dataset
from deltatune.train.distill import Distillation, distill_metrics, make_distillation
from deltatune.train.objective import Objective, token_objective
from deltatune.train.outputs import (
    append_metrics, check_outputs, plot_metrics, truncate_metrics, write_json,
)
from deltatune.train.prepare import (
    base_dtype, cast_frozen, enable_checkpointing, enable_fast, graphs_setting, lr_lambda, make_optimizer, prepare_model,
)
from deltatune.train.inputs import load_data, resolve_method
from deltatune.train.tasks import head_of
from deltatune.train.validation import validate
from deltatune.train.throughput import Meter, bar_postfix
from deltatune.train.token_budget import BudgetSchedule, step_examples
from deltatune.train.tracking import Reporter, check_reporter, open_reporter
from deltatune.train.report import OOM_ADVICE, count_params, estimate_memory, gib

__all__ = ["TrainResult", "Run", "NonFinite", "train", "setup", "step", "finish", "load_data", "resolve_method"]


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


@dataclass
class Run:
    """A prepared run: what ``setup`` builds and ``step`` / ``finish`` use."""

    args: TrainArgs
    data: DataArgs
    method: object
    """The method's config (``LoraConfig``, ...); None for "full"."""
    model: torch.nn.Module
    tokenizer: object
    train_data: Dataset
    val_data: Optional[Dataset]
    device: torch.device
    fast: bool
    """Whether the fused path (``deltatune.fast``) computes the loss."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: Optional[object]
    amp_dtype: Optional[torch.dtype]
    max_steps: int
    seq: int
    """Tokens of the longest training example (for the memory estimate and the out-of-memory advice)."""
    start: int
    """Steps already done (resumed from a checkpoint)."""
    checkpoint: Optional[Path]
    """The newest checkpoint written or resumed from."""
    reporter: Optional[Reporter] = None
    """Where metrics also go (``--report-to``); opened by the loop."""
    retention: Optional[object] = None
    """--retention: the suite and its base's numbers (``deltatune.train.retention.Retention``); opened by the loop."""
    meter: Optional[Meter] = None
    """Tokens/s, memory and MFU of each step (made at the first step)."""
    objective: Optional[Objective] = None
    """What a step computes: collate, targets, loss, meter, outputs (``TokenObjective`` unless given)."""
    schedule: Optional[BudgetSchedule] = None
    """The micro-batches under --tokens-per-step (None: --micro-batch examples each)."""
    prefetched: Optional[dict] = None
    """{step index: its collated micro-batches}, made while the previous step ran on the GPU."""
    distill: Optional[Distillation] = None
    """The teacher and the KD term's settings (--teacher); None: cross-entropy alone."""
    world: World = field(default_factory=World)
    """This process's rank among the processes of a data-parallel run (torchrun); one process: 0 of 1."""
    root: Optional[torch.nn.Module] = None
    """The FSDP / DDP root (``deltatune.dist.ModelCall``) around ``model``; None for one process."""
    preparers: Optional[list] = None
    """``adapters.batch_preparers(model)``, listed at the first step (a walk over the model, about 1 ms)."""

    @property
    def out(self) -> Path:
        """The output directory."""
        return Path(self.args.output)

    @property
    def ckpt_dir(self) -> Path:
        """Where checkpoints go."""
        return self.out / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        """The metrics log (one JSON line per step and per evaluation)."""
        return self.out / "metrics.jsonl"

    @property
    def per_step(self) -> int:
        """Examples per optimizer step (over all processes)."""
        return self.args.micro_batch * self.args.grad_accum * self.world.size

    def samples_before(self, step: int) -> int:  # examples drawn before ``step``
        return self.schedule.samples_before(step) if self.schedule else step * self.per_step

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token id (0 without one)."""
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        return pad if pad is not None else 0

    def autocast(self):
        """The forward pass's autocast context (none in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


class NonFinite(Exception):
    """A NaN/inf loss or gradient norm at 1-based ``step``, found before the optimizer changed anything."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(f"non-finite {what} ({value}) at step {step}")
        self.what, self.value, self.step = what, value, step


# -- setup -----------------------------------------------------------------------------------------------------
def setup(args: TrainArgs, data: DataArgs, method=None, model=None, tokenizer=None,
          train_data: Optional[Dataset] = None, val_data: Optional[Dataset] = None, log=print,
          objective: Optional[Objective] = None) -> Run:
    """Everything before the first step: check the output directory and --resume, load the tokenizer,
    data and model (unless given), apply the method, build the optimizer and schedule, and restore
    the newest checkpoint when resuming. ``model`` must not have the method applied yet; ``objective``
    (default: ``TokenObjective``, cross-entropy over tokens) is what each step computes."""
    if not 0.0 < args.checkpoint_fraction <= 1.0:
        raise TrainError(f"--checkpoint-fraction must be in (0, 1], got {args.checkpoint_fraction}")
    check_reporter(args.report_to)
    if args.retention:  # an unknown suite or missing data fails before the model loads
        from deltatune.train.retention import check_retention

        check_retention(args)
    method = resolve_method(args, method)
    out = Path(args.output)
    ckpt_dir, metrics_path, args_path = out / "checkpoints", out / "metrics.jsonl", out / "train_args.json"
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing and not args.resume:
        raise TrainError(f"{out} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume to "
                         f"continue that run, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    world = init_world(resolve_device(args.device))  # torchrun's process group (or one process)
    if world.main:
        ckpt.clean_stale(ckpt_dir)
    resume_from = ckpt.latest_checkpoint(ckpt_dir) if args.resume else None
    device = world.device(resolve_device(args.device))
    # what "auto" means here is what the run records (and what a resume must agree with)
    args = dataclasses.replace(args, precision=resolve_precision(args.precision, device))
    if tokenizer is None:
        from deltatune.hub import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    data = resolve_max_length(data, tokenizer)  # the unset default means a number the run records
    if resume_from is not None and args_path.exists():
        check_resume(check_world(json.loads(args_path.read_text()), resume_from, args, world), args, data, method)
    torch.manual_seed(args.seed)
    if train_data is None:
        train_data, val_data = load_data(args, data, tokenizer, log)
        log(train_data.summary())
    task = train_data.task if data.task == "auto" else head_of(data.task)
    if model is None:
        from deltatune.hub import load_model

        log(f"loading {args.model} ...")
        torch.manual_seed(args.seed)  # a fresh classification head is drawn here
        model, _ = load_model(args.model, task=task, label_names=train_data.label_names, tokenizer=tokenizer)
    torch.manual_seed(args.seed)  # adapter initialisation
    frozen_dtype = base_dtype(args, device)
    if args.quant and frozen_dtype != torch.float32:
        model.to(frozen_dtype)  # quantize from the compute dtype, so the quantized layers compute in it
    prepare_model(model, args, method, task)
    check_outputs(model, args, out)  # fail now, not after training, if the outputs cannot be written
    model.to(device)
    cast_frozen(model, frozen_dtype)
    args = dataclasses.replace(args, cuda_graphs=graphs_setting(args, model, device, train_data, sharding_of(args, world)))
    fast = enable_fast(model, args, device, log, task)
    if args.cuda_graphs and not fast:
        raise TrainError("--cuda-graphs needs the fast path (--fast, the default on CUDA)")
    distill = make_distillation(args, model, tokenizer, task, device, frozen_dtype, fast, log)
    if args.gradient_checkpointing and not fast:
        enable_checkpointing(model)
    model.train()
    root = wrap_model(model, args, world, device, log)  # FSDP / DDP over torchrun's processes

    per_step = args.micro_batch * args.grad_accum * world.size
    lengths = [len(ex["input_ids"]) for ex in train_data.examples]
    try:
        schedule = BudgetSchedule(lengths, args.seed, args.tokens_per_step, args.grad_accum * world.size) \
            if args.tokens_per_step else None
    except ValueError as e:
        raise TrainError(str(e)) from None
    max_steps = args.max_steps if args.epochs <= 0 else schedule.steps_for_epochs(args.epochs) if schedule \
        else math.ceil(args.epochs * len(train_data) / per_step)
    if max_steps <= 0:
        raise TrainError("nothing to train: --max-steps (or --epochs) gives 0 steps")
    trainable, total = count_params(model)
    if trainable == 0:
        raise TrainError("no parameter requires grad after preparing the model")
    seq = max(len(ex["input_ids"]) for ex in train_data.examples)
    mem = estimate_memory(model, args, seq, task)
    shape = (f"at most {args.tokens_per_step:,} padded tokens a step" if schedule else
             f"about {round(sum(lengths) / len(lengths) * per_step):,} tokens a step ({args.micro_batch} x "
             f"{args.grad_accum} rows")
    if objective is None:  # token data (another objective describes its own batches)
        log(f"{device}, {args.precision}, {'fused' if fast else 'plain'} path{' + CUDA graphs' if args.cuda_graphs else ''}, "
            f"{'packed rows' if train_data.packed else 'one example a row'}: {shape}"
            f", the longest {seq} tokens{'' if schedule else ')'}")
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if objective is None:
        log(f"estimated peak memory: {gib(mem['total'])} (weights {gib(mem['weights'])}, grads+AdamW "
            f"{gib(mem['optimizer'])}, activations {gib(mem['activations'])}, logits {gib(mem['logits'])}) "
            f"at micro-batch {args.micro_batch} x {seq} tokens on {device}")

    optimizer = make_optimizer(model, args, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, max_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    start = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
        start = state["step"]
        if world.main:
            truncate_metrics(metrics_path, start)
        log(f"resumed from {resume_from} (step {start}, {state['samples_seen']} samples seen)")
    else:
        if args.resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        if world.main:
            metrics_path.write_text("")
    if world.main:
        write_json(args_path, run_record(args, data, method))
    world.barrier()
    return Run(args, data, method, model, tokenizer, train_data, val_data, device, fast, optimizer, scheduler, scaler,
               amp_dtype, max_steps, seq, start, resume_from, schedule=schedule, distill=distill, world=world, root=root,
               objective=objective or token_objective(task, tokenizer, args, data, train_data, device))


# -- one step --------------------------------------------------------------------------------------------------
def _collated(run: Run, index: int) -> list[dict]:
    """The collated micro-batches of optimizer step ``index`` (a pure function of seed and step), pinned
    on a GPU run so their copies to the device overlap the work in flight."""
    args, data = run.args, run.train_data
    # a data-parallel step is the micro-batches of grad_accum x processes; this process takes its share
    micro = [run.objective.collate([data.examples[i] for i in picked]) for picked in run.world.mine(
             step_examples(run.schedule, index, len(data), args.micro_batch, args.grad_accum * run.world.size,
                           args.seed))]
    if run.device.type == "cuda":
        micro = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in micro]
    return micro


def step(run: Run, index: int) -> dict:
    """Optimizer step ``index`` (0-based): ``grad_accum`` micro-batches forward and backward, clip, update.

    Returns the step's metrics (step, loss, lr, grad_norm, and ``Meter.measure``'s tokens, tok_s, padded
    tokens/s, memory, MFU). Raises ``NonFinite`` on a
    NaN/inf loss or gradient norm, before the optimizer changed anything.

    The host waits for the GPU once a step, for the loss and gradient norm after the last backward; the
    next step's batches are collated before that wait, while the GPU still works on this one.
    """
    args, model, optimizer, scaler = run.args, run.model, run.optimizer, run.scaler
    t0 = time.perf_counter()
    # Dropout and any other randomness of this step depend on (seed, step) only.
    seed_generators(step_seed(args.seed, index), run.device)
    collated = run.prefetched.pop(index, None) if run.prefetched else None
    run.preparers = batch_preparers(model) if run.preparers is None else run.preparers
    micro = [prepare_batch(model, b, run.preparers) for b in (collated or _collated(run, index))]
    # Normalise by the targets of the whole step (of all processes), so accumulation equals one big batch.
    targets = round(run.world.sum([sum(run.objective.targets(b) for b in micro)])[0])
    losses, kd_parts = [], []

    def micro_loss(model, batch):
        # distillation needs the student's logits: the fused head + cross-entropy gives none
        loss_sum, _, logits = run.objective.batch_loss(model, batch, run.device, run.autocast,
                                                       run.fast and run.distill is None)
        part = None
        if run.distill is not None:  # (1 - α)·CE + α·T²·KL(teacher ‖ student), summed (deltatune.train.distill)
            loss_sum, part = run.distill.loss(model, batch, loss_sum, logits, run.device, run.autocast)
        return loss_sum, part

    for k, batch in enumerate(micro):
        # dropout of global micro-batch k depends on (seed, step, k) only: the same on any number of processes
        seed_generators(step_seed(args.seed, index) + run.world.rank * len(micro) + k, run.device)
        with grad_sync(run.root, k == len(micro) - 1):  # processes reduce gradients at the last micro-batch
            loss_sum, part = call(run.root, model, micro_loss, batch)
            if part is not None:
                kd_parts.append(part)
            # FSDP and DDP average gradients over processes: times world.size makes it the global sum
            loss = loss_sum * run.world.size / max(targets, 1)
            (scaler.scale(loss) if scaler else loss).backward()
        losses.append(loss_sum.detach().float())
    if index + 1 < run.max_steps:  # host work that overlaps this step's GPU work
        run.prefetched = {index + 1: _collated(run, index + 1)}
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
    norm = full_tensor(norm)  # FSDP: the norm over all shards
    step_loss, norm_value = torch.stack([torch.stack(losses).sum(), norm.float().to(losses[0].device)]).tolist()
    step_loss = run.world.sum([step_loss])[0]  # over all processes
    if not math.isfinite(step_loss):
        raise NonFinite("loss", step_loss, index + 1)
    if not math.isfinite(norm_value) and scaler is None:
        raise NonFinite("gradient norm", norm_value, index + 1)
    lr = optimizer.param_groups[0]["lr"]
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = step_loss / max(targets, 1)
    meter = run.meter or run.objective.meter(model, run.device, run.amp_dtype)
    run.meter = meter
    return {"step": index + 1, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
            **(distill_metrics([torch.tensor(run.world.sum(torch.stack(kd_parts).sum(0).tolist()))], targets)
               if kd_parts else {}),  # (CE, KD) sums of every process
            **meter.measure(micro, time.perf_counter() - t0)}


def _save(run: Run, done: int) -> Path:
    # every process gathers its shards; process 0 writes (the others wait for it)
    run.checkpoint = ckpt.save_checkpoint(run.ckpt_dir, done, run.model, run.optimizer, run.scheduler, run.scaler,
                                          keep=run.args.keep, extra={"samples_seen": run.samples_before(done),
                                                                     "max_steps": run.max_steps,
                                                                     "world_size": run.world.size},
                                          write=run.world.main)
    run.world.barrier()
    return run.checkpoint


def _retain(run: Run, done: int, log) -> None:
    """--retention: the suite on the model of step ``done`` against its base, into the metrics log."""
    record = run.retention.record(run.model, done)
    append_metrics(run.metrics_path, record)
    if run.reporter is not None:
        run.reporter.log(record)
    log(run.retention.line(record))


# -- finish ----------------------------------------------------------------------------------------------------
def finish(run: Run, result: TrainResult, log=print) -> TrainResult:
    """After the last step: evaluate on the validation data, save the adapter (or model) and the loss plot."""
    result.checkpoint = run.checkpoint
    if run.retention is not None:
        _retain(run, run.max_steps, log)
    if run.val_data is not None:
        result.eval = validate(run, run.max_steps, log)
    with gathered(run.root):  # FSDP: the whole model on every process while process 0 saves it
        result.adapter = run.objective.save_outputs(run) if run.world.main else None
    run.world.barrier()
    if not run.world.main:
        return result
    png = plot_metrics(run.metrics_path, run.out / "loss.png")
    log(f"saved {result.adapter}" + (f", loss curve {png}" if png else "") + f", metrics {run.metrics_path}")
    return result


# -- the whole run ---------------------------------------------------------------------------------------------
def train(args: TrainArgs, data: Optional[DataArgs] = None, method=None, *, model=None, tokenizer=None,
          train_data: Optional[Dataset] = None, val_data: Optional[Dataset] = None,
          on_step: Optional[Callable[[int, dict], None]] = None, log: Callable[[str], None] = print,
          objective: Optional[Objective] = None) -> TrainResult:
    """Run (or resume) the training that ``args``, ``data`` and ``method`` describe; returns a ``TrainResult``.

    Args:
        args: the loop and run settings (``args.method`` names the method).
        data: what to train on (default ``DataArgs()``; its ``data`` may stay empty when ``train_data`` is given).
        method: the method's config (``LoraConfig(...)``); default: ``args.method``'s with the trainer's
            defaults (LoRA r=16, alpha=32); None for "full".
        model, tokenizer, train_data, val_data: objects you already have, instead of loading them from
            ``args.model`` and ``data``; ``model`` must not have the method applied yet.
        on_step: called as ``on_step(step, metrics)`` after every optimizer step.
        objective: what each step computes (``deltatune.train.objective``); default: cross-entropy over tokens.
    Holds the lock of the output directory while it runs (``CheckpointError`` if another training
    holds it). Raises ``TrainError`` on out-of-memory or settings that conflict with a checkpoint,
    ``DataError`` on unusable data.
    """
    data = data if data is not None else DataArgs()
    out = Path(args.output)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    world = init_world(resolve_device(args.device))  # under torchrun: join its processes (deltatune.dist)
    if not world.main:
        log = quiet  # process 0 speaks for the run
    with ckpt.run_lock(out) if world.main else contextlib.nullcontext():
        try:
            run = setup(args, data, method, model, tokenizer, train_data, val_data, log, objective)
            run.reporter = open_reporter(args.report_to, run.out) if world.main else None
            try:
                return _run(run, on_step, log)
            finally:
                if run.reporter is not None:
                    run.reporter.close()
        except BaseException:
            if created and world.main:  # a run that failed before writing anything leaves no folder holding
                ckpt.remove_if_only_lock(out)  # only its .lock
            raise


def _run(run: Run, on_step, log) -> TrainResult:
    """The steps from ``run.start`` to ``run.max_steps``, checkpoints, validation, signals, then ``finish``."""
    args = run.args
    result = TrainResult("done", run.start, run.out)
    if args.retention and run.retention is None:  # the base's numbers, before this process's first step
        from deltatune.train.retention import open_retention

        run.retention = open_retention(run, log)
    bar = None
    main = run.world.main  # process 0 writes metrics, plots and the progress bar
    if args.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=run.max_steps, initial=run.start, desc="train", dynamic_ncols=True)
    loss_value = None
    with StopSignals() as signals:
        try:
            for index in range(run.start, run.max_steps):
                try:
                    rec = step(run, index)
                except NonFinite as e:
                    return _stop_nan(result, e, run.checkpoint, bar, log)
                done, loss_value = rec["step"], rec["loss"]
                if main and (done % args.log_every == 0 or done == run.max_steps):
                    append_metrics(run.metrics_path, rec)
                    if run.reporter is not None:
                        run.reporter.log(rec)
                if bar is not None:
                    bar.set_postfix(bar_postfix(rec), refresh=False)  # drawn by update, at most 10 times a second
                    bar.update(1)
                if run.retention is not None and args.eval_every > 0 and done % args.eval_every == 0 \
                        and done < run.max_steps:
                    _retain(run, done, log)
                if run.val_data is not None and args.eval_every > 0 and done % args.eval_every == 0 \
                        and done < run.max_steps:
                    validate(run, done, log)
                result.step = done
                if on_step is not None:
                    on_step(done, rec)
                # processes stop together: a signal that reached any of them stops all after this step
                received = signals.received if run.world.size == 1 else run.world.max(signals.received or 0) or None
                if (args.save_every > 0 and done % args.save_every == 0) or done == run.max_steps \
                        or received is not None:
                    _save(run, done)
                if received is not None and done < run.max_steps:
                    if bar is not None:
                        bar.close()
                    if main:
                        plot_metrics(run.metrics_path, run.out / "loss.png")
                    result.status, result.checkpoint = "interrupted", run.checkpoint
                    result.message = (f"stopped by {signal.Signals(received).name} after step {done}; "
                                      f"checkpoint {run.checkpoint}; continue with --resume")
                    log(result.message)
                    return result
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            raise TrainError(OOM_ADVICE.format(mb=args.micro_batch, len=run.seq)) from None
    if bar is not None:
        bar.close()
    result.final_loss = loss_value
    return finish(run, result, log)


def _stop_nan(result: TrainResult, error: NonFinite, last_ckpt, bar, log) -> TrainResult:
    if bar is not None:
        bar.close()
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
    result.status, result.step, result.checkpoint = "nan", error.step, last_ckpt
    result.message = (f"{error}: stopped without saving; {where}. "
                      f"Try a lower --lr, --max-grad-norm, or --precision fp32/bf16 instead of fp16")
    log(result.message)
    return result
