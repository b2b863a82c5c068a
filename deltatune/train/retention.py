"""Forgetting: how far a fine-tuned model moved from its base on held-out general data (``--retention SUITE``).

A *suite* is a few small, fixed parts read from the shared data folder (``../shared/data``), each
measured on the tuned model and on its base and reported as the change against the base:

- ``shakespeare``: perplexity of the first K blocks of 128 tokens of the last 10% of Tiny Shakespeare
  (``tinyshakespeare/input.txt``; nanoGPT's validation split): plain general text.
- ``alpaca``: perplexity of the responses of the first K Stanford Alpaca records (``alpaca/alpaca_tiny.json``),
  rendered by the model's own chat template, loss on the response tokens only, cut at 128 tokens.
- ``chat``: perplexity of the assistant turns of the first K ShareGPT conversations
  (``chat/sharegpt_identity.json``), rendered and cut as ``alpaca``.
- ``sst2``: zero-shot accuracy on the first K SST-2 dev sentences (``sst2/dev.tsv``), asked as the cloze
  question ``Review: {text}\\nSentiment: {mask}`` with the words negative / positive (PET scoring,
  ``deltatune.methods.pattern``): a task the base model already does (79.5% for SmolLM2-135M-Instruct
  on all 872 rows, docs/results.md).

Suites (``SUITES``): ``general`` (all four), ``text`` (the three perplexities), ``sst2``. K is
``--retention-rows`` (default 8). The base's numbers come from the same model with its adapters
disabled (``deltatune.adapters.disabled``), so one model is in memory; a fully fine-tuned model has no
adapters, and its base is loaded apart (``--retention-base``, default: the base its run recorded).

    deltatune eval --adapter runs/a/adapter --retention general
    deltatune train ... --retention general --eval-every 50      # retention_<metric>[_change] in metrics.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from deltatune.adapters import adapter_modules, disabled
from deltatune.methods.pattern import PatternConfig, PatternModel, lm_kind
from deltatune.train.args import TrainError
from deltatune.train.data import Dataset, load_dataset
from deltatune.train.evaluate import evaluate
from deltatune.train.formats import read_records

__all__ = ["PARTS", "SUITES", "LENGTH", "ROWS", "Part", "Suite", "suite_parts", "find_data_dir", "check_suite",
           "language_model", "compare", "format_table", "report", "evaluate_retention", "Retention",
           "check_retention", "open_retention"]

LENGTH = 128
"""Tokens of each Shakespeare block, and the most tokens of an Alpaca record or a chat (longer ones are cut)."""
ROWS = 8
"""Default rows of each part (--retention-rows)."""
HELD_OUT = 0.9
"""Tiny Shakespeare's held-out part starts at this fraction of its characters (nanoGPT's split)."""
SST2_PATTERN = {"template": "Review: {text}\nSentiment: {mask}", "verbalizer": {"0": ["negative"], "1": ["positive"]}}
"""The SST-2 cloze question and its words (the best of four templates tried on SmolLM2, docs/results.md)."""
BASE_CACHE = "retention_base.json"
"""Where a training run keeps its base's numbers (in --output), so a resumed run measures the base once."""


@dataclass(frozen=True)
class Part:
    """One part of a suite: its ``name``, what it measures (``metric``: "perplexity" or "accuracy") and
    its ``file`` under the data folder."""

    name: str
    metric: str
    file: str

    @property
    def key(self) -> str:
        """The part's metric name in reports: ``<name>_<metric>``."""
        return f"{self.name}_{self.metric}"


PARTS = {p.name: p for p in (Part("shakespeare", "perplexity", "tinyshakespeare/input.txt"),
                             Part("alpaca", "perplexity", "alpaca/alpaca_tiny.json"),
                             Part("chat", "perplexity", "chat/sharegpt_identity.json"),
                             Part("sst2", "accuracy", "sst2/dev.tsv"))}
SUITES: dict[str, tuple[str, ...]] = {"general": ("shakespeare", "alpaca", "chat", "sst2"),
                                      "text": ("shakespeare", "alpaca", "chat"),
                                      "sst2": ("sst2",)}
"""The named suites: their parts, in report order."""


# -- the suite's data ---------------------------------------------------------------------------------------
def suite_parts(name: str) -> list[Part]:
    """The parts of suite ``name``; ``ValueError`` listing the suites for an unknown one."""
    if name not in SUITES:
        contents = "; ".join(f"{k}: {', '.join(v)}" for k, v in SUITES.items())
        raise ValueError(f"--retention {name!r}: unknown suite; choose one of {list(SUITES)} ({contents})")
    return [PARTS[p] for p in SUITES[name]]


