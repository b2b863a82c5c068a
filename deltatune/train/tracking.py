"""Experiment logging beside ``metrics.jsonl``: TensorBoard event files (``--report-to tensorboard``)
and the best adapter by validation loss (``--keep-best``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["REPORTERS", "Reporter", "check_reporter", "open_reporter", "best_val_loss"]

REPORTERS = ("none", "tensorboard")
"""Values of ``--report-to``."""


class Reporter:
    """Sends each metrics record (``{"step": n, "loss": ..., "val_loss": ...}``) to TensorBoard as
    scalars ``train/<name>``, ``val/<name>`` and ``retention/<name>``; the event files go to ``<output>/tensorboard``."""

    def __init__(self, out: Path):
        from tensorboardX import SummaryWriter
        self.dir = Path(out) / "tensorboard"
        self.writer = SummaryWriter(logdir=str(self.dir))

    def log(self, record: dict) -> None:
        """Write the numbers of one metrics record at its step."""
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                name = f"val/{key[4:]}" if key.startswith("val_") else f"retention/{key[10:]}" \
                    if key.startswith("retention_") else f"train/{key}"
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def check_reporter(kind: Optional[str]) -> None:
    """Raise ``TrainError`` before training for an unknown ``--report-to`` or a missing package."""
    from deltatune.train.args import TrainError

    if kind in (None, "", "none"):
        return
    if kind not in REPORTERS:
        raise TrainError(f"unknown --report-to {kind!r}; choose one of {list(REPORTERS)}")
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise TrainError("--report-to tensorboard needs the tensorboardX package: "
                         "pip install 'deltatune[tensorboard]' (or pip install tensorboardX)") from None


def open_reporter(kind: Optional[str], out: Path) -> Optional[Reporter]:
    """The reporter ``--report-to`` asks for (None for "none"); raises ``TrainError`` as ``check_reporter``."""
    check_reporter(kind)
    return None if kind in (None, "", "none") else Reporter(out)


def best_val_loss(metrics_path: Path, before: int) -> Optional[float]:
    """The lowest ``val_loss`` logged in ``metrics_path`` at a step before ``before`` (None if none);
    read from the log, so a resumed run knows the best of the steps it kept."""
    path = Path(metrics_path)
    if not path.exists():
        return None
    losses = [r["val_loss"] for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))
              if "val_loss" in r and r.get("step", 0) < before]
    return min(losses) if losses else None
