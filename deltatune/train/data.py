"""Training data as token ids with loss masks: tokenize the records of a file, hold out validation, batch.

``load_dataset`` reads a file (``deltatune.train.formats``), renders chats with the tokenizer's
template (``deltatune.train.chat``) and tokenizes: instruction and chat data train on the assistant
turns only, plain text on every token (cut into ``max_length`` blocks), classification data on one
label per row. ``sample_index`` gives the data order as a pure function of (seed, position), which
is what makes resuming exact.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from deltatune.train.chat import render_chat
from deltatune.train.formats import BadRow, DataError, check_bad_rows, read_records
from deltatune.train.packing import pack

__all__ = ["IGNORE", "Dataset", "load_dataset", "tokenize_chat", "split_validation", "sample_index", "collate",
           "batches"]

IGNORE = -100  # label of tokens that carry no loss (prompt, padding); PyTorch's cross_entropy default


@dataclass
class Dataset:
    """Tokenized examples plus what is needed to batch them and to report on them."""

    examples: list[dict]
    """Each: ``input_ids`` and ``labels`` (token-level, -100 masked) or ``label`` (an int class)."""
    task: str
    """"causal-lm" or "classification"."""
    path: str = ""
    fmt: str = ""
    bad: list[BadRow] = field(default_factory=list)
    total_rows: int = 0
    truncated: int = 0
    """Examples kept but cut at ``max_length`` (each counted once)."""
    dropped: int = 0
    """Rows dropped because no target token was left within ``max_length``."""
    label_names: list[str] | None = None

    def __len__(self):
        return len(self.examples)

    @property
    def packed(self) -> bool:
        """Whether the examples are packed rows (``packing.pack``: several examples a row, with positions)."""
        return bool(self.examples) and "position_ids" in self.examples[0]

    def num_target_tokens(self) -> int:
        """Tokens that carry loss (causal LM) or examples (classification)."""
        if self.task == "classification":
            return len(self.examples)
        return sum(sum(1 for t in ex["labels"] if t != IGNORE) for ex in self.examples)

    def summary(self) -> str:
        """One line saying what was read, and what was skipped and why."""
        s = f"{self.path}: {self.fmt}, {self.total_rows} rows -> {len(self.examples)} examples"
        if self.truncated:
            s += f" ({self.truncated} of them cut at --max-length)"
        if self.bad:
            s += f"; {len(self.bad)} bad rows skipped"
        if self.dropped:
            s += f"; {self.dropped} rows dropped: no target token left within --max-length"
        return s



# -- tokenizing -------------------------------------------------------------------------------------------
def tokenize_chat(tokenizer, messages, tools=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are -100 outside assistant turns."""
    ids, labels = [], []
    for text, trained in render_chat(tokenizer, messages, tools):
        # Pieces are tokenized apart, as at inference where the prompt is encoded alone.
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids, labels = [bos] + ids, [IGNORE] + labels
    return ids, labels


