"""Preparing a model and its optimizer for training: the method (quantize, add the adapter, or unfreeze
everything), the frozen base's dtype, the fast path, activation checkpointing, AdamW's parameter
groups (LoRA+) and the learning-rate schedule.

This is the part a distributed setup (FSDP2: shard after the method is applied) replaces or wraps;
the loop (``deltatune.train.loop``) only sees "the parameters that require grad".
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from deltatune.train.args import FULL, TrainArgs, TrainError, method_config
from deltatune.train.optim import AdamW

__all__ = ["prepare_model", "base_dtype", "cast_frozen", "enable_fast", "enable_checkpointing", "param_groups",
           "make_optimizer", "lr_lambda"]


def prepare_model(model: torch.nn.Module, args: TrainArgs, method=None, task: str = "causal-lm") -> torch.nn.Module:
    """Apply the method to ``model`` in place and return it: for "full" unfreeze every parameter;
    otherwise quantize the base if ``args.quant`` and add adapter "default" with config ``method``
    (default: ``args.method``'s config with the trainer's defaults). A classification head is added
    to the config's ``modules_to_save``: a fresh head must train in full."""
    import deltatune as dt

    if args.method == FULL:
        if args.quant:
            raise TrainError("--quant trains an adapter on a quantized base; it does not combine with --method full")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method is None:
        method = method_config(args.method)
    save = list(method.modules_to_save or [])
    if task == "classification":
        from deltatune.hub import head_module_name

        head = head_module_name(model)
        if head and head not in save:
            save.append(head)
    if args.quant:
        try:
            from deltatune.quant import quantize_model
        except ImportError as e:
            raise TrainError(f"--quant {args.quant} needs deltatune.quant, which is not available here ({e})") from None
        quantize_model(model, kind=args.quant, skip=save or None)  # what trains in full stays unquantized
    dt.add_adapter(model, method.replace(modules_to_save=save or None), name="default")
    if args.merge and _input_adapters(model):  # said before training, not after it
        raise TrainError(f"--merge: {_input_adapters(model)} adapters are virtual tokens fed into every call, not a "
                         f"weight change; they cannot be merged (train without --merge)")
    return model


