"""Named tasks: GLUE's SST-2, MRPC, CoLA and RTE, and GSM8K. A name given as ``--task`` fixes the
columns, the labels (their ids too) and the official metric, so a file of that task reads the same way
in training and evaluation, whatever its extension, and its score is the one papers report.

| task  | columns read                          | labels (id order)            | official metric |
|-------|----------------------------------------|------------------------------|-----------------|
| sst2  | sentence -> label                      | 0, 1                         | accuracy |
| mrpc  | #1 String, #2 String -> Quality        | 0, 1                         | F1 of class 1 and accuracy (score: their mean) |
| cola  | column 3 -> column 1 (no header)       | 0, 1                         | Matthews correlation |
| rte   | sentence1, sentence2 -> label          | entailment, not_entailment   | accuracy |
| gsm8k | question -> answer (causal LM)         | -                            | answer accuracy (``deltatune.train.metrics``) |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["Task", "TASKS", "HEADS", "named_task", "apply_task", "head_of", "task_score"]

HEADS = ("auto", "causal-lm", "classification", "diffusion")
"""Values of ``--task`` that name a model head rather than a task."""


@dataclass(frozen=True)
class Task:
    name: str
    head: str
    """"classification" or "causal-lm"."""
    metric: str
    """The official metric: a key of the evaluation's result ("accuracy", "mcc", "f1+accuracy", "answer_accuracy")."""
    text_columns: Optional[tuple[str, ...]] = None
    label_column: Optional[str] = None
    label_names: Optional[tuple[str, ...]] = None


TASKS = {
    "sst2": Task("sst2", "classification", "accuracy", ("sentence",), "label", ("0", "1")),
    "mrpc": Task("mrpc", "classification", "f1+accuracy", ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "cola": Task("cola", "classification", "mcc", ("3",), "1", ("0", "1")),
    "rte": Task("rte", "classification", "accuracy", ("sentence1", "sentence2"), "label",
                ("entailment", "not_entailment")),
    "gsm8k": Task("gsm8k", "causal-lm", "answer_accuracy"),
}


def named_task(task: str) -> Optional[Task]:
    """The task called ``task`` (None for a head name); ValueError naming the known ones otherwise."""
    if task in HEADS:
        return None
    if task not in TASKS:
        raise ValueError(f"unknown --task {task!r}: a head ({', '.join(HEADS)}) or a task ({', '.join(TASKS)})")
    return TASKS[task]


def head_of(task: str) -> str:
    """The model head ``--task`` means: itself for a head name, the named task's head otherwise."""
    named = named_task(task)
    return task if named is None else named.head


def apply_task(data):
    """``data`` (a ``DataArgs``) with the named task's format and columns filled in where left unset;
    unchanged for a head name. Columns set explicitly win (a copy of the task in other columns)."""
    named = named_task(data.task)
    if named is None or named.head != "classification":
        return data
    return dataclasses.replace(
        data, data_format="classification" if data.data_format == "auto" else data.data_format,
        text_columns=data.text_columns or list(named.text_columns), label_column=data.label_column or named.label_column)


def task_score(task: Task, metrics: dict) -> Optional[float]:
    """The task's official score from an evaluation's ``metrics`` (MRPC: the mean of F1 and accuracy,
    as GLUE's leaderboard averages them); None when the metrics lack it."""
    keys = task.metric.split("+")
    if not all(k in metrics for k in keys):
        return None
    return sum(metrics[k] for k in keys) / len(keys)