def _default_dirs() -> list[Path]:
    checkout = Path(__file__).resolve().parents[2]  # deltatune/train/retention.py -> the repository checkout
    return [checkout.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def find_data_dir(given: Optional[str] = None) -> Path:
    """The data folder: ``given``, else ``shared/data`` beside the checkout, else ``../shared/data`` from
    the working directory. ``ValueError`` saying where it looked when there is none."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise ValueError(f"--retention-data {given}: no such directory")
        return path
    for path in _default_dirs():
        if path.is_dir():
            return path
    raise ValueError(f"--retention: no data folder found at {' or '.join(str(p) for p in _default_dirs())}; pass "
                     f"--retention-data DIR (the folder holding tinyshakespeare/, alpaca/, chat/ and sst2/)")


def check_suite(name: str, rows: int = ROWS, data_dir: Optional[str] = None) -> tuple[list[Part], Path]:
    """(parts, data folder) of suite ``name`` after checking it: a known suite, ``rows`` >= 1, and every
    part's file present. Raises ``ValueError`` naming what is wrong; nothing is read yet."""
    parts = suite_parts(name)
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"--retention-rows must be a positive integer, got {rows!r}")
    folder = find_data_dir(data_dir)
    for part in parts:
        if not (folder / part.file).is_file():
            raise ValueError(f"--retention {name}: part {part.name} needs {folder / part.file}, which does not "
                             f"exist; pass --retention-data DIR (a copy of ../shared/data)")
    return parts, folder


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside ``model`` (a ``PatternModel``'s ``lm``, else the model itself); ``ValueError``
    for a model that is not a causal LM (a classification head predicts no text)."""
    lm = model.lm if isinstance(model, PatternModel) else model
    try:
        kind = lm_kind(lm)
    except ValueError:
        kind = None
    if kind != "causal":
        raise ValueError(f"--retention measures a causal language model; {type(lm).__name__} is not one (a "
                         f"classification or masked-LM model predicts no next token)")
    return lm


def _first(ds: Dataset, rows: int) -> Dataset:
    return Dataset(ds.examples[:rows], ds.task, ds.path, ds.fmt, label_names=ds.label_names)


def _shakespeare(path: Path, tokenizer, rows: int) -> Dataset:
    """The first ``rows`` blocks of ``LENGTH`` tokens of the file's last 10%, every token a target."""
    text = path.read_text(encoding="utf-8")
    held_out = text[int(len(text) * HELD_OUT):]
    ids = tokenizer(held_out, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + LENGTH] for i in range(0, len(ids) - 1, LENGTH)][:rows]
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise ValueError(f"{path}: its held-out part (the last {1 - HELD_OUT:.0%}) holds no text")
    return Dataset([{"input_ids": b, "labels": list(b)} for b in blocks], "causal-lm", str(path), "text")


class Suite:
    """Suite ``name`` read for ``tokenizer`` from ``data_dir`` (``find_data_dir``'s default), ``rows`` rows a
    part. ``measure(model)`` gives ``{<part>_<metric>: value}``. Raises ``ValueError`` for an unknown
    suite, a missing file or data the tokenizer cannot take."""

    def __init__(self, name: str, tokenizer, data_dir: Optional[str] = None, rows: int = ROWS):
        self.parts, self.data_dir = check_suite(name, rows, data_dir)
        self.name, self.tokenizer, self.rows = name, tokenizer, rows
        self.sets: dict[str, Dataset] = {}
        quiet = lambda message: None  # noqa: E731  (bad rows of the shared files are not the user's)
        for part in self.parts:
            path = self.data_dir / part.file
            if part.name == "shakespeare":
                self.sets[part.name] = _shakespeare(path, tokenizer, rows)
            elif part.metric == "perplexity":  # instruction and chat data through the model's chat template
                ds = load_dataset(path, tokenizer, fmt="alpaca" if part.name == "alpaca" else "chat",
                                  max_length=LENGTH, packing=False, max_bad_fraction=1.0, log=quiet)
                self.sets[part.name] = _first(ds, rows)
        self._sst2: Optional[Dataset] = None  # rendered through the pattern at the first measure

    def describe(self) -> dict:
        """What the suite reads: its name, rows a part, data folder, and each part's examples and target tokens."""
        sizes = {p.name: {"examples": len(ds), "targets": ds.num_target_tokens()} for p, ds in
                 ((p, self.sets.get(p.name, self._sst2)) for p in self.parts) if ds is not None}
        return {"suite": self.name, "rows": self.rows, "data": str(self.data_dir), "parts": sizes}

    def _pattern(self, lm):
        """A ``PatternModel`` around ``lm`` asking the SST-2 question (in ``lm``'s train/eval mode)."""
        try:
            model = PatternModel(lm, PatternConfig(**SST2_PATTERN), self.tokenizer)
        except ValueError as e:
            raise ValueError(f"--retention {self.name}: the sst2 part cannot be asked with this tokenizer ({e}); "
                             f"use the suite 'text'") from None
        model.train(lm.training)  # a fresh module is in training mode; evaluate() restores this one's mode
        if self._sst2 is None:
            self._sst2 = self._sst2_rows(model.pattern)
        return model

    def _sst2_rows(self, pattern) -> Dataset:
        """The first ``rows`` SST-2 rows rendered through ``pattern``: ``input_ids`` and the class index."""
        path = self.data_dir / PARTS["sst2"].file
        records, _, _, fmt = read_records(path, "classification")
        classes = {name: i for i, name in enumerate(pattern.label_names)}
        picked = [r for r in records if r.label in classes][:self.rows]
        if not picked:
            raise ValueError(f"{path}: no row labelled {list(classes)}")
        examples = [{**pattern.encode(r.text if isinstance(r.text, list) else [r.text], LENGTH)[0],
                     "label": classes[r.label]} for r in picked]
        return Dataset(examples, "classification", str(path), fmt, label_names=list(classes))

    @torch.no_grad()
    def measure(self, model, batch_size: int = 8, device=None, autocast=None) -> dict[str, float]:
        """``{<part>_<metric>: value}`` of ``model`` (a causal LM, or a ``PatternModel`` around one) as it is
        now: adapters as they are, its train/eval mode kept."""
        lm = language_model(model)
        out = {}
        for part in self.parts:
            if part.metric == "perplexity":
                out[part.key] = evaluate(lm, self.sets[part.name], batch_size, device, autocast)["perplexity"]
            else:
                pattern = self._pattern(lm)
                out[part.key] = evaluate(pattern, self._sst2, batch_size, device, autocast)["accuracy"]
        return out