def base_dtype(args: TrainArgs, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base: ``args.base_dtype``, or for "auto" the --precision dtype for an
    adapter method on CUDA, else float32."""
    name = args.base_dtype
    if name == "auto":
        adapter_on_cuda = args.method != FULL and device.type == "cuda"
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(args.precision, "float32") if adapter_on_cuda else "float32"
    return getattr(torch, name)


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point parameters in ``dtype`` (half the memory, and what fused kernels expect)."""
    for p in model.parameters():  # parameters only: buffers such as RoPE frequencies keep their precision
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def enable_fast(model, args: TrainArgs, device: torch.device, log, task: str = "causal-lm") -> bool:
    """Switch on deltatune.fast (fused LoRA, kernels, its own lean checkpointing) where asked; returns whether on.

    Unset (``args.fast`` None), it is on for CUDA runs where it fuses more than the adapter layers' projections:
    a causal LM's head and loss (``task``), Llama-family blocks (``fast.fuses_blocks``), or CUDA graphs. An
    encoder such as BERT gets the plain path: its fused projections alone saved a few kernels a layer and cost
    twice the plain forward's host time a call (docs/speed_notes.md, session 12). ``--fast`` still turns it on."""
    use = args.fast if args.fast is not None else device.type == "cuda"
    if not use or args.method == FULL:
        return False
    feeding = _input_adapters(model)
    if feeding:  # the fused loss takes token ids; these adapters feed embeddings / a cache through forward
        log(f"fast path off: {feeding} adapters feed virtual tokens through the model's own forward, which the "
            f"fused path does not run; using the plain path")
        return False
    try:
        from deltatune.fast import enable_fast_path, fuses_blocks
    except ImportError as e:
        if args.fast:
            log(f"--fast: deltatune.fast is not available ({e}); using the plain path")
        return False
    if args.fast is None and not args.cuda_graphs and task != "causal-lm" and not fuses_blocks(model):
        log(f"plain path: the fused path would fuse only the adapter layers' projections of this "
            f"{type(model).__name__}, which costs the host more than it saves the GPU (--fast turns it on)")
        return False
    try:
        enable_fast_path(model, checkpoint=args.checkpoint_fraction if args.gradient_checkpointing else False,
                         cuda_graphs=args.cuda_graphs)
    except ValueError as e:  # --cuda-graphs with every layer checkpointed, or no decoder or encoder layers
        raise TrainError(f"--cuda-graphs: {e}") from None
    if args.cuda_graphs:  # the loop alone touches the model between steps (fast.graphs.GraphedStack)
        from deltatune.fast import fast_path_of

        fast_path_of(model).graphs.check_every = GRAPH_CHECK_EVERY
    return True


GRAPH_CHECK_EVERY = 16
"""How often (in graphed steps) a training run checks that its graphed layers are as captured: nothing in
the loop changes them between steps, and a check is a tenth of a small encoder's step (MiniLM-L6)."""


GRAPHED_METHODS = ("lora",)
"""Methods whose fast-path layers CUDA graphs are measured to capture (LoRA, rsLoRA, DoRA): where
--cuda-graphs is left unset, graphs are on for these only."""


def graphs_setting(args: TrainArgs, model, device: torch.device, train_data, sharding: str) -> bool:
    """What --cuda-graphs means for this run: as given, or where unset (None) on when every condition for
    graph captures a run holds: the fast path on a CUDA device (bf16/fp16 by --precision), a method of
    ``GRAPHED_METHODS``, no token budget (it sets the rows per step), no --teacher base (it toggles the
    adapters every micro-batch), no FSDP, and static shapes: packed rows (``objective.static_shape``) with
    decoder layers left uncheckpointed, or an encoder's one-example rows padded to at most
    ``fast.graphs.MAX_CACHED`` widths (``objective.width_buckets``; one cached capture each). On the H200
    this doubled real tokens/s on short packed rows, where the host's kernel launches otherwise set the
    pace (docs/benchmarks.md)."""
    if args.cuda_graphs is not None:
        return args.cuda_graphs
    if not (device.type == "cuda" and args.fast is not False and args.method in GRAPHED_METHODS
            and args.precision in ("bf16", "fp16") and not args.tokens_per_step and args.teacher != "base"
            and sharding != "fsdp" and not _input_adapters(model)):
        return False
    if train_data.packed:
        return not (args.gradient_checkpointing and args.checkpoint_fraction >= 1.0)
    return not args.gradient_checkpointing and _few_encoder_widths(model, args, device, train_data)


GRAPH_MEMORY_SHARE = 0.25
"""The share of the GPU's memory that an encoder's cached graph captures may take by default (each width
keeps one step's activations in its own pool)."""


def _few_encoder_widths(model, args: TrainArgs, device: torch.device, train_data) -> bool:
    """Whether ``model`` is an encoder (no decoder layers) whose bucketed row widths fit the graph cache, and
    whose captures (one step's activations each, at most the longest row's) fit ``GRAPH_MEMORY_SHARE`` of the
    device."""
    from deltatune.fast.graphs import MAX_CACHED
    from deltatune.fast.path import _decoder_layers, _encoder_layers
    from deltatune.train.objective import WIDTH_MULTIPLE
    from deltatune.train.report import estimate_memory

    if _decoder_layers(model) or not _encoder_layers(model) or not train_data.examples:
        return False
    longest = max(len(ex["input_ids"]) for ex in train_data.examples)
    widths = math.ceil(longest / WIDTH_MULTIPLE)
    if widths > MAX_CACHED:
        return False
    captures = widths * estimate_memory(model, args, widths * WIDTH_MULTIPLE, "classification")["activations"]
    return captures <= GRAPH_MEMORY_SHARE * device_memory(device)


def device_memory(device: torch.device) -> int:
    """Total bytes of memory on the CUDA ``device``."""
    return torch.cuda.get_device_properties(device).total_memory


def _input_adapters(model) -> list[str]:
    """Names of the virtual-token methods (prompt / P- / prefix tuning) of the model's adapters."""
    from deltatune.adapters import virtual_tokens

    module = virtual_tokens(model)
    return sorted({enc.method for enc in module.encoders.values()}) if module is not None else []


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing (the plain path; the fast path has its own)."""
    if "prefix_tuning" in _input_adapters(model):
        raise TrainError("--gradient-checkpointing does not combine with prefix tuning: recomputed layers would add "
                         "the prefix to the cache twice (as in PEFT); train without it")
    # Newer transformers call it activation_checkpointing_enable; older ones gradient_checkpointing_enable.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TrainError(f"--gradient-checkpointing: {type(model).__name__} does not support it")


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[dict]:
    """AdamW groups: LoRA's B matrices at lr * lr_b_ratio (LoRA+); decay on matrices only."""
    import deltatune as dt

    b_ids = {id(p) for p in dt.adapter_params(model, role="B")} if args.lr_b_ratio != 1.0 else set()
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


def make_optimizer(model: torch.nn.Module, args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, or deltatune's when the states live off the device or in 8 bits.

    On CUDA torch's is its fused form (one kernel a parameter group; the default multi-tensor form is about a
    dozen launches and their Python: 0.51 against 0.18 ms a step of host time for MiniLM's 26 LoRA tensors on
    a CPU), except for parameters sharded across processes (``torch.distributed``), which keep the default."""
    if args.optimizer_states == "param" and args.optimizer_bits == 32:
        groups = param_groups(model, args)
        fused = device.type == "cuda" and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if fused else {}))
    if args.optimizer_states == "paged" and device.type != "cuda":
        raise TrainError("--optimizer-states paged needs a CUDA device (CUDA managed memory); use cpu")
    return AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                 state_device=args.optimizer_states, state_bits=args.optimizer_bits)


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
