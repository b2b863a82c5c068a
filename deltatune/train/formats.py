"""Reading training data files into records, format by format, with bad rows counted by line.

Formats (``fmt="auto"`` picks by extension and by the first record's keys):

- ``alpaca``: JSON array or JSONL of ``{"instruction", "input", "output"}`` (also ``prompt``/``completion``
  and ``question``/``answer``): one user turn and one assistant turn.
- ``chat``: ShareGPT ``{"conversations": [{"from", "value"}]}`` or OpenAI ``{"messages": [{"role",
  "content"}]}`` (ShareGPT ``function_call`` turns count as assistant turns, ``observation`` as tool turns).
- ``text``: a ``.txt`` file (one document) or JSONL with a ``text`` field.
- ``classification``: a table with a header (TSV, CSV, or either under another extension), text
  column(s) and a label column; one label per row.

Bad rows (invalid JSON, missing fields, empty text, unknown roles, wrong field counts) are collected
as ``BadRow``s with their line number; ``check_bad_rows`` raises ``DataError`` when more than
``max_bad_fraction`` of the rows are bad.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "BadRow", "Record", "FORMATS", "detect_format", "read_records", "check_bad_rows",
           "check_label_count"]

FORMATS = ("alpaca", "chat", "text", "classification")
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


def _delimiter(path: Path) -> str:
    """Tab for ``.tsv``, comma for ``.csv``; under any other name (a GLUE TSV saved as ``.txt``) a tab if
    the first line has one, else a comma."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return "\t" if suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    return "\t" if "\t" in first else ","


def _table_records(path: Path, text_columns: list[str] | None, label_column: str | None, bad: list,
                   max_classes: int = 0):
    """Rows of a TSV/CSV file. Columns given as integers mean the file has no header (CoLA); a first line
    that looks like data without them is refused with the column numbers to give."""
    delimiter = _delimiter(path)
    # GLUE TSVs contain bare quote characters inside sentences: no quoting for TSV.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter, quoting=quoting))
    headerless = label_column is not None and label_column.isdigit()
    if headerless:
        header, first_line = None, 1
        label_idx = int(label_column)
        if not text_columns or not all(str(c).isdigit() for c in text_columns):
            raise DataError(f"{path}: with a numeric --label-column, give --text-columns as numbers too "
                            f"(a file without a header has no names), e.g. --text-columns '[3]'")
        text_idx = [int(c) for c in text_columns]
    else:
        if not rows:
            raise DataError(f"{path}: empty file")
        header, rows, first_line = rows[0], rows[1:], 2
        if label_column is None:
            label_column = next((c for c in LABEL_COLUMNS if c in header), None)
            if label_column is None:
                _refuse_headerless(path, header, rows)
                raise DataError(f"{path}: no label column found: the header {header} has none of "
                                f"{list(LABEL_COLUMNS)}; name it with --label-column NAME")
        if label_column not in header:
            _refuse_headerless(path, header, rows)
            raise DataError(f"{path}: no column {label_column!r} (--label-column) in the header {header}")
        label_idx = header.index(label_column)
        if text_columns:
            missing = [c for c in text_columns if c not in header]
            if missing:
                raise DataError(f"{path}: text columns {missing} (--text-columns) not in the header {header}")
            text_idx = [header.index(c) for c in text_columns]
        else:
            text_idx = [i for i, c in enumerate(header) if c in TEXT_COLUMNS]
            if not text_idx:
                raise DataError(f"{path}: no known text column in the header {header} (looked for "
                                f"{list(TEXT_COLUMNS)}); name them with --text-columns '[NAME, ...]'")
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
    column = repr(label_column) if header else f"{label_idx} (0-based)"
    check_label_count(path, column, [r.label for r in records], max_classes)
    return records, len(rows)


def check_label_count(path, column: str, labels: list[str], max_classes: int) -> None:
    """Raise ``DataError`` when label ``column`` of ``path`` has more than ``max_classes`` distinct values,
    or about one per row (more than half as many as rows, with 10 rows or more): a text column named as
    the label column would otherwise train a classifier with one class per sentence. 0 turns it off."""
    distinct = sorted(set(labels))
    if max_classes <= 0 or not labels:
        return
    many = len(distinct) > max_classes
    one_per_row = len(labels) >= 10 and len(distinct) > len(labels) / 2
    if many or one_per_row:
        sample = ", ".join(repr(v[:40]) for v in distinct[:3])
        why = ("nearly one class per row: that looks like a text column, not labels" if one_per_row
               else f"more than --max-classes {max_classes}")
        raise DataError(f"{path}: label column {column} has {len(distinct)} distinct values in {len(labels)} rows "
                        f"({sample}, ...), {why}; name the label column with --label-column, or set "
                        f"--max-classes (0 turns this check off) for a task with that many classes")


def _looks_like_data(header: list[str]) -> bool:
    """Whether a first line reads as a row of data rather than column names: an empty or numeric
    cell, or a cell that is a sentence (GLUE's CoLA files have no header)."""
    def numeric(cell: str) -> bool:
        return cell.strip().lstrip("-").replace(".", "", 1).isdigit()

    return any(not c.strip() or numeric(c) or len(c.split()) > 4 for c in header)


def _refuse_headerless(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Raise ``DataError`` suggesting column numbers if ``header`` looks like a row of data; else return."""
    if not _looks_like_data(header):
        return
    sample = [header] + [r for r in rows[:500] if len(r) == len(header)]
    columns = [[r[i].strip() for r in sample] for i in range(len(header))]
    length = [sum(len(v) for v in col) / len(col) for col in columns]
    text = max(range(len(columns)), key=lambda i: length[i])
    labels = [i for i, col in enumerate(columns) if i != text and all(col) and 2 <= len(set(col)) <= 50]
    label = min(labels, key=lambda i: (len(set(columns[i])), length[i])) if labels else None
    hint = (f"--label-column {label} --text-columns '[{text}]' (column {label} holds "
            f"{sorted(set(columns[label]))[:5]}, column {text} the longest texts)" if label is not None
            else "--label-column N --text-columns '[N, ...]'")
    raise DataError(f"{path}: the first line {header} looks like data, not a header; for a file without a "
                    f"header give the columns by 0-based number: {hint}")


def read_records(path: str | Path, fmt: str = "auto", text_columns: list[str] | None = None,
                 label_column: str | None = None, max_classes: int = 0) -> tuple[list[Record], list[BadRow], int, str]:
    """Parse ``path``; returns (records, bad rows, total rows, format). Raises DataError on unreadable files,
    and on a classification label column with more than ``max_classes`` distinct values or about one
    per row (``check_label_count``; 0: no check)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    fmt = detect_format(p) if fmt == "auto" else fmt
    bad: list[BadRow] = []
    if fmt == "classification":
        records, total = _table_records(p, text_columns, label_column, bad, max_classes)
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
