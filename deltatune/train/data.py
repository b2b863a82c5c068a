"""Training data: read records, render them into token ids with loss masks, batch them.

Formats (``fmt="auto"`` picks by extension and by the first record's keys):

- ``alpaca``: JSON array or JSONL of ``{"instruction", "input", "output"}`` (also ``prompt``/``completion``
  and ``question``/``answer``). The prompt is rendered as one user turn with the tokenizer's chat
  template; the loss covers the response only.
- ``chat``: ShareGPT ``{"conversations": [{"from", "value"}]}`` or OpenAI ``{"messages": [{"role",
  "content"}]}``, rendered with the chat template; the loss covers assistant turns only
  (ShareGPT ``function_call`` turns count as assistant turns, ``observation`` as tool turns).
- ``text``: a ``.txt`` file (one document) or JSONL with a ``text`` field; every token is a target.
- ``classification``: TSV/CSV with a header, text column(s) and a label column; one label per row.

Bad rows (invalid JSON, missing fields, empty text, unknown roles, unknown labels) are counted and
reported by line number; ``load_dataset`` raises ``DataError`` when more than ``max_bad_fraction``
of the rows are bad.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DataError", "BadRow", "Dataset", "load_dataset", "read_records", "detect_format", "collate",
           "sample_index", "CHATML_TEMPLATE"]

IGNORE = -100  # label of tokens that carry no loss (prompt, padding); PyTorch's cross_entropy default

# Used when a tokenizer has no chat template of its own (tiny test tokenizers, BERT-style vocabularies).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
ALPACA_KEYS = (("instruction", "input", "output"), ("prompt", None, "completion"), ("question", None, "answer"))
TEXT_COLUMNS = ("sentence", "sentence1", "sentence2", "text", "text_a", "text_b", "question", "premise",
                "hypothesis", "#1 String", "#2 String")
LABEL_COLUMNS = ("label", "labels", "Quality", "gold_label")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the offending lines."""


@dataclass
class BadRow:
    """One unusable row: its 1-based line in the file, its 0-based record index, and why."""

    line: int
    index: int
    reason: str

    def __str__(self):
        return f"line {self.line} (record {self.index}): {self.reason}"


@dataclass
class Record:
    """A parsed row: ``kind`` is "chat", "text" or "classification"; ``line`` is 1-based."""

    kind: str
    line: int
    index: int
    messages: list[dict] | None = None
    tools: object = None
    text: str | list[str] | None = None
    label: str | None = None


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
    dropped: int = 0
    label_names: list[str] | None = None

    def __len__(self):
        return len(self.examples)

    def num_target_tokens(self) -> int:
        """Tokens that carry loss (causal LM) or examples (classification)."""
        if self.task == "classification":
            return len(self.examples)
        return sum(sum(1 for t in ex["labels"] if t != IGNORE) for ex in self.examples)

    def summary(self) -> str:
        """One line saying what was read, and what was skipped and why."""
        s = f"{self.path}: {self.fmt}, {self.total_rows} rows -> {len(self.examples)} examples"
        if self.bad:
            s += f", {len(self.bad)} bad rows skipped"
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.dropped:
            s += f", {self.dropped} dropped (no target token left after truncation)"
        return s


# -- reading ---------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """The format of ``path``: "alpaca", "chat", "text" or "classification"."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return "classification"
    if suffix in (".txt", ".md"):
        return "text"
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{p}: cannot tell the format from the extension {suffix!r}; pass --data-format")
    for _, _, obj in _json_objects(p):
        if not isinstance(obj, dict):
            continue
        if "conversations" in obj or "messages" in obj:
            return "chat"
        if any(k[0] in obj and k[2] in obj for k in ALPACA_KEYS):
            return "alpaca"
        if "text" in obj:
            return "text"
        raise DataError(f"{p}: records have keys {sorted(obj)}; expected conversations/messages (chat), "
                        f"instruction/output (alpaca) or text")
    raise DataError(f"{p}: no JSON object found")


