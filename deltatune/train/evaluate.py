"""Loss and evaluation: the summed loss of one batch (training and evaluation share it), the metrics of
a ``Dataset`` (loss, perplexity, exact match, accuracy), and ``evaluate_adapter``, which reads data
and loads the model as the adapter's training run did (``deltatune eval``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Collection, Optional

import torch
import torch.nn.functional as F

from deltatune.adapters import prepare_batch
from deltatune.train.args import DataArgs, resolve_device, resolve_max_length
from deltatune.train.data import IGNORE, Dataset, collate, load_dataset
from deltatune.train.packed_masks import host_packing
from deltatune.train.packing import segments
from deltatune.train.answers import answer_accuracy
from deltatune.train.metrics import classification_metrics
from deltatune.train.outputs import run_info
from deltatune.train.tasks import TASKS, apply_task, head_of, named_task, task_score

__all__ = ["batch_loss", "labels_count", "evaluate", "eval_data_args", "evaluate_adapter"]


def _model_inputs(batch: dict, device) -> dict:
    """The model's keyword inputs. Packed rows pass their ``position_ids`` and neither a padding mask nor
    a KV cache: only then does transformers read restarting positions as example boundaries and confine
    attention to each example (``deltatune.train.packing``)."""
    if "position_ids" not in batch:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
    inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
              if k not in ("labels", "attention_mask")}
    return {**inputs, "use_cache": False}


def batch_loss(model, batch: dict, task: str, device, autocast, fast: bool = False):
    """(summed loss, number of targets, logits or None) of one batch; causal LM predicts token t+1 from t.

    With ``fast`` (causal LM) the head and cross-entropy run fused (``deltatune.fast``) and no logits
    are returned.
    """
    # targets counted on the host copy: counting on the device would make the host wait for the GPU
    n = labels_count(batch["labels"], task)
    labels = batch["labels"].to(device, non_blocking=True)
    if fast and task == "causal-lm":
        from deltatune.fast import fused_causal_lm_loss

        inputs = _model_inputs(batch, device)
        # right padding under causal attention changes only padded positions, which carry no loss: without
        # the mask the fused attention runs (packed rows never pass one)
        inputs.pop("attention_mask", None)
        with autocast(), host_packing(batch.get("position_ids"), device):
            mean = fused_causal_lm_loss(model, labels=labels, **inputs)
        return mean.float() * n, n, None
    with autocast(), host_packing(batch.get("position_ids") if task != "classification" else None, device):
        logits = model(**_model_inputs(batch, device)).logits
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), n, logits
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, n, logits


def labels_count(labels: torch.Tensor, task: str) -> int:
    """The targets in a batch's ``labels``: one per row for classification, else the non-ignored labels
    after the first position (position t predicts token t+1)."""
    if task == "classification":
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate(model, ds: Dataset, batch_size: int = 8, device=None, autocast=None,
             progress: bool = False) -> dict[str, float]:
    """Loss and, by task, perplexity and exact match (instruction data), or accuracy, macro-F1, Matthews
    correlation and (two classes) the F1 of class 1 (classification; ``deltatune.train.metrics``).

    Exact match is greedy-decoding exact match computed in one teacher-forced pass: greedy decoding
    reproduces the target iff the argmax at every target position is the target token.
    """
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    total, count, exact, examples = 0.0, 0, 0, 0
    predicted, gold = [], []
    pad = 0
    starts = range(0, len(ds), batch_size)
    if progress:  # a pass over a large validation set takes long enough to look frozen without one
        from tqdm import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False, dynamic_ncols=True)
    for start in starts:
        batch = prepare_batch(model, collate(ds.examples[start:start + batch_size], pad, ds.task))
        loss, n, logits = batch_loss(model, batch, ds.task, device, autocast)
        total += float(loss)
        count += n
        if ds.task == "classification":
            predicted += logits.argmax(-1).cpu().tolist()
            gold += batch["labels"].tolist()
        else:
            labels = batch["labels"][:, 1:]
            pred = logits[:, :-1].argmax(-1).cpu()
            hit = (pred == labels) | (labels == IGNORE)  # (B, T-1): position t predicts token t+1
            # a prepared batch without position ids holds one example a row (virtual tokens split packed rows)
            rows = [ex.get("position_ids") for ex in ds.examples[start:start + batch_size]] \
                if "position_ids" in batch else [None] * hit.shape[0]
            for i, positions in enumerate(rows):  # a packed row holds several examples: each counts alone
                spans = segments(positions) if positions is not None else [(0, hit.shape[1] + 1)]
                exact += sum(int(hit[i, a:b - 1].all()) for a, b in spans)
                examples += len(spans)
    model.train(was_training)
    out = {"loss": total / max(count, 1)}
    if ds.task == "classification":
        out.update(classification_metrics(predicted, gold, max(len(ds.label_names or ()), max(gold + predicted) + 1)))
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        out["exact_match"] = exact / max(examples, 1)
    return out


# -- evaluating a trained adapter on a file ---------------------------------------------------------------------
RECORDED = ("data_format", "text_columns", "label_column", "task")
"""DataArgs fields that ``evaluate_adapter`` takes from the adapter's run when left at their defaults."""


