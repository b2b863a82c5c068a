"""Training: one loop for every method (``loop``), its settings (``args``), data (``formats`` -> ``chat`` ->
``data``), model preparation (``prepare``), evaluation, outputs, checkpoints and the optimizer.

    from deltatune.train import DataArgs, TrainArgs, train
    from deltatune import LoraConfig

    result = train(TrainArgs(model="path/to/model", output="runs/a", max_steps=200),
                   DataArgs(data="train.jsonl"), LoraConfig(r=16, alpha=32))
"""

from deltatune.train.args import DataArgs, TrainArgs, TrainError, method_config, resolve_device
from deltatune.train.checkpoint import CheckpointError
from deltatune.train.data import Dataset, load_dataset
from deltatune.train.evaluate import batch_loss, evaluate, evaluate_adapter
from deltatune.train.formats import DataError
from deltatune.train.loop import TrainResult, load_data, train
from deltatune.train.outputs import plot_metrics, save_merged
from deltatune.train.prepare import param_groups, prepare_model
from deltatune.train.report import count_params, estimate_memory

__all__ = ["TrainArgs", "DataArgs", "TrainResult", "TrainError", "DataError", "CheckpointError", "train",
           "prepare_model", "param_groups", "method_config", "load_data", "load_dataset", "Dataset", "evaluate",
           "evaluate_adapter", "batch_loss", "plot_metrics", "save_merged", "estimate_memory", "count_params",
           "resolve_device"]