def _json_objects(path: Path):
    """Yield (line, index, object or JSONDecodeError) for a JSON array file or a JSONL file."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Walk the array with raw_decode so every record keeps its line number.
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        index = 0
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                                f"a JSON array cannot be read past a syntax error (JSONL can)") from None
            yield line, index, obj
            index += 1
    index = 0
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            obj = e
        yield line, index, obj
        index += 1


def _chat_record(obj: dict, line: int, index: int) -> Record | str:
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        return "no conversations/messages list"
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {i} is not an object"
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES:
            return f"turn {i} has unknown role {role!r}"
        if not isinstance(content, str) or not content.strip():
            return f"turn {i} ({role}) has empty or missing text"
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    system = obj.get("system")  # some ShareGPT files keep the system prompt beside the turns
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    tools = obj.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            return "tools field is not valid JSON"
    return Record("chat", line, index, messages=messages, tools=tools or None)


def _alpaca_record(obj: dict, line: int, index: int) -> Record | str:
    for ikey, xkey, okey in ALPACA_KEYS:
        if ikey in obj or okey in obj:
            break
    instruction, extra, output = obj.get(ikey), obj.get(xkey) if xkey else None, obj.get(okey)
    if not isinstance(instruction, str) or not instruction.strip():
        return f"missing or empty {ikey!r}"
    if not isinstance(output, str) or not output.strip():
        return f"missing or empty {okey!r}"
    if extra is not None and not isinstance(extra, str):
        return f"{xkey!r} is not a string"
    prompt = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return Record("chat", line, index, messages=[{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": output}])


def _text_record(obj: dict, line: int, index: int) -> Record | str:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return "missing or empty 'text'"
    return Record("text", line, index, text=text)


def _table_records(path: Path, text_columns: list[str] | None, label_column: str | None, bad: list):
    """Rows of a TSV/CSV file. Columns given as integers mean the file has no header (CoLA)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # GLUE TSVs contain bare quote characters inside sentences: no quoting for TSV.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    headerless = label_column is not None and label_column.isdigit()
    if headerless:
        header, first_line = None, 1
        label_idx = int(label_column)
        text_idx = [int(c) for c in (text_columns or [])]
        if not text_idx:
            raise DataError(f"{path}: with a numeric --label-column, give --text-columns as numbers too")
    else:
        if not rows:
            raise DataError(f"{path}: empty file")
        header, rows, first_line = rows[0], rows[1:], 2
        label_column = label_column or next((c for c in LABEL_COLUMNS if c in header), None)
        if label_column not in header:
            raise DataError(f"{path}: no label column {label_column!r} in header {header}; pass --label-column")
        label_idx = header.index(label_column)
        if text_columns:
            missing = [c for c in text_columns if c not in header]
            if missing:
                raise DataError(f"{path}: text columns {missing} not in header {header}")
            text_idx = [header.index(c) for c in text_columns]
        else:
            text_idx = [i for i, c in enumerate(header) if c in TEXT_COLUMNS]
            if not text_idx:
                raise DataError(f"{path}: no known text column in header {header}; pass --text-columns")
    width = len(header) if header else None
    records = []
    for index, row in enumerate(rows):
        line = first_line + index
        if width is not None and len(row) != width:
            bad.append(BadRow(line, index, f"{len(row)} fields, header has {width}"))
            continue
        if not row or max(text_idx + [label_idx]) >= len(row):
            bad.append(BadRow(line, index, f"{len(row)} fields, too few"))
            continue
        texts = [row[i].strip() for i in text_idx]
        if not all(texts):
            bad.append(BadRow(line, index, "empty text"))
            continue
        label = row[label_idx].strip()
        if not label:
            bad.append(BadRow(line, index, "empty label"))
            continue
        records.append(Record("classification", line, index, text=texts if len(texts) > 1 else texts[0],
                              label=label))
    return records, len(rows)


