"""What a run writes besides checkpoints: the trained adapter (or full model), the merged model, the
record of how it was trained (``deltatune_train.json``), the metrics log and the loss plot.

Files are written atomically (a temporary file renamed into place), so a killed run never leaves a
half-written one behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from deltatune.train.tasks import TASKS

if TYPE_CHECKING:
    from deltatune.train.args import DataArgs, TrainArgs
    from deltatune.train.data import Dataset

__all__ = ["RUN_INFO", "save_outputs", "save_merged", "merged_state", "check_outputs", "base_of", "export_gguf",
           "load_merge_source", "run_info",
           "write_json", "append_metrics", "truncate_metrics", "plot_metrics"]

RUN_INFO = "deltatune_train.json"
"""Beside the adapter: the base model, the task and labels, the method, and how the data were read."""


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_info(directory: str | Path | None) -> dict:
    """The ``deltatune_train.json`` of an adapter or model directory ({} if there is none).

    Raises ``ValueError`` naming the file if it is not valid JSON."""
    if not directory:
        return {}
    path = Path(directory) / RUN_INFO
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def base_of(directory: str | Path | None) -> str | None:
    """The base model an adapter or model directory names: its ``deltatune_train.json``'s, else the
    ``base_model_name_or_path`` of its ``adapter_config.json`` (a GGUF file when that names a directory
    holding exactly one and no config.json); None if neither says."""
    info = run_info(directory)
    if info.get("base_model"):
        return info["base_model"]
    config = Path(directory) / "adapter_config.json" if directory else None
    if config is None or not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # load_adapter reports a broken config, naming it
    if base and Path(base).is_dir() and not (Path(base) / "config.json").exists():
        ggufs = sorted(Path(base).glob("*.gguf"))
        return str(ggufs[0]) if len(ggufs) == 1 else base
    return base


def check_outputs(model, args: TrainArgs, out: Path) -> None:
    """Before training: fail now, not after it, if the run's outputs cannot be written. Checks that
    ``out`` takes files, that a full or merged model can be written as a plain model directory (it
    has a config; GGUF bases included) and that the disk has room for it. Raises ``TrainError``."""
    import shutil
    import tempfile

    from deltatune.formats.hf_model import ModelDirError, model_bytes, plain_config
    from deltatune.train.args import TrainError

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test."):
            pass
    except OSError as e:
        raise TrainError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    if args.method != "full" and not args.merge:
        return
    if args.method != "full":
        from deltatune.methods import method_named

        if not getattr(method_named(args.method), "mergeable", True):
            raise TrainError(f"--merge: {args.method} adapters are not linear in the base weights and cannot be "
                             f"merged into them; train without --merge")
    what = "--method full" if args.method == "full" else "--merge"
    try:
        plain_config(model)
    except ModelDirError as e:
        raise TrainError(f"{what}: {e}") from None
    need = model_bytes(_base_state(model))
    free = shutil.disk_usage(out).free
    if need > free:
        raise TrainError(f"{what}: the model needs {need / 2**30:.2f} GiB in {out}, but only "
                         f"{free / 2**30:.2f} GiB are free")


def save_outputs(model, tokenizer, args: TrainArgs, data: DataArgs, out: Path, train_data: Dataset) -> Path:
    """Write the trained result: the adapter in PEFT format (or the full model), optionally merged, and
    its ``deltatune_train.json``: what ``deltatune eval`` and ``merge`` need to read data and load the
    model as this run did (base model, task, labels, data format and columns). The record is written
    before any model export, so a failed export still leaves a usable adapter. Returns the directory."""
    import deltatune as dt
    from deltatune.formats.hf_model import save_model_dir
    from deltatune.hub import base_reference

    base = base_reference(args.model)
    info = {"base_model": base["base_model"], "task": train_data.task, "label_names": train_data.label_names,
            "method": args.method, "data_format": train_data.fmt, "text_columns": data.text_columns,
            "label_column": data.label_column, "task_name": data.task if data.task in TASKS else None}
    if args.method == "full":
        target = out / "model"
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / RUN_INFO, info)
        save_model_dir(model, target, tokenizer)
    else:
        target = dt.save_adapter(model, out / "adapter", name="default", base_model=base["base_model_name_or_path"],
                                 task=train_data.task, revision=base["revision"])
        write_json(target / RUN_INFO, info)
        if args.merge:
            save_merged(model, tokenizer, out / "merged")
    return target


def save_merged(model, tokenizer, target: Path, dtype=None) -> Path:
    """Save ``model`` with its active adapters merged, as a plain model directory under ``target``
    (``formats.hf_model``: any base, GGUF-loaded included), floating-point weights in ``dtype`` if given."""
    from deltatune.formats.hf_model import save_model_dir

    with merged_state(model) as state:
        save_model_dir(model, target, tokenizer, state=state, dtype=dtype)
    return Path(target)


@contextlib.contextmanager
def merged_state(model):
    """Within the block: the state dict of ``model``'s base with its active adapters merged in (a
    ``modules_to_save`` module as its active copy), under the base model's keys; unmerged after."""
    import deltatune as dt
    from deltatune.adapters import FullCopies, adapter_modules
    from deltatune.quant import QuantLinear, export_merged

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        # A 4-bit base: merging in place would requantize (and the file would hold 4-bit codes). Fold the
        # adapters into dequantized fp32 weights on a copy instead: exact, and the model stays as it was.
        dense = copy.deepcopy(model)
        export_merged(dense, dtype=torch.float32)
        with merged_state(dense) as state:
            yield state
        return
    dt.merge(model)
    try:
        state = _base_state(model)
        for path, module in adapter_modules(model):  # modules_to_save: the active copy is the merged module;
            # new blocks (holds_model_weights): their tensors are the merged model's, under its keys
            if (isinstance(module, FullCopies) or getattr(module, "holds_model_weights", False)) and module.active:
                for key, value in module.describe(module.active[0]).items():
                    state[f"{path}.{key}"] = value
        yield state
    finally:
        dt.unmerge(model)


