"""What a run trains: the method config it uses (``resolve_method``) and its training and validation
data (``load_data``); ``loop.setup`` calls both.
"""

from __future__ import annotations

import random
from typing import Optional

from deltatune.train.args import (
    FULL, DataArgs, TrainArgs, TrainError, method_config, method_config_class, resolve_max_length,
)
from deltatune.train.data import Dataset, load_dataset, split_validation
from deltatune.train.tasks import apply_task, named_task

__all__ = ["resolve_method", "load_data"]


def resolve_method(args: TrainArgs, method=None):
    """The method config a run uses: ``method`` if given (it must be ``args.method``'s config class),
    else ``args.method``'s config with the trainer's defaults; None for "full"."""
    if method is None:
        return method_config(args.method)
    cls = method_config_class(args.method)
    if cls is None:
        raise TrainError(f"--method {FULL} trains every parameter and takes no method config, got "
                         f"{type(method).__name__}")
    if not isinstance(method, cls):
        raise TrainError(f"method config {type(method).__name__} does not fit --method {args.method!r} "
                         f"(which takes {cls.__name__}); set TrainArgs.method to the config's method")
    return method


def load_data(args: TrainArgs, data: DataArgs, tokenizer, log=print) -> tuple[Dataset, Optional[Dataset]]:
    """The training and validation sets that ``data`` describes (``args.seed`` picks subsets)."""
    if not data.data:
        raise TrainError("no training data: set DataArgs.data (--data)")
    named, data = named_task(data.task), apply_task(resolve_max_length(data, tokenizer))
    kw = dict(fmt=data.data_format, max_length=data.max_length, packing=data.packing,
              max_bad_fraction=data.max_bad_fraction, text_columns=data.text_columns,
              label_column=data.label_column, max_classes=data.max_classes, log=log)
    fixed = list(named.label_names) if named is not None and named.label_names else None
    train_ds = load_dataset(data.data, tokenizer, label_names=fixed, **kw)
    if 0 < data.max_examples < len(train_ds):
        keep = sorted(random.Random(args.seed).sample(range(len(train_ds)), data.max_examples))
        train_ds.examples = [train_ds.examples[i] for i in keep]
    val_ds = None
    if data.val_data:
        val_ds = load_dataset(data.val_data, tokenizer, label_names=train_ds.label_names, **kw)
    elif data.val_fraction > 0:
        train_ds, val_ds = split_validation(train_ds, data.val_fraction, args.seed)
    return train_ds, val_ds