def read_records(path: str | Path, fmt: str = "auto", text_columns: list[str] | None = None,
                 label_column: str | None = None) -> tuple[list[Record], list[BadRow], int, str]:
    """Parse ``path``; returns (records, bad rows, total rows, format). Raises DataError on unreadable files."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    fmt = detect_format(p) if fmt == "auto" else fmt
    bad: list[BadRow] = []
    if fmt == "classification":
        records, total = _table_records(p, text_columns, label_column, bad)
        return records, bad, total, fmt
    if fmt == "text" and p.suffix.lower() not in (".json", ".jsonl"):
        text = p.read_text(encoding="utf-8-sig")
        if not text.strip():
            raise DataError(f"{p}: empty text file")
        return [Record("text", 1, 0, text=text)], bad, 1, fmt
    parse = {"alpaca": _alpaca_record, "chat": _chat_record, "text": _text_record}.get(fmt)
    if parse is None:
        raise DataError(f"unknown data format {fmt!r} (alpaca, chat, text, classification)")
    records, total = [], 0
    for line, index, obj in _json_objects(p):
        total += 1
        if isinstance(obj, json.JSONDecodeError):
            bad.append(BadRow(line, index, f"invalid JSON: {obj.msg} at column {obj.colno}"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadRow(line, index, f"not a JSON object but {type(obj).__name__}"))
            continue
        rec = parse(obj, line, index)
        (bad.append(BadRow(line, index, rec)) if isinstance(rec, str) else records.append(rec))
    return records, bad, total, fmt


def check_bad_rows(path, bad: list[BadRow], total: int, max_bad_fraction: float, show: int = 10) -> str | None:
    """A report of ``bad`` (None if empty); raises DataError when bad/total > ``max_bad_fraction``."""
    if not bad:
        return None
    lines = [f"{path}: {len(bad)} of {total} rows are bad and were skipped:"]
    lines += [f"  {b}" for b in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more (lines {', '.join(str(b.line) for b in bad[show:show + 20])}"
                     f"{' ...' if len(bad) > show + 20 else ''})")
    report = "\n".join(lines)
    if len(bad) > max_bad_fraction * max(total, 1):
        raise DataError(f"{report}\nthat is {len(bad) / max(total, 1):.1%} of the rows, more than the allowed "
                        f"{max_bad_fraction:.1%} (--max-bad-fraction); fix the file or raise the limit")
    return report


# -- rendering and tokenizing -----------------------------------------------------------------------
def _template(tokenizer) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[dict], tools=None) -> list[tuple[str, bool]]:
    """Split a conversation into (text, trained) pieces whose concatenation is the templated chat.

    Piece boundaries come from rendering growing prefixes of the conversation: the text an
    assistant turn adds after the generation prompt is trained, everything else is context. Each
    trained piece stops at the end-of-turn marker; the whitespace after it is context, so that a
    greedy answer which stops at the marker counts as exact.
    """
    template = _template(tokenizer)

    def render(msgs, gen):
        kwargs = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template, **kwargs)

    if tools and json.dumps(tools)[:40] not in render(messages[:1], False):
        # The template ignores tools: give them to the model in a system turn.
        note = "You can call these tools:\n" + json.dumps(tools, ensure_ascii=False)
        if messages[0]["role"] == "system":
            messages = [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}] + messages[1:]
        else:
            messages = [{"role": "system", "content": note}] + messages
        tools = None
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                            "responses cannot be masked")
        answer = full[len(prompt):]
        tail = answer[len(answer.rstrip()):]
        pieces.append((prompt[len(done):], False))
        pieces.append((answer[:len(answer) - len(tail)], True))
        done = full[:len(full) - len(tail)]
    rest = render(messages, False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces


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


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation's prompt for generation (ends with the assistant header)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=_template(tokenizer))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pack(examples: list[dict], block: int) -> list[dict]:
    """Concatenate examples and cut into blocks of ``block`` tokens (no padding; attention crosses documents)."""
    ids, labels, out = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= block:
            out.append({"input_ids": ids[:block], "labels": labels[:block]})
            ids, labels = ids[block:], labels[block:]
    if ids and any(t != IGNORE for t in labels):
        out.append({"input_ids": ids, "labels": labels})
    return out


def load_dataset(path: str | Path, tokenizer, fmt: str = "auto", max_length: int = 1024, packing: bool = False,
                 max_bad_fraction: float = 0.05, text_columns: list[str] | None = None,
                 label_column: str | None = None, label_names: list[str] | None = None,
                 log=print) -> Dataset:
    """Read ``path`` and tokenize it for training.

    Args:
        path: data file; fmt: "auto", "alpaca", "chat", "text" or "classification".
        max_length: longer examples are truncated (plain text is cut into blocks of this length).
        packing: concatenate instruction/chat examples into full ``max_length`` blocks.
        max_bad_fraction: raise DataError if more than this fraction of rows is bad.
        label_names: class names in id order (for a validation file, the training file's).
    Returns a ``Dataset``; bad rows are reported through ``log``.
    """
    records, bad, total, fmt = read_records(path, fmt, text_columns, label_column)
    ds = Dataset([], "classification" if fmt == "classification" else "causal-lm", str(path), fmt, bad, total)
    if fmt == "classification":
        if label_names is None:
            found = {r.label for r in records}
            numeric = all(s.lstrip("-").isdigit() for s in found)
            label_names = sorted(found, key=int) if numeric else sorted(found)
        index = {n: i for i, n in enumerate(label_names)}
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
            if len(ids) > max_length and not packing:
                ids, labels = ids[:max_length], labels[:max_length]
                ds.truncated += 1
            if not any(t != IGNORE for t in labels[1:]):
                ds.dropped += 1
                continue
            ds.examples.append({"input_ids": ids, "labels": labels})
        if packing:
            ds.examples = _pack(ds.examples, max_length)
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


def collate(examples: list[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` into a batch: input_ids, attention_mask, and labels (token or class)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
    if task == "classification":
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
        batch["attention_mask"][i, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :n] = torch.tensor(ex["token_type_ids"])
        if task != "classification":
            batch["labels"][i, :n] = torch.tensor(ex["labels"])
    return batch


def batches(ds: Dataset, batch_size: int, pad_id: int):
    """Consecutive batches of ``ds`` in file order (evaluation)."""
    for start in range(0, len(ds), batch_size):
        yield collate(ds.examples[start:start + batch_size], pad_id, ds.task)
