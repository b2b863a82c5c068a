"""Pattern-verbalizer (PET) runs: classification files rendered through a template, a ``PatternModel``
trained by the one loop, zero-shot or adapter evaluation.

The model is a ``PatternModel`` (``deltatune.methods.pattern``) around the base LM (a masked LM for
encoder checkpoints, a causal LM otherwise): its ``logits`` are the verbalizer's class scores, so the
loop's classification path (cross-entropy over classes, accuracy) runs it unchanged. The data are
``Dataset``s of rendered examples whose labels index the verbalizer's labels, in its key order; a
label the verbalizer lacks is an error naming the file and line.

    deltatune train --method pattern --model M --data train.tsv --template "{text} It was {mask}." \\
        --verbalizer '{"0": ["terrible"], "1": ["great"]}' --soft-tokens 4 --output out
    deltatune eval --method pattern --model M --data dev.tsv --template ... --verbalizer ...   # zero-shot
    deltatune eval --adapter out/adapter --data dev.tsv
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Optional

import torch

from deltatune.methods.pattern import PatternConfig, PatternModel, Template, context_of
from deltatune.train.args import DEFAULT_MAX_LENGTH, DataArgs, TrainArgs, TrainError, resolve_device
from deltatune.train.data import Dataset, split_validation
from deltatune.train.formats import DataError, check_bad_rows, read_records

__all__ = ["is_pattern_adapter", "lm_task", "load_pattern_model", "pattern_dataset", "train_pattern", "evaluate_pattern"]

_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
             "camembert", "modernbert"}
"""Model types whose checkpoints are read as masked LMs."""


def lm_task(path: str) -> str:
    """"masked-lm" for an encoder checkpoint (a ``...ForMaskedLM`` architecture or an encoder model type),
    else "causal-lm" (GGUF files, decoders)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return "causal-lm"
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "causal-lm"  # the loader names the broken file
    archs = raw.get("architectures") or []
    if any(a.endswith("ForMaskedLM") for a in archs) or raw.get("model_type") in _ENCODERS:
        return "masked-lm"
    return "causal-lm"


def is_pattern_adapter(path: Optional[str]) -> bool:
    """Whether ``path`` is an adapter directory whose ``adapter_config.json`` names the pattern method."""
    from deltatune.formats.native import METHOD_KEY

    config = Path(path) / "adapter_config.json" if path else None
    if config is None or not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the adapter loader names the broken file
    return isinstance(raw, dict) and raw.get(METHOD_KEY) == PatternConfig.method


def load_pattern_model(path: str, cfg: PatternConfig, tokenizer=None, seed: int = 0) -> tuple[PatternModel, object]:
    """(``PatternModel`` over the LM at ``path``, tokenizer); ``seed`` draws the initial soft tokens.
    Raises ``ModelLoadError`` for a model that cannot load, ``ValueError`` for a pattern it cannot run."""
    from deltatune.hub import load_model, load_tokenizer

    tok = tokenizer or load_tokenizer(path)
    lm, _ = load_model(path, task=lm_task(path), tokenizer=tok)
    torch.manual_seed(seed)
    return PatternModel(lm, cfg, tok), tok


def pattern_dataset(path: str, model: PatternModel, data: DataArgs, log=print) -> Dataset:
    """The classification file ``path`` rendered through ``model``'s pattern: examples of ``input_ids``
    and ``label`` (the index of the row's label among the verbalizer's). Texts are cut to fit
    ``data.max_length`` and the model's context (counted as truncated). Raises ``DataError`` for data
    that is not classification or holds a label the verbalizer lacks, ``ValueError`` for a template
    that does not fit."""
    fmt = data.data_format if data.data_format not in (None, "auto") else "auto"
    records, bad, total, fmt = read_records(path, fmt, data.text_columns, data.label_column, max_classes=0)
    if fmt != "classification":
        raise DataError(f"{path}: read as {fmt} data; a pattern classifies TSV/CSV rows (text columns and a label)")
    pattern = model.pattern
    labels = pattern.label_names
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        where = next(r.line for r in records if r.label in unknown)
        raise DataError(f"{path}: labels {unknown} (first at line {where}) are not in the verbalizer, which has "
                        f"{labels}; add them to --verbalizer or fix the label column")
    columns = max((len(r.text) if isinstance(r.text, list) else 1) for r in records) if records else 1
    wanted = Template(pattern.cfg.template).texts
    if columns != wanted:
        raise DataError(f"{path}: rows have {columns} text column(s), the template {pattern.cfg.template!r} places "
                        f"{wanted} ({{text}}, {{text2}}); choose columns with --text-columns or change the template")
    length = data.max_length or DEFAULT_MAX_LENGTH  # unset: the default, then the model's context below
    limit = min(length, context_of(model.lm) or length)
    ds = Dataset([], "classification", str(path), fmt, bad, total, label_names=list(labels))
    for r in records:
        texts = r.text if isinstance(r.text, list) else [r.text]
        try:
            example, cut = pattern.encode(texts, limit)
        except ValueError as e:
            raise DataError(f"{path}: line {r.line}: {e}") from None
        example["label"] = index[r.label]
        ds.truncated += cut
        ds.examples.append(example)
    report = check_bad_rows(path, bad, total, data.max_bad_fraction)
    if report:
        log(report)
    if not ds.examples:
        raise DataError(f"{path}: no usable example ({len(bad)} bad rows)")
    return ds


