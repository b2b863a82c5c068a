"""What a run writes besides checkpoints: the trained adapter (or full model), the merged model, the
record of how it was trained (``deltatune_train.json``), the metrics log and the loss plot.

Files are written atomically (a temporary file renamed into place), so a killed run never leaves a
half-written one behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from deltatune.train.args import DataArgs, TrainArgs
    from deltatune.train.data import Dataset

__all__ = ["RUN_INFO", "save_outputs", "save_merged", "run_info", "write_json", "append_metrics",
           "truncate_metrics", "plot_metrics"]

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


def save_outputs(model, tokenizer, args: TrainArgs, data: DataArgs, out: Path, train_data: Dataset) -> Path:
    """Write the trained result: the adapter in PEFT format (or the full model), optionally merged, and
    its ``deltatune_train.json``: what ``deltatune eval`` and ``merge`` need to read data and load the
    model as this run did (base model, task, labels, data format and columns). Returns the directory."""
    import deltatune as dt

    info = {"base_model": args.model, "task": train_data.task, "label_names": train_data.label_names,
            "method": args.method, "data_format": train_data.fmt, "text_columns": data.text_columns,
            "label_column": data.label_column}
    if args.method == "full":
        target = out / "model"
        model.save_pretrained(target)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
    else:
        target = dt.save_adapter(model, out / "adapter", name="default")
        if args.merge:
            save_merged(model, tokenizer, out / "merged")
    write_json(target / RUN_INFO, info)
    return target


def save_merged(model, tokenizer, target: Path) -> Path:
    """Save ``model`` with its active adapters merged, as a plain model under ``target``."""
    import deltatune as dt
    from deltatune.adapters import FullCopies, adapter_modules

    base_keys = _base_state_keys(model)
    dt.merge(model)
    try:
        state = {k: v for k, v in model.state_dict().items() if k in base_keys}
        for path, module in adapter_modules(model):  # modules_to_save: the active copy is the merged module
            if isinstance(module, FullCopies) and module.active:
                for key, value in module.describe(module.active[0]).items():
                    state[f"{path}.{key}"] = value
        model.save_pretrained(target, state_dict=state)
    finally:
        dt.unmerge(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def _base_state_keys(model) -> set[str]:
    """State-dict keys of the base model: those of the model without its adapters."""
    import deltatune as dt

    keys = set(model.state_dict())
    adapter = {id(p) for p in dt.adapter_params(model)}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter} & keys


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


def plot_metrics(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Plot training (and validation) loss from a metrics JSONL file to a PNG; returns its path."""
    try:
        import matplotlib
    except ImportError:  # a declared dependency; without it the run still finishes, without the plot
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps, losses = zip(*train)
    ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="train loss")
    if len(losses) >= 10:  # per-step losses are noisy: an exponential moving average shows the trend
        beta, avg, smooth = 1 - 1 / max(5, len(losses) // 20), 0.0, []
        for i, value in enumerate(losses, 1):
            avg = beta * avg + (1 - beta) * value
            smooth.append(avg / (1 - beta ** i))  # bias-corrected, so the first points are not pulled to 0
        ax.plot(steps, smooth, lw=1.8, color="C0", label="train loss (moving average)")
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
