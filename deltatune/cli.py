"""The ``deltatune`` command: ``train``, ``eval``, ``merge``, ``demo`` and ``bench``.

Flags and YAML keys come from the typed dataclasses (``TrainArgs``, ``EvalArgs``, ...): one flag per
field, its help text from the field's docstring, ``--config FILE.yaml`` for any subset of them.
Both ``--max-steps`` and ``--max_steps`` spellings work; booleans take ``--flag`` / ``--no-flag``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional, get_type_hints

__all__ = ["main", "dataclass_parser", "parse_dataclass", "EvalArgs", "MergeArgs"]

USAGE = """usage: deltatune {demo,train,eval,merge,bench} ...

  demo    fine-tune SmolLM2-135M-Instruct with LoRA on a built-in task, on CPU, in minutes
  train   train an adapter (or the full model): deltatune train --model M --data D --output O
  eval    perplexity / accuracy / exact match of a model, optionally with an adapter
  merge   save a model with an adapter merged into its weights
  bench   speed and memory benchmarks (deltatune bench --help)

Run `deltatune COMMAND --help` for the flags of a command."""


@dataclass
class EvalArgs:
    """Evaluate a model (optionally with an adapter) on a data file."""

    data: str = ""
    """Evaluation data (same formats as training)."""
    adapter: Optional[str] = None
    """Adapter directory (PEFT format); its deltatune_train.json supplies --model when that is not given."""
    model: Optional[str] = None
    """Base model: directory, .gguf file or hub id."""
    data_format: Literal["auto", "alpaca", "chat", "text", "classification"] = "auto"
    """Data format; "auto" decides from the extension and the first record."""
    max_length: int = 512
    """Maximum tokens per example."""
    text_columns: Optional[list[str]] = None
    """Classification: the text column(s)."""
    label_column: Optional[str] = None
    """Classification: the label column."""
    batch_size: int = 8
    """Examples per forward pass."""
    max_examples: int = 0
    """Evaluate on the first this many examples only (0 = all)."""
    device: str = "auto"
    """"auto", "cpu", "cuda", ..."""


@dataclass
class MergeArgs:
    """Merge an adapter into its base model and save the result as a plain model directory."""

    adapter: str = ""
    """Adapter directory (PEFT format)."""
    output: str = ""
    """Directory for the merged model."""
    model: Optional[str] = None
    """Base model; default: the one recorded in the adapter's deltatune_train.json."""


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, by field name."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def dataclass_parser(cls, prog: str):
    """A jsonargparse parser with one flag per field of dataclass ``cls`` and ``--config`` for YAML."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0],
                            default_env=False, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the settings below")
    hints = get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kind = hints[f.name]
        if kind is bool or kind == Optional[bool]:
            parser.add_argument(flags[0], dest=f.name, action=ActionYesNo(no_prefix="no-"), default=default,
                                help=docs.get(f.name, ""))
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=docs.get(f.name, ""))
    return parser


def parse_dataclass(cls, argv: list[str], prog: str):
    """Parse ``argv`` (flags and/or ``--config``) into an instance of dataclass ``cls``."""
    parser = dataclass_parser(cls, prog)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)


# -- commands ---------------------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> int:
    from deltatune.checkpoint import CheckpointError
    from deltatune.data import DataError
    from deltatune.models import ModelLoadError
    from deltatune.train import TrainArgs, TrainError, train

    args = parse_dataclass(TrainArgs, argv, "deltatune train")
    for name in ("model", "data"):
        if not getattr(args, name):
            print(f"deltatune train: --{name} is required", file=sys.stderr)
            return 2
    try:
        result = train(args)
    except (TrainError, DataError, ModelLoadError, CheckpointError) as e:
        print(f"deltatune train: error: {e}", file=sys.stderr)
        return 2
    if result.status == "nan":
        return 3
    if result.status == "interrupted":
        return 130
    return 0


def _adapter_info(adapter: Optional[str]) -> dict:
    import json
    from pathlib import Path

    if adapter and (Path(adapter) / "deltatune_train.json").exists():
        return json.loads((Path(adapter) / "deltatune_train.json").read_text())
    return {}


def cmd_eval(argv: list[str]) -> int:
    import json

    import torch

    import deltatune as dt
    from deltatune.data import Dataset, DataError, load_dataset
    from deltatune.models import ModelLoadError, load_model, load_tokenizer
    from deltatune.train import evaluate, resolve_device

    args = parse_dataclass(EvalArgs, argv, "deltatune eval")
    info = _adapter_info(args.adapter)
    model_path = args.model or info.get("base_model")
    if not model_path or not args.data:
        print("deltatune eval: --data and --model (or an --adapter that records its base) are required",
              file=sys.stderr)
        return 2
    try:
        tok = load_tokenizer(model_path)
        ds = load_dataset(args.data, tok, fmt=args.data_format, max_length=args.max_length,
                          text_columns=args.text_columns, label_column=args.label_column,
                          label_names=info.get("label_names"), max_bad_fraction=1.0)
        if args.max_examples:
            ds = Dataset(ds.examples[:args.max_examples], ds.task, ds.path, ds.fmt, label_names=ds.label_names)
        torch.manual_seed(0)
        model, _ = load_model(model_path, task=ds.task, label_names=ds.label_names, tokenizer=tok)
        if args.adapter:
            dt.load_adapter(model, args.adapter, name="default")
        model.to(resolve_device(args.device))
    except (DataError, ModelLoadError, ValueError) as e:
        print(f"deltatune eval: error: {e}", file=sys.stderr)
        return 2
    res = evaluate(model, ds, args.batch_size)
    res["examples"] = len(ds)
    print(json.dumps(res))
    return 0


def cmd_merge(argv: list[str]) -> int:
    from pathlib import Path

    import deltatune as dt
    from deltatune.models import ModelLoadError, load_model
    from deltatune.models import save_merged

    args = parse_dataclass(MergeArgs, argv, "deltatune merge")
    info = _adapter_info(args.adapter)
    model_path = args.model or info.get("base_model")
    if not args.adapter or not args.output or not model_path:
        print("deltatune merge: --adapter, --output and --model (unless the adapter records it) are required",
              file=sys.stderr)
        return 2
    try:
        model, tok = load_model(model_path, task=info.get("task", "causal-lm"), label_names=info.get("label_names"))
        dt.load_adapter(model, args.adapter, name="default")
    except (ModelLoadError, ValueError) as e:
        print(f"deltatune merge: error: {e}", file=sys.stderr)
        return 2
    save_merged(model, tok, Path(args.output))
    print(f"merged model saved to {args.output}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from deltatune.demo import DemoArgs, run_demo

    return run_demo(parse_dataclass(DemoArgs, argv, "deltatune demo"))


def cmd_bench(argv: list[str]) -> int:
    try:
        from deltatune.benchmark import main as bench_main
    except ImportError as e:
        print(f"deltatune bench: deltatune.benchmark is not available ({e})", file=sys.stderr)
        return 2
    result = bench_main(argv)
    return result if isinstance(result, int) else 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "demo": cmd_demo, "bench": cmd_bench}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``deltatune`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"deltatune: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