# -- tuned against base ---------------------------------------------------------------------------------------
def compare(base: dict[str, float], tuned: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{metric: {"base", "tuned", "change"}}`` (change = tuned - base), in ``tuned``'s order."""
    return {k: {"base": base[k], "tuned": v, "change": v - base[k]} for k, v in tuned.items()}


def format_table(result: dict) -> str:
    """``report``'s result as a text table: metric, base, tuned, change."""
    rows = [("metric", "base", "tuned", "change")]
    rows += [(k, f"{m['base']:.4f}", f"{m['tuned']:.4f}", f"{m['change']:+.4f}") for k, m in result["metrics"].items()]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"retention suite {result['suite']} ({result['rows']} rows a part, base: {result['base']})"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) for r in rows]
    return "\n".join(lines)


def _has_adapters(model) -> bool:
    return bool(list(adapter_modules(model)))


def _base_apart(suite: Suite, path: str, device, batch_size: int, log) -> dict[str, float]:
    """The suite measured on the model at ``path``, loaded alone and freed after."""
    from deltatune.hub import load_model

    log(f"loading the base {path} for --retention ...")
    base, _ = load_model(path, task="causal-lm", tokenizer=suite.tokenizer)
    base.to(device).eval()
    try:
        return suite.measure(base, batch_size, device)
    finally:
        del base


def report(suite: Suite, model, base: Optional[str] = None, batch_size: int = 8, device=None,
           log: Optional[Callable[[str], None]] = None) -> dict:
    """The suite on ``model`` against its base: ``{"suite", "rows", "base", "metrics": compare(...),
    "parts"}``. The base is ``model`` with its adapters disabled, or the model at ``base`` when given (a
    fully fine-tuned model, which has no adapters, needs it: ``ValueError`` otherwise)."""
    log = log or (lambda message: None)
    device = device or next(model.parameters()).device
    if base is not None:
        base_numbers, source = _base_apart(suite, base, device, batch_size, log), base
    elif _has_adapters(model):
        with disabled(model):
            base_numbers, source = suite.measure(model, batch_size, device), "adapters disabled"
    else:
        raise ValueError("--retention compares a model with its base: this model has no adapter to disable, so "
                         "give --retention-base PATH (the model it was fully fine-tuned from)")
    tuned = suite.measure(model, batch_size, device)
    return {"suite": suite.name, "rows": suite.rows, "base": source, "metrics": compare(base_numbers, tuned),
            **{k: v for k, v in suite.describe().items() if k == "parts"}}


