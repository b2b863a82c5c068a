"""The settings of a training run: ``TrainArgs`` (the loop and the run), ``DataArgs`` (the data, shared by
train and eval) and the method's own config (``LoraConfig``, ...), chosen by ``TrainArgs.method``.

The three are flat dataclasses with one docstring per field; on the command line and in YAML their
fields are one flat set of flags/keys (``--r 16 --lr 2e-4 --data train.jsonl``), and
``train_args.json`` records them as one flat dict (``run_record``), so field names must not clash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from deltatune.methods import config_class, method_names

__all__ = ["TrainArgs", "DataArgs", "TrainError", "RESUMABLE_CHANGES", "FULL", "METHOD_DEFAULTS", "FLAG_ALIASES",
           "METHOD_ALIASES", "method_choices", "method_config_class", "method_config", "run_record", "check_resume", "resolve_device",
           "resolve_precision", "resolve_max_length", "DEFAULT_MAX_LENGTH"]

FULL = "full"
"""The method name that trains every parameter (no adapter, no method config)."""

METHOD_DEFAULTS: dict[str, dict] = {"lora": {"r": 16, "alpha": 32.0}}
"""Where ``deltatune train`` defaults differ from the method config's own (LoraConfig's r=8, alpha=8)."""

FLAG_ALIASES: dict[str, dict[str, str]] = {"lora": {"lora_dropout": "dropout"}}
"""Older flag/YAML names of method fields, per method: ``--lora-dropout`` sets LoraConfig.dropout."""

METHOD_ALIASES: dict[str, str] = {"prompt": "prompt_tuning", "ptuning": "p_tuning", "prefix": "prefix_tuning"}
"""Short names for --method (the registered names follow PEFT's: prompt_tuning, p_tuning, prefix_tuning)."""

# Settings that may change on --resume without changing the computation.
RESUMABLE_CHANGES = {"resume", "save_every", "keep", "eval_every", "log_every", "progress", "merge", "max_steps",
                     "epochs", "output", "device", "fast", "max_classes",
                     "report_to", "keep_best", "retention", "retention_rows", "retention_data", "sharding",
                     "cuda_graphs"}


class TrainError(RuntimeError):
    """A run that cannot go on (out of memory, bad settings); the message says what to do."""


@dataclass
class TrainArgs:
    """Settings of one training run. Every field is also a command-line flag (``--max-steps``) and a YAML key."""

    # -- model and method ----------------------------------------------------------------------------------
    model: str = ""
    """Base model: a Hugging Face model directory, a .gguf file, or a hub id (needs a network)."""
    output: str = "out"
    """Output directory: checkpoints/, adapter/, metrics.jsonl, loss.png."""
    method: str = "lora"
    """"full" trains every parameter; "lora" (or another adapter method) trains its adapter on a frozen base."""
    quant: Optional[str] = None
    """Quantize the frozen base before adding the adapter (QLoRA), e.g. "nf4"."""

    # -- optimisation ------------------------------------------------------------------------------------------
    max_steps: int = 100
    """Optimizer steps to train for (ignored when --epochs is set)."""
    epochs: float = 0.0
    """If > 0, train for this many passes over the training data instead of --max-steps."""
    micro_batch: int = 4
    """Examples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch * grad_accum)."""
    tokens_per_step: int = 0
    """If > 0, batch by token budget instead of --micro-batch: each micro-batch takes as many examples (or packed rows) as fit in tokens_per_step / grad_accum padded tokens, so every step carries about the same work."""
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
    """AdamW moments in fp32 or as blockwise 8-bit codes (deltatune.train.optim.AdamW)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of the forward pass: "auto" is bf16 on a GPU that has it, else fp32 (fp16 adds a gradient scaler on CUDA)."""
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen base weights (adapters stay float32); "auto": the --precision dtype for adapter methods on CUDA, else float32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more time."""
    checkpoint_fraction: float = 1.0
    """With --gradient-checkpointing on the fast path: the fraction of decoder layers recomputed (less = faster, more memory)."""
    seed: int = 0
    """Seed of the adapter initialisation, the data order and dropout."""
    device: str = "auto"
    """"auto" (CUDA if present), "cpu", "cuda", "cuda:1", ..."""
    fast: Optional[bool] = None
    """Fused LoRA kernels (deltatune.fast). Unset: on with CUDA where it fuses more than the projections (a causal LM's loss, Llama-style blocks, --cuda-graphs; not a BERT classifier), off on CPU."""
    cuda_graphs: Optional[bool] = None
    """With the fast path: replay the decoder layers that are not checkpointed (an encoder's layers) from CUDA graphs (faster when the host limits the step; packed rows take one static shape, an encoder's rows one capture per width). Unset: on a GPU, on for LoRA on packed rows and for encoders whose rows take at most 8 widths (train.prepare.graphs_setting), off elsewhere."""
    sharding: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    """Under torchrun with several processes: "fsdp" (FSDP2, each decoder block's parameters sharded, the frozen base too), "ddp" (a whole copy per process, gradients all-reduced); "auto": fsdp with several processes, none with one. The global batch is micro_batch x grad_accum x processes."""

    # -- checkpoints, evaluation, output ----------------------------------------------------------------------
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
    report_to: str = "none"
    """Experiment logging besides metrics.jsonl: "tensorboard" writes event files to <output>/tensorboard (needs tensorboardX)."""
    keep_best: bool = False
    """Keep the adapter (or model) with the lowest validation loss in <output>/best, with best.json saying its step."""
    retention: Optional[str] = None
    """Forgetting: at each evaluation (every --eval-every steps and at the end) measure a suite of held-out general data ("general", "text", "sst2"; docs/training.md) and log retention_<metric> and its _change against the base in metrics.jsonl."""
    retention_rows: int = 8
    """--retention: rows of each part of the suite (the first ones of each file)."""
    retention_data: Optional[str] = None
    """--retention: the data folder (tinyshakespeare/, alpaca/, chat/, sst2/); default: shared/data beside the checkout, else ../shared/data."""

    # -- knowledge distillation (deltatune.train.distill) -------------------------------------------------
    teacher: Optional[str] = None
    """Distill from a teacher: "base" (the base model, adapters off: a regulariser against forgetting) or a causal LM (directory, .gguf, hub id) with the student's vocabulary; the loss becomes (1 - distill_weight)·CE + distill_weight·T²·KL(teacher ‖ student) over the target tokens."""
    distill_temperature: float = 1.0
    """With --teacher: the temperature T both distributions are softened by (the KL term is scaled by T²)."""
    distill_weight: float = 0.5
    """With --teacher: the weight α in [0, 1] of the distillation term (0: plain fine-tuning, 1: distillation only)."""

    # -- diffusion models (deltatune.train.diffusion) ---------------------------------------------------------
    train_text_encoder: bool = False
    """Diffusion: also put the adapter on the text encoder's attention projections (default: the UNet's only)."""
    prior_loss_weight: float = 1.0
    """Diffusion with --class-data: the weight of the class images' loss (DreamBooth's prior preservation)."""
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = "auto"
    """Diffusion: what the UNet learns to predict; "auto": the scheduler config's prediction_type."""
    save_format: Literal["peft", "kohya"] = "peft"
    """Diffusion: "kohya" also writes the adapter as one kohya / LyCORIS file (<output>/adapter/kohya.safetensors) for A1111 / ComfyUI; PEFT's and diffusers' files are always written."""


@dataclass
class DataArgs:
    """What data to read and how (training, validation, evaluation). Every field is also a flag and a YAML key."""

    data: str = ""
    """Data file: alpaca/chat JSON or JSONL, a .txt file, or a TSV/CSV classification file."""
    data_format: Literal["auto", "alpaca", "chat", "text", "classification"] = "auto"
    """Data format; "auto" decides from the extension and the first record (eval: as the adapter's run recorded)."""
    val_data: Optional[str] = None
    """Validation file (same format as --data); otherwise --val-fraction of the training data is held out."""
    val_fraction: float = 0.0
    """Fraction of the training data held out for validation when --val-data is not given."""
    max_length: Optional[int] = None
    """Maximum tokens per example (and a packed row's width); longer ones are truncated (plain text is cut into blocks this long). Default: 1024, or the tokenizer's model_max_length where that is shorter (512 for BERT-style encoders)."""
    packing: bool = True
    """Instruction/chat data: several examples in each row of up to --max-length tokens, each attending only to itself (no padding); --no-packing: one example a row."""
    text_columns: Optional[list[str]] = None
    """Classification: the text column(s) (names, or 0-based numbers for files without a header)."""
    label_column: Optional[str] = None
    """Classification: the label column (name or 0-based number); default "label" or "Quality"."""
    max_examples: int = 0
    """Use this many examples (0 = all): training takes a seeded random subset, evaluation the first ones."""
    max_bad_fraction: float = 0.05
    """Stop if more than this fraction of the data rows is bad (they are listed by line number)."""
    max_classes: int = 100
    """Classification: refuse a label column with more distinct values than this, or with about one per row (a text column named by mistake); 0 = no check."""
    task: Literal["auto", "causal-lm", "classification", "sst2", "mrpc", "cola", "rte", "gsm8k", "diffusion"] = "auto"
    """Model head ("auto": classification for TSV/CSV data, diffusion for a diffusers pipeline directory, else causal-lm; eval: as recorded), or a named task (sst2, mrpc, cola, rte, gsm8k) that also fixes the columns, labels and official metric (deltatune.train.tasks)."""
    resolution: int = 512
    """Diffusion: images are resized (shorter side) and center-cropped to this many pixels square."""
    instance_prompt: Optional[str] = None
    """Diffusion: the caption of images without one (DreamBooth's instance prompt, e.g. "a photo of sks dog")."""
    class_data: Optional[str] = None
    """Diffusion: a folder (or JSONL) of class images for prior preservation (DreamBooth); each step adds their loss."""
    class_prompt: Optional[str] = None
    """Diffusion: the caption of class images without their own .txt (e.g. "a photo of a dog")."""


# -- the method, by name ---------------------------------------------------------------------------------------
def method_choices() -> list[str]:
    """Every value ``TrainArgs.method`` takes: "full" and the registered adapter methods."""
    return [FULL] + [name for name in method_names() if name != FULL]


def method_config_class(name: str) -> Optional[type]:
    """The config dataclass of method ``name`` (``LoraConfig`` for "lora"); None for "full".

    Raises ``TrainError`` naming the known methods for an unknown name."""
    if name == FULL:
        return None
    name = METHOD_ALIASES.get(name, name)
    choices = method_choices()
    if name not in choices:
        raise TrainError(f"unknown --method {name!r}; choose one of {choices}")
    return config_class(name)


def method_config(name: str, **fields):
    """Method ``name``'s config with the trainer's defaults (``METHOD_DEFAULTS``) and ``fields``; None for "full"."""
    cls = method_config_class(name)
    if cls is None:
        if fields:
            raise TrainError(f"--method full takes no method settings, got {sorted(fields)}")
        return None
    return cls(**{**METHOD_DEFAULTS.get(METHOD_ALIASES.get(name, name), {}), **fields})


# -- what a run records, and what --resume may change -------------------------------------------------------------
def run_record(args: TrainArgs, data: DataArgs, method) -> dict:
    """All settings of a run as one flat dict (``train_args.json``; also usable as a ``--config`` file)."""
    record = dataclasses.asdict(args)
    for part in (data, method):
        if part is None:
            continue
        fields = dataclasses.asdict(part)
        clash = set(fields) & set(record)
        if clash:
            raise TrainError(f"{type(part).__name__} fields {sorted(clash)} clash with other settings' names")
        record.update(fields)
    return record


def _defaults(args: TrainArgs, method) -> dict:
    """The default value of every flat setting (what a record written before a setting existed meant)."""
    out = {}
    for cls in (type(args), DataArgs, type(method) if method is not None else None):
        if cls is None:
            continue
        for f in dataclasses.fields(cls):
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def check_resume(saved: dict, args: TrainArgs, data: DataArgs, method) -> None:
    """Raise ``TrainError`` if a setting outside ``RESUMABLE_CHANGES`` differs from the ``saved`` record.

    A setting missing from ``saved`` (a record of an older version) counts as its default; a method
    field saved under an older name (``lora_dropout``) counts under its current one."""
    saved = dict(saved)
    for old, new in FLAG_ALIASES.get(args.method, {}).items():
        if old in saved and new not in saved:
            saved[new] = saved.pop(old)
    now, defaults = run_record(args, data, method), _defaults(args, method)
    changed = {k: (saved.get(k, defaults.get(k)), now[k]) for k in now
               if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now[k]}
    if changed:
        raise TrainError("--resume with settings that change the run: "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + "; resume with the original settings or start a new --output")


DEFAULT_MAX_LENGTH = 1024
"""--max-length where unset: TRL's SFT default; long enough for most instruction and chat examples (at 512,
107 of the 299 glaive tool-call chats were cut), and rows this wide keep a GPU step busy (docs/benchmarks.md)."""


def resolve_max_length(data: DataArgs, tokenizer) -> DataArgs:
    """``data`` with --max-length resolved: as given, or where unset (None) ``DEFAULT_MAX_LENGTH`` capped at
    the tokenizer's ``model_max_length`` when that states a shorter context (a BERT-style encoder's position
    embeddings end at 512). What a run records, so a resume and ``deltatune eval`` see the same number."""
    if data.max_length is not None:
        if isinstance(data.max_length, bool) or not isinstance(data.max_length, int) or data.max_length < 1:
            raise TrainError(f"--max-length must be a positive number of tokens, got {data.max_length!r}")
        return data
    limit = getattr(tokenizer, "model_max_length", None)
    length = DEFAULT_MAX_LENGTH
    if isinstance(limit, int) and 0 < limit < length:
        length = limit
    return dataclasses.replace(data, max_length=length)


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a --precision setting means on ``device``: "auto" is bf16 on a CUDA device that
    supports it and fp32 elsewhere (the CPU, older GPUs); other names stand for themselves."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_device(name: str) -> torch.device:
    """``torch.device`` of a --device setting; "auto" is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