def export_gguf(model, tokenizer, path: str | Path, dtype: str = "f16", vocab_from: str | None = None) -> Path:
    """Write ``model`` with its active adapters merged as one GGUF file (``formats.gguf_export``: Llama
    family; f16, bf16 or q8_0), its tokenizer included (or the ``tokenizer.*`` fields of GGUF file
    ``vocab_from``, e.g. the base it was trained from). The model is left unmerged. Returns the path."""
    from deltatune.formats.gguf_export import write_gguf
    from deltatune.formats.hf_model import plain_config

    with merged_state(model) as state:
        return write_gguf(path, plain_config(model), state, tokenizer, dtype=dtype, vocab_from=vocab_from)


def load_merge_source(adapter: str | None = None, model: str | None = None):
    """Load what ``deltatune merge`` / ``export`` write: base ``model`` (default: the one ``adapter``
    records) with ``adapter`` loaded if given. Returns ``(model, tokenizer, base path)``. The adapter's
    files are checked before the model loads; raises ``ValueError`` or ``ModelLoadError`` naming the input."""
    import deltatune as dt
    from deltatune.formats.files import read_adapter_files
    from deltatune.hub import load_model

    info = run_info(adapter)
    base = model or base_of(adapter)
    if not base:
        raise ValueError(f"--model is required: {adapter or 'no adapter'} records no base model")
    if adapter:
        read_adapter_files(adapter)  # a broken adapter is reported before minutes of model loading
    net, tok = load_model(base, task=info.get("task", "causal-lm"), label_names=info.get("label_names"))
    if adapter:
        dt.load_adapter(net, adapter, name="default")
    return net, tok, base


def _base_state(model) -> dict:
    """The state dict of the base model: ``model``'s without its adapters' tensors."""
    import deltatune as dt

    adapter = {id(p) for p in dt.adapter_params(model)}
    state = model.state_dict()
    keys = {k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter}
    return {k: v for k, v in state.items() if k in keys}


# -- metrics.jsonl and loss.png -----------------------------------------------------------------------------
def append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to the metrics log."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def plot_metrics(metrics_path: Path, png_path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Plot training (and validation) loss from a metrics JSONL file to a PNG titled ``title`` (default:
    the run directory's name); steps are integer ticks. Returns the PNG's path (None without data)."""
    try:
        import matplotlib
    except ImportError:  # a declared dependency; without it the run still finishes, without the plot
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="train loss")
    if len(losses) >= 10:
        # Per-step losses are noisy: a moving average centered on each step (``half`` points either side,
        # fewer at the ends) shows the trend without the lag of an exponential average.
        half, sums = max(2, len(losses) // 40), [0.0]
        for value in losses:
            sums.append(sums[-1] + value)
        window = [(max(0, i - half), min(len(losses), i + half + 1)) for i in range(len(losses))]
        smooth = [(sums[b] - sums[a]) / (b - a) for a, b in window]
        ax.plot(steps, smooth, lw=1.8, color="C0", label=f"train loss (centered average of {2 * half + 1} steps)")
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.set_title(title if title is not None else Path(metrics_path).resolve().parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