def _subset(ds: Dataset, n: int, seed: int) -> Dataset:
    if 0 < n < len(ds):
        keep = sorted(random.Random(seed).sample(range(len(ds)), n))
        ds.examples = [ds.examples[i] for i in keep]
    return ds


def train_pattern(args: TrainArgs, data: DataArgs, cfg: PatternConfig, log=print):
    """``deltatune train --method pattern``: render the data through ``cfg``'s template, train a
    ``PatternModel`` with the one loop (``deltatune.train.train``), save the adapter (template,
    verbalizer, soft tokens, LoRA) in deltatune's format. Returns the ``TrainResult``.

    Trainable: the soft tokens, LoRA (``lora_r``) and any ``modules_to_save``; with none of them the
    pattern is zero-shot only and ``TrainError`` says so."""
    from deltatune.hub import ModelLoadError  # noqa: F401  (raised through to the caller)
    from deltatune.train.loop import train

    if not (cfg.num_soft or cfg.lora_r or cfg.modules_to_save):
        raise TrainError("--method pattern has nothing to train: set --soft-tokens, {soft} slots, --lora-r or "
                         "--modules-to-save (or evaluate it zero-shot with deltatune eval --method pattern)")
    if args.merge:
        raise TrainError("--merge: a pattern adapter has no merged form (its template and verbalizer are part "
                         "of every input); keep the adapter")
    if args.quant:
        raise TrainError("--quant is not supported with --method pattern")
    if not data.data:
        raise TrainError("no training data: set --data")
    try:
        model, tok = load_pattern_model(args.model, cfg, seed=args.seed)
    except DataError:
        raise
    except ValueError as e:  # the pattern does not fit the model or tokenizer (a word of several tokens, ...)
        raise TrainError(f"--method pattern: {e}") from None
    train_ds = _subset(pattern_dataset(data.data, model, data, log), data.max_examples, args.seed)
    val_ds = None
    if data.val_data:
        val_ds = pattern_dataset(data.val_data, model, data, log)
    elif data.val_fraction > 0:
        train_ds, val_ds = split_validation(train_ds, data.val_fraction, args.seed)
    log(train_ds.summary() + f"; template {cfg.template!r}")
    # the fused path fuses a causal LM's head and loss; a pattern reads the head at one slot
    args = dataclasses.replace(args, fast=False)
    return train(args, data, cfg, model=model, tokenizer=tok, train_data=train_ds, val_data=val_ds, log=log)


def evaluate_pattern(data: DataArgs, cfg: Optional[PatternConfig] = None, adapter: Optional[str] = None,
                     model: Optional[str] = None, batch_size: int = 8, device: str = "auto", progress: bool = False,
                     log=None, extra=None) -> dict:
    """Loss and accuracy of a pattern on ``data.data``: zero-shot from ``cfg`` (template, verbalizer), or
    the pattern adapter at ``adapter`` (its config and soft tokens, LoRA; base model from its run
    record unless ``model``). Returns ``evaluate``'s metrics plus ``examples``, and what ``extra(model,
    tokenizer)`` returns when given (called on the loaded ``PatternModel``: ``deltatune eval --retention``)."""
    import deltatune as dt
    from deltatune.formats.files import read_adapter_files
    from deltatune.train.evaluate import evaluate
    from deltatune.train.outputs import base_of

    log = log or (lambda message: None)
    if adapter:
        saved, _, _ = read_adapter_files(adapter)
        if not isinstance(saved, PatternConfig):
            raise ValueError(f"{adapter}: a {type(saved).method} adapter, not a pattern")
        if cfg is not None and (cfg.template, cfg.verbalizer) != (saved.template, saved.verbalizer):
            raise ValueError(f"{adapter}: trained with template {saved.template!r} and verbalizer "
                             f"{saved.verbalizer}; evaluate it with those (leave --template/--verbalizer out)")
        cfg = saved
        model = model or base_of(adapter)
    if cfg is None:
        raise ValueError("a pattern evaluation needs --template and --verbalizer, or an --adapter")
    if not model or not data.data:
        raise ValueError("evaluation needs --data and --model (or an --adapter that records its base model)")
    log(f"loading {model} ...")
    net, tok = load_pattern_model(model, cfg)
    ds = pattern_dataset(data.data, net, data, log)
    if data.max_examples:
        ds = Dataset(ds.examples[:data.max_examples], ds.task, ds.path, ds.fmt, label_names=ds.label_names)
    log(ds.summary() + f"; template {cfg.template!r}")
    if adapter:
        dt.load_adapter(net, adapter, name="default")
    net.to(resolve_device(device))
    result = evaluate(net, ds, batch_size, progress=progress)
    result["examples"] = len(ds)
    if extra is not None:
        result.update(extra(net, tok))
    return result