def load_dataset(path: str | Path, tokenizer, fmt: str = "auto", max_length: int = 1024, packing: bool = False,
                 max_bad_fraction: float = 0.05, text_columns: list[str] | None = None,
                 label_column: str | None = None, label_names: list[str] | None = None,
                 max_classes: int = 100, unknown_labels: str = "skip", log=print) -> Dataset:
    """Read ``path`` and tokenize it for training.

    Args:
        path: data file; fmt: "auto", "alpaca", "chat", "text" or "classification".
        max_length: longer examples are truncated (plain text is cut into blocks of this length).
        packing: place instruction/chat examples into rows of up to ``max_length`` tokens, each
            example attending only to itself (``deltatune.train.packing``).
        max_bad_fraction: raise DataError if more than this fraction of rows is bad.
        label_names: class names in id order (for a validation file, the training file's).
        max_classes: without ``label_names``, refuse a label column with more distinct values than
            this or about one per row (``formats.check_label_count``; 0: no check).
        unknown_labels: a label not in ``label_names``: "skip" the row (a bad row) or "error" (raise
            ``DataError`` naming the labels: evaluating data of other labels than the model learned).
    Returns a ``Dataset``; bad rows are reported through ``log``.
    """
    records, bad, total, fmt = read_records(path, fmt, text_columns, label_column,
                                            max_classes=max_classes if label_names is None else 0)
    ds = Dataset([], "classification" if fmt == "classification" else "causal-lm", str(path), fmt, bad, total)
    if fmt == "classification":
        if label_names is None:
            found = {r.label for r in records}
            numeric = all(s.lstrip("-").isdigit() for s in found)
            label_names = sorted(found, key=int) if numeric else sorted(found)
        index = {n: i for i, n in enumerate(label_names)}
        unknown = sorted({r.label for r in records} - set(index))
        if unknown and unknown_labels == "error":
            raise DataError(f"{path}: labels {unknown[:10]} are not among the labels the model was trained on "
                            f"({list(label_names)})")
        for r in records:
            if r.label not in index:
                bad.append(BadRow(r.line, r.index, f"unknown label {r.label!r} (known: {label_names})"))
                continue
            texts = r.text if isinstance(r.text, list) else [r.text]
            if len(texts) > 2:  # tokenizers encode one text or a pair: join the rest into the second
                texts = [texts[0], " ".join(texts[1:])]
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
            ex = {k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
            ex["label"] = index[r.label]
            ds.examples.append(ex)
        bad.sort(key=lambda b: b.line)
        ds.label_names = list(label_names)
    elif fmt == "text":
        eos = getattr(tokenizer, "eos_token_id", None)
        stream = []
        for r in records:
            stream += tokenizer(r.text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        for start in range(0, len(stream) - 1, max_length):
            chunk = stream[start:start + max_length]
            if len(chunk) > 1:
                ds.examples.append({"input_ids": chunk, "labels": list(chunk)})
    else:
        for r in records:
            try:
                ids, labels = tokenize_chat(tokenizer, r.messages, r.tools)
            except Exception as e:  # a template that rejects this conversation (e.g. role order)
                if isinstance(e, DataError):
                    raise DataError(f"{path}: line {r.line}: {e}") from None
                bad.append(BadRow(r.line, r.index, f"chat template failed: {e}"))
                continue
            cut = len(ids) > max_length
            if cut:
                ids, labels = ids[:max_length], labels[:max_length]
            if not any(t != IGNORE for t in labels[1:]):
                ds.dropped += 1
                continue
            ds.truncated += cut  # counted among the examples kept; the dropped ones are counted apart
            ds.examples.append({"input_ids": ids, "labels": labels})
        if packing:
            ds.examples = pack(ds.examples, max_length)
        bad.sort(key=lambda b: b.line)
    report = check_bad_rows(path, bad, total, max_bad_fraction)
    if report:
        log(report)
    if not ds.examples:
        raise DataError(f"{path}: no usable example ({len(bad)} bad rows, {ds.dropped} without target tokens)")
    return ds


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out ``fraction`` of ``ds`` (a seeded random choice) as a validation set."""
    n_val = max(1, int(round(len(ds) * fraction)))
    if n_val >= len(ds):
        raise DataError(f"{ds.path}: {len(ds)} examples are too few to hold out {fraction:.0%} for validation")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])

    def subset(idx):
        return Dataset([ds.examples[i] for i in idx], ds.task, ds.path, ds.fmt, label_names=ds.label_names)

    train = subset(train_idx)
    train.bad, train.total_rows = ds.bad, ds.total_rows
    return train, subset(val_idx)


# -- batching -------------------------------------------------------------------------------------------
def sample_index(k: int, n: int, seed: int) -> int:
    """The dataset index of the ``k``-th sample drawn in training (0-based, over all epochs).

    Epoch ``k // n`` is a permutation seeded by (seed, epoch), so the data order is a pure function
    of the seed and the position: resuming at any step needs only the step number.
    """
    epoch, offset = divmod(k, n)
    return _permutation(n, seed, epoch)[offset]


_PERM_CACHE: dict = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=g).tolist()
    return _PERM_CACHE[key]


def collate(examples: list[dict], pad_id: int, task: str, width: int | None = None, rows: int | None = None,
            segments: Callable[[int], int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into a batch: input_ids, attention_mask, and labels (token or class).

    Packed rows (``deltatune.train.packing``) also give ``position_ids``; the padding after a row's
    examples is one more segment (positions from 0), which no real token attends to.

    Static shapes (for CUDA graphs, which replay only the shapes they captured): ``width`` pads every
    row to that many tokens (at least the longest), ``rows`` adds empty rows (all padding, no targets)
    up to that many, and for packed rows ``segments(n)`` gives how many segments the boundaries list
    (at least n; the extra ones are empty, at the end of the stream) while ``max_length_q`` is the width.
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    if width is not None and width < longest:
        raise ValueError(f"collate: a row of {longest} tokens does not fit the static width {width}")
    width = width or longest
    n_rows = max(rows or 0, len(examples))
    batch = {"input_ids": torch.full((n_rows, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((n_rows, width), dtype=torch.long)}
    if "position_ids" in examples[0]:
        batch["position_ids"] = torch.arange(width).repeat(n_rows, 1)
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.zeros((n_rows, width), dtype=torch.long)
    if task == "classification":
        if n_rows != len(examples):
            raise ValueError("collate: empty rows (rows=) are for token tasks; a classification row has a label")
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    # each field as one tensor of all its real tokens, put where the mask is true (row-major, as the
    # examples follow each other): a few tensor ops a batch instead of a few per example (collating is
    # host work on every step's path: about 1 ms for 32 short examples, one by one)
    k = len(examples)
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples], dtype=torch.long)
    real = torch.arange(width) < lengths[:, None]  # (k, width)
    batch["attention_mask"][:k] = real
    batch["input_ids"][:k][real] = _joined(examples, "input_ids")
    if "position_ids" in batch:  # the padding after a row's examples counts from 0 again
        batch["position_ids"][:k] -= lengths[:, None] * ~real
        batch["position_ids"][:k][real] = _joined(examples, "position_ids")
    if "token_type_ids" in batch:
        batch["token_type_ids"][:k][real] = _joined(examples, "token_type_ids")
    if task != "classification":
        batch["labels"][:k][real] = _joined(examples, "labels")
    if "position_ids" in batch:
        batch.update(_boundaries(batch["position_ids"], segments, static_width=width if segments else None))
    return batch


def _joined(examples: list[dict], key: str) -> torch.Tensor:
    """The ``key`` lists of ``examples`` one after another, as one int64 tensor."""
    return torch.tensor(list(itertools.chain.from_iterable(ex[key] for ex in examples)), dtype=torch.long)


def _boundaries(position_ids: torch.Tensor, segments: Callable[[int], int] | None = None,
                static_width: int | None = None) -> dict:
    """Where a packed batch's examples start and end in its flattened token stream, as transformers'
    flattening collators give it (``cu_seq_lens_q/k``: int32 (segments + 1,); ``max_length_q/k``): what
    variable-length attention kernels take. Computed here, on the host, so no step waits for the GPU.

    ``segments(n)`` pads the list to that many segments with empty ones at the end (the total repeated)
    and ``static_width`` stands for the longest segment: the same shapes and numbers every step, while
    each real segment still attends only to itself."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    if segments is not None:
        n = len(cu) - 1
        total = segments(n)
        if total < n:
            raise ValueError(f"segments({n}) = {total}: fewer segments than the batch has")
        cu = torch.cat([cu, cu[-1:].expand(total - n)])
        longest = static_width or longest
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def batches(ds: Dataset, batch_size: int, pad_id: int):
    """Consecutive batches of ``ds`` in file order (evaluation)."""
    for start in range(0, len(ds), batch_size):
        yield collate(ds.examples[start:start + batch_size], pad_id, ds.task)
