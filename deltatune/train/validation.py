"""Validation during training: evaluate after a step, record and log it, keep the best adapter
(``--keep-best``). Under FSDP / DDP every process evaluates (inside the root's hooks) and process 0
writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltatune.dist import call, gathered
from deltatune.train.args import FULL
from deltatune.train.evaluate import evaluate
from deltatune.train.outputs import append_metrics, write_json
from deltatune.train.tracking import best_val_loss

if TYPE_CHECKING:
    from deltatune.train.loop import Run

__all__ = ["validate"]


def validate(run: "Run", done: int, log) -> dict:
    """Evaluate on the validation data after step ``done``, record it (metrics.jsonl, --report-to), log it,
    and with --keep-best save the adapter if its loss is the lowest so far; returns the metrics."""
    res = call(run.root, run.model, evaluate, run.val_data, run.args.micro_batch, run.device, run.autocast,
                   progress=run.args.progress and run.world.main)  # every process evaluates all of it
    main = run.world.main
    best = best_val_loss(run.metrics_path, done) if main else None
    record = {"step": done, **{f"val_{k}": v for k, v in res.items()}}
    if main:
        append_metrics(run.metrics_path, record)
        if run.reporter is not None:
            run.reporter.log(record)
    log(f"step {done}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    # process 0 decides (it read the metrics); under FSDP every process gathers the model for the save
    if run.args.keep_best and run.world.max(int(main and (best is None or res["loss"] < best))):
        with gathered(run.root):
            if main:
                _save_best(run, done, res)
        log(f"step {done}: best validation loss so far, saved to {run.out / 'best'}")
    return res


def _save_best(run: "Run", done: int, res: dict) -> None:
    """The adapter (or, for full fine-tuning, the model) of step ``done`` as ``<output>/best``."""
    import deltatune as dt

    target = run.out / "best"
    if run.args.method == FULL:
        run.model.save_pretrained(target)
    else:
        dt.save_adapter(run.model, target, name="default")
    write_json(target / "best.json", {"step": done, **{f"val_{k}": v for k, v in res.items()}})