def evaluate_retention(suite: str, adapter: Optional[str] = None, model: Optional[str] = None,
                       base: Optional[str] = None, rows: int = ROWS, data_dir: Optional[str] = None,
                       batch_size: int = 8, device: str = "auto", log=None) -> dict:
    """``deltatune eval --retention SUITE`` without ``--data``: load ``model`` (default: the base
    ``adapter`` records) with ``adapter`` (a pattern adapter onto its ``PatternModel``) and ``report``.
    Without an adapter, ``base`` defaults to the base a fully fine-tuned model's ``deltatune_train.json``
    names. Raises ``ValueError`` / ``ModelLoadError`` on unusable input."""
    import deltatune as dt
    from deltatune.formats.files import read_adapter_files
    from deltatune.hub import load_model, load_tokenizer
    from deltatune.train.args import resolve_device
    from deltatune.train.outputs import base_of

    log = log or (lambda message: None)
    check_suite(suite, rows, data_dir)  # before any model loads
    saved = read_adapter_files(adapter)[0] if adapter else None
    path = model or base_of(adapter)
    if not path:
        raise ValueError("--retention needs --model (or an --adapter that records its base model)")
    if not adapter and base is None:
        base = base_of(path)
    tok = load_tokenizer(path)
    measured = Suite(suite, tok, data_dir, rows)
    log(f"loading {path} ...")
    net, _ = load_model(path, task="causal-lm", tokenizer=tok)
    if isinstance(saved, PatternConfig):  # a pattern adapter (soft tokens, LoRA) goes on the LM in its PatternModel
        net = PatternModel(net, saved, tok)
    if adapter:
        dt.load_adapter(net, adapter, name="default")
    net.to(resolve_device(device)).eval()
    return report(measured, net, base, batch_size, log=log)


# -- during training ---------------------------------------------------------------------------------------------
class Retention:
    """``deltatune train --retention``: the suite and its base's numbers, measured once per run (cached in
    ``<output>/retention_base.json``); ``record(model, step)`` is a metrics-log record of the model now."""

    def __init__(self, suite: Suite, base: dict[str, float], batch_size: int, autocast=None):
        self.suite, self.base, self.batch_size, self.autocast = suite, base, batch_size, autocast

    def record(self, model, step: int) -> dict:
        """``{"step", "retention_<metric>": tuned, "retention_<metric>_change": tuned - base, ...}``."""
        tuned = self.suite.measure(model, self.batch_size, autocast=self.autocast)
        out = {"step": step}
        for k, m in compare(self.base, tuned).items():
            out[f"retention_{k}"], out[f"retention_{k}_change"] = m["tuned"], m["change"]
        return out

    def line(self, record: dict) -> str:
        """A log line of ``record``: each metric with its change."""
        keys = [k for k in record if k.startswith("retention_") and not k.endswith("_change")]
        return f"step {record['step']}: retention ({self.suite.name}) " + ", ".join(
            f"{k[len('retention_'):]} {record[k]:.4g} ({record[k + '_change']:+.3g})" for k in keys)


def check_retention(args) -> None:
    """Before a training run loads anything: ``TrainError`` for an unknown ``args.retention`` suite, bad
    ``retention_rows`` or a missing data file."""
    try:
        check_suite(args.retention, args.retention_rows, args.retention_data)
    except ValueError as e:
        raise TrainError(str(e)) from None


def open_retention(run, log=print) -> Optional[Retention]:
    """The ``Retention`` of a prepared training run (``deltatune.train.loop.Run``), None without
    ``--retention``. The base's numbers: from ``<output>/retention_base.json`` when it matches the
    suite, rows, data and model; else measured now with the adapters disabled, or, for --method full,
    on the model as it is before its first step (a resumed full run loads ``args.model`` apart).
    Raises ``TrainError`` for what it cannot measure (no tokenizer, several processes, not a causal LM)."""
    args = run.args
    if not getattr(args, "retention", None):
        return None
    if run.tokenizer is None:
        raise TrainError("--retention needs the model's tokenizer (pass tokenizer= to train())")
    world = getattr(run, "world", None)
    if world is not None and getattr(world, "size", 1) > 1:
        raise TrainError("--retention measures on one process; run it without torchrun, or evaluate the saved "
                         "adapter with deltatune eval --retention")
    try:
        suite = Suite(args.retention, run.tokenizer, args.retention_data, args.retention_rows)
        language_model(run.model)
    except ValueError as e:
        raise TrainError(str(e)) from None
    key = {"suite": suite.name, "rows": suite.rows, "data": str(suite.data_dir.resolve()), "model": args.model,
           "length": LENGTH}
    cache = Path(run.out) / BASE_CACHE
    base = None
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}
        if saved.get("key") == key:
            base = saved.get("metrics")
    autocast, batch = run.autocast, args.micro_batch
    if base is None:
        if _has_adapters(run.model):
            with disabled(run.model):
                base = suite.measure(run.model, batch, run.device, autocast)
        elif run.start == 0:  # full fine-tuning before its first step: the model is its base
            base = suite.measure(run.model, batch, run.device, autocast)
        else:
            base = _base_apart(suite, args.model, run.device, batch, log)
        from deltatune.train.outputs import write_json

        write_json(cache, {"key": key, "metrics": base, **suite.describe()})
    log(f"retention ({suite.name}, {suite.rows} rows a part) of the base: "
        + ", ".join(f"{k} {v:.4g}" for k, v in base.items()))
    return Retention(suite, base, batch, autocast)