def eval_data_args(data: DataArgs, info: dict, explicit: Collection[str] = ()) -> DataArgs:
    """``data`` with each field of ``RECORDED`` that is left at its default ("auto" / None) and not named
    in ``explicit`` taken from ``info`` (an adapter's ``deltatune_train.json``): the evaluation file is
    read as the run read its training data, whatever its extension (the format only for classification
    runs, whose columns it fixes). Explicit settings win."""
    defaults = DataArgs()
    # A causal LM reads alpaca, chat and text files alike: there the file's own shape decides its format.
    recorded = RECORDED if info.get("task") == "classification" else tuple(n for n in RECORDED if n != "data_format")
    changes = {name: info[name] for name in recorded
               if info.get(name) is not None and name not in explicit
               and getattr(data, name) == getattr(defaults, name)}
    if info.get("task_name") in TASKS and "task" not in explicit and data.task == defaults.task:
        changes["task"] = info["task_name"]  # the named task the run trained on (its columns and metric)
    return dataclasses.replace(data, **changes)


def evaluate_adapter(data: DataArgs, adapter: Optional[str] = None, model: Optional[str] = None,
                     batch_size: int = 8, device: str = "auto", explicit: Collection[str] = (),
                     progress: bool = False, log=None, max_new_tokens: int = 256, extra=None) -> dict[str, float]:
    """Evaluate base model ``model`` (default: the one ``adapter`` records), with ``adapter`` loaded if
    given, on ``data.data``; returns ``evaluate``'s metrics plus ``examples``. The adapter's files are
    checked before anything loads; ``log`` (default: silent) hears what was read and loaded, and
    ``progress`` shows a bar over the evaluation batches.

    The task, the data format and the columns come from ``data`` where set (or named in
    ``explicit``: e.g. a format given as "auto" on purpose), else from the adapter's
    ``deltatune_train.json``, else from the file. Raises ``ValueError`` (``DataError``,
    ``AdapterFileError``) or ``ModelLoadError`` on unusable input, naming it; labels the adapter was not
    trained on are such an error. A named task (``--task sst2``, or the one the run recorded) adds
    ``task`` and its official ``score``; GSM8K also generates answers (``max_new_tokens`` each) for its
    answer accuracy (``deltatune.train.answers``). ``extra`` (optional) is called as ``extra(model, tokenizer)``
    on the loaded model after the evaluation; its dict joins the result (``deltatune eval --retention``)."""
    import deltatune as dt
    from deltatune.formats.files import read_adapter_files
    from deltatune.hub import load_model, load_tokenizer

    log = log or (lambda message: None)
    if adapter:
        read_adapter_files(adapter)  # a missing or broken adapter is reported before a long model load
    info = run_info(adapter)
    model_path = model or info.get("base_model")
    if not model_path or not data.data:
        raise ValueError("evaluation needs --data and --model (or an --adapter that records its base model)")
    data = eval_data_args(data, info, explicit)
    named, data = named_task(data.task), apply_task(data)
    generate = named is not None and named.metric == "answer_accuracy"
    labels = info.get("label_names") or (list(named.label_names) if named and named.label_names else None)
    tok = load_tokenizer(model_path)
    data = resolve_max_length(data, tok)  # unset: the default for this tokenizer, as deltatune train reads it
    ds = load_dataset(data.data, tok, fmt=data.data_format, max_length=data.max_length,
                      packing=data.packing and not generate, text_columns=data.text_columns,
                      label_column=data.label_column, label_names=labels, max_bad_fraction=data.max_bad_fraction,
                      unknown_labels="error" if labels else "skip")
    task = ds.task if data.task == "auto" else head_of(data.task)
    if task != ds.task:
        raise ValueError(f"{data.data}: read as {ds.fmt} data ({ds.task}), but the task is {task}; "
                         f"pass --data-format to read it as the task needs")
    if data.max_examples:
        ds = Dataset(ds.examples[:data.max_examples], ds.task, ds.path, ds.fmt, label_names=ds.label_names)
    torch.manual_seed(0)
    log(ds.summary())
    log(f"loading {model_path} ...")
    net, _ = load_model(model_path, task=ds.task, label_names=ds.label_names, tokenizer=tok)
    if adapter:
        dt.load_adapter(net, adapter, name="default")
    net.to(resolve_device(device))
    result = evaluate(net, ds, batch_size, progress=progress)
    if generate:
        result.update(answer_accuracy(net, tok, ds, max_new_tokens, batch_size, progress=progress))
    if named is not None:
        result["task"], result["score"] = named.name, task_score(named, result)
    result["examples"] = len(ds)
    if extra is not None:
        result.update(extra(net, tok))
    return result
