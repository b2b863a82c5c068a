"""Self-distillation data (``deltatune distill-data``): the model rewrites each response of a data file in
its own words, given the request and the reference response, and the rewrite replaces the reference
only when a check passes (for GSM8K: the same final number; for JSON answers: the same object), after
SDFT (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning"):
fine-tuning on answers in the model's own distribution forgets less than fine-tuning on the reference
answers.

    deltatune distill-data --model M --data train.jsonl --output train.sd.jsonl --check gsm8k

The output has the input's format and columns (JSON array or JSONL; alpaca or chat records), with only
the response text changed where a rewrite was kept; rows that cannot be read pass through unchanged.
Beside it, ``<output stem>.decisions.jsonl`` records each row's decision: kept or not, why, the
rewrite, and for GSM8K both final numbers. Alpaca records rewrite their output (``output``,
``completion`` or ``answer``), chats their last assistant turn, with the turns before it as context.

The generation itself is a function passed in (``generate(prompts) -> texts``); the command passes the
serving engine's batched generation (``engine_generate``), tests pass fixed rewrites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Union

from deltatune.train.chat import prompt_ids
from deltatune.train.formats import ALPACA_KEYS, ROLES, DataError, check_bad_rows, read_records
from deltatune.train.metrics import answers_match, extract_answer

__all__ = ["DistillDataArgs", "DistillDataError", "Generated", "Check", "CHECKS", "REWRITE_TEMPLATE",
           "DistillDataResult", "distill_data", "engine_generate", "run_distill_data", "decisions_path"]

REWRITE_TEMPLATE = (
    "{instruction}\n\n"
    "A reference response to the request above:\n"
    "<reference>\n{reference}\n</reference>\n\n"
    "Write your own response to the request, in your own words, using the reference as a guide. "
    "Reply with the response only, without mentioning the reference."
)
"""The request that asks for a rewrite: ``{instruction}`` is the user's turn, ``{reference}`` the response."""


class DistillDataError(ValueError):
    """Settings or files ``distill-data`` cannot work with; the message says which and why."""


@dataclass
class DistillDataArgs:
    """Rewrite the responses of a data file with the model itself, keeping a rewrite where a check passes (SDFT)."""

    model: Optional[str] = None
    """The model that rewrites: directory, .gguf file or hub id; default: the base the adapter records."""
    adapter: Optional[str] = None
    """Adapter directory (PEFT format) to generate with."""
    data: str = ""
    """Input file: alpaca or chat records, JSON array or JSONL."""
    output: str = ""
    """Output file, written in the input's format and layout; <stem>.decisions.jsonl beside it records each row's decision."""
    data_format: Literal["auto", "alpaca", "chat"] = "auto"
    """Format of --data; "auto" decides from the first record."""
    check: str = "none"
    """When a rewrite replaces the reference: "gsm8k" (the same final number: "#### N", else the last number), "json" (the rewrite is a JSON object equal to the reference's; any layout) or "none" (any non-empty rewrite that ended by itself)."""
    template: Optional[str] = None
    """The rewrite request, with {instruction} and {reference} in it; default: deltatune's (REWRITE_TEMPLATE)."""
    max_new_tokens: int = 512
    """Tokens a rewrite may take; one cut at this length is not kept (unless --keep-truncated)."""
    keep_truncated: bool = False
    """Also judge rewrites cut at --max-new-tokens (they end mid-sentence; not kept by default)."""
    temperature: float = 0.0
    """0: greedy; > 0: sample at this temperature."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p."""
    seed: Optional[int] = None
    """Seed of the sampling."""
    batch_size: int = 64
    """Rewrites handed to the engine at once (it batches them continuously)."""
    max_examples: int = 0
    """Rewrite only the first this many readable rows (0: all); the rest pass through unchanged."""
    device: str = "auto"
    """"auto" (CUDA if present), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16"."""
    progress: bool = True
    """Show a progress bar (on stderr)."""


@dataclass
class Generated:
    """One rewrite: its text and why it ended ("stop": by itself; "length": cut at max_new_tokens; "refused")."""

    text: str
    finish_reason: str = "stop"


# -- checks ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A rule deciding whether a rewrite replaces the reference."""

    name: str
    describe: str
    """What the summary line says the check is."""
    judge: Callable[[str, str], tuple[bool, str, dict]]
    """(reference, rewrite) -> (keep, reason, details for the decision record)."""
    hint: str = ""
    """Added to the rewrite request (the form the check reads)."""


def _gsm8k(reference: str, rewrite: str) -> tuple[bool, str, dict]:
    gold, answer = extract_answer(reference), extract_answer(rewrite)
    details = {"reference_answer": gold, "rewrite_answer": answer}
    if gold is None:
        return False, "the reference has no final number", details
    if answer is None:
        return False, "the rewrite has no final number", details
    if not answers_match(answer, gold):
        return False, f"final number {answer} != {gold}", details
    return True, "final number matches", details


def _non_empty(reference: str, rewrite: str) -> tuple[bool, str, dict]:
    return True, "non-empty", {}


def _json_object(text: str) -> tuple[Optional[dict], str]:
    """(the JSON object ``text`` is, whitespace around it aside; None and why when it is not one)."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at char {e.pos})"
    if not isinstance(value, dict):
        return None, f"JSON {type(value).__name__}, not an object"
    return value, ""


def _canonical(value) -> str:
    """One text per JSON value: keys sorted, fixed separators. It tells 41 from 41.0 and "41", and 1 from true,
    which a plain ``==`` of the parsed objects does not."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json(reference: str, rewrite: str) -> tuple[bool, str, dict]:
    """Keep a rewrite that is, as a whole, a JSON object equal to the reference's: the same keys with the same
    values and value types, at any depth. The layout is free: key order, spacing, line breaks, escapes.

    Why not also the reference's exact layout: a reference in a fixed format (the demo's one-line
    ``{"name": ..., "age": ..., "city": ...}``) has exactly one text for a given object, so a check that
    required the layout would keep only rewrites identical to the reference and the self-distilled file
    would be the original; the model's own wording of such an answer *is* its layout. Text around the
    object (prose, a markdown fence) is not accepted: it is not the answer the task asks for, and the
    rewrite is kept verbatim. A task scored by exact text therefore may score lower after training on kept
    rewrites whose layout differs; the decision record says for each whether its layout matches
    (``same_text``)."""
    gold, why = _json_object(reference)
    if gold is None:
        return False, f"the reference is {why}", {}
    answer, why = _json_object(rewrite)
    if answer is None:
        return False, f"the rewrite is {why}", {}
    details = {"same_text": rewrite.strip() == reference.strip()}
    if _canonical(answer) != _canonical(gold):
        differ = sorted(k for k in set(gold) | set(answer)
                        if k not in gold or k not in answer or _canonical(gold[k]) != _canonical(answer[k]))
        return False, f"JSON object differs at keys {differ}", details
    return True, "same JSON object", details


CHECKS = {
    "gsm8k": Check("gsm8k", "gsm8k final number", _gsm8k,
                   hint="End with the final answer alone on the last line, written as '#### <number>'."),
    "json": Check("json", "json: the same JSON object as the reference", _json,
                  hint="Reply with the JSON object alone, with no other text."),
    "none": Check("none", "none: every non-empty rewrite", _non_empty),
}
"""--check name -> Check."""


def check_named(name: str) -> Check:
    """The check called ``name``; ``DistillDataError`` naming the known ones otherwise."""
    if name not in CHECKS:
        raise DistillDataError(f"unknown --check {name!r}; choose one of {sorted(CHECKS)}")
    return CHECKS[name]


# -- the rows of a file ---------------------------------------------------------------------------------
@dataclass
class _Row:
    """A readable record: where it is, the request, the reference and how to put a rewrite back."""

    index: int
    line: int
    messages: list[dict]
    """The rewrite request as a conversation (the context, then the user turn with the template)."""
    reference: str
    where: tuple
    """("alpaca", key) or ("chat", turns key, turn index, text key): the reference's place in the object."""


def _raw_objects(path: Path) -> tuple[Optional[list[str]], list[tuple[int, str, object]]]:
    """(the file's lines for JSONL, None for a JSON array; [(1-based line, raw text, object or None)] of every
    record, in the index order ``formats.read_records`` counts them: JSONL's non-empty lines, an array's
    elements)."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        items = json.loads(text)  # read_records has already reported a syntax error by its line
        return None, [(0, "", obj) for obj in items]
    out, lines = [], text.splitlines()
    for line, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            obj = None
        out.append((line, raw, obj))
    return lines, out


def _target(obj: dict, fmt: str) -> Optional[tuple]:
    """Where the response to rewrite is in a raw record, or None (a chat ending in a function call)."""
    if fmt == "alpaca":
        for ikey, _, okey in ALPACA_KEYS:  # the key pair formats._alpaca_record reads
            if ikey in obj or okey in obj:
                return ("alpaca", okey)
    key = "conversations" if "conversations" in obj else "messages"
    turns = obj[key]
    last = max(i for i, t in enumerate(turns) if ROLES[t.get("from", t.get("role"))] == "assistant")
    if turns[last].get("from", turns[last].get("role")) == "function_call":
        return None
    return ("chat", key, last, "value" if "value" in turns[last] else "content")


def _rewrite_request(messages: list[dict], template: str, hint: str) -> Optional[tuple[list[dict], str]]:
    """(the conversation asking for a rewrite of the last assistant turn, the reference), or None when no
    user turn precedes it. The turns before the user's last one stay as context."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [i for i in range(last) if messages[i]["role"] == "user"]
    if not users:
        return None
    u, reference = users[-1], messages[last]["content"]
    ask = template.replace("{instruction}", messages[u]["content"]).replace("{reference}", reference)
    ask = ask + ("\n" + hint if hint else "")
    return messages[:u] + [{"role": "user", "content": ask}] + messages[u + 1:last], reference


# -- the command's work ---------------------------------------------------------------------------------
@dataclass
class DistillDataResult:
    """What ``distill_data`` did."""

    kept: int
    total: int
    """Rewrites asked for (readable rows within --max-examples)."""
    passed: int
    """Rows passed through without a rewrite (unreadable, no user turn, past --max-examples)."""
    output: Path
    decisions: Path
    check: str
    decisions_list: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """"kept K of N rewrites (check: ...)", and the rows passed through."""
        line = f"kept {self.kept} of {self.total} rewrites (check: {CHECKS[self.check].describe})"
        if self.passed:
            line += f"; {self.passed} rows passed through unchanged"
        return line + f"; wrote {self.output} and {self.decisions}"


def decisions_path(output: Union[str, Path]) -> Path:
    """Where the per-row decisions of ``output`` go: ``<stem>.decisions.jsonl`` beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".decisions.jsonl")


GenerateFn = Callable[[list[list[int]]], list[Union[Generated, str]]]


def distill_data(data: Union[str, Path], output: Union[str, Path], tokenizer, generate: GenerateFn,
                 check: str = "none", fmt: str = "auto", template: Optional[str] = None, batch_size: int = 64,
                 max_examples: int = 0, keep_truncated: bool = False, progress: bool = False,
                 log=print) -> DistillDataResult:
    """Rewrite the responses of ``data`` with ``generate`` and write ``output`` (and its decisions file).

    Args:
        data, output: the input and output files (JSON array or JSONL; alpaca or chat records).
        tokenizer: renders each rewrite request through its chat template (ChatML without one).
        generate: ``generate(prompts)``, prompts as token-id lists, returns one ``Generated`` (or text) each.
        check: a name of ``CHECKS``; fmt: "auto", "alpaca" or "chat".
        template: the rewrite request, with ``{instruction}`` and ``{reference}``; default REWRITE_TEMPLATE.
        batch_size: prompts handed to ``generate`` at once; max_examples: rewrite only the first n rows.
        keep_truncated: judge a rewrite cut at the length limit like any other (else it is not kept).
    Returns a ``DistillDataResult``. Raises ``DistillDataError`` / ``DataError`` on bad settings or files.
    """
    judge = check_named(check)
    template = template if template is not None else REWRITE_TEMPLATE
    missing = [p for p in ("{instruction}", "{reference}") if p not in template]
    if missing:
        raise DistillDataError(f"--template must contain {missing}")
    data, output = Path(data), Path(output)
    if output.resolve() == data.resolve():
        raise DistillDataError(f"--output {output} is the input file; write the rewrites to another file")
    if fmt not in ("auto", "alpaca", "chat"):
        raise DistillDataError(f"--data-format {fmt!r}: distill-data reads alpaca or chat records")
    records, bad, total, fmt = read_records(data, fmt)
    if fmt not in ("alpaca", "chat"):
        raise DistillDataError(f"{data}: read as {fmt} data, which has no responses to rewrite; distill-data "
                               f"reads alpaca or chat records (JSON/JSONL)")
    report = check_bad_rows(data, bad, total, max_bad_fraction=1.0)
    if report:
        log(report)
    lines, raw = _raw_objects(data)
    if output.suffix.lower() == ".jsonl" and lines is None:
        raise DistillDataError(f"--output {output}: the input {data} is a JSON array; name the output .json")
    if len(raw) != total:  # the two readers must count records alike
        raise DistillDataError(f"{data}: read {len(raw)} records, but the data reader counted {total}")

    decisions = {b.index: {"index": b.index, "line": b.line, "kept": False, "reason": f"bad row: {b.reason}"}
                 for b in bad}
    rows: list[_Row] = []
    for r in records:
        where = _target(raw[r.index][2], fmt)
        request = _rewrite_request(r.messages, template, judge.hint) if where is not None else None
        if request is None:
            why = "the last assistant turn is a function call" if where is None else "no user turn before the response"
            decisions[r.index] = {"index": r.index, "line": r.line, "kept": False, "reason": why}
        elif max_examples and len(rows) >= max_examples:
            decisions[r.index] = {"index": r.index, "line": r.line, "kept": False, "reason": "past --max-examples"}
        else:
            rows.append(_Row(r.index, r.line, request[0], request[1], where))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="rewrite", unit="row", dynamic_ncols=True)
    kept = 0
    try:
        for start in range(0, len(rows), max(batch_size, 1)):
            chunk = rows[start:start + max(batch_size, 1)]
            outs = generate([prompt_ids(tokenizer, row.messages) for row in chunk])
            if len(outs) != len(chunk):
                raise DistillDataError(f"generate returned {len(outs)} texts for {len(chunk)} prompts")
            for row, out in zip(chunk, outs):
                out = out if isinstance(out, Generated) else Generated(str(out))
                decision = _decide(row, out, judge, keep_truncated)
                decisions[row.index] = decision
                if decision["kept"]:
                    kept += 1
                    _put(raw[row.index][2], row.where, out.text.strip())
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(kept=kept)
    finally:
        if bar is not None:
            bar.close()

    kept_index = {i for i, d in decisions.items() if d["kept"]}
    ordered = [decisions[i] for i in sorted(decisions)]
    _write(output, lines, raw, kept_index)
    side = decisions_path(output)
    from deltatune.formats.atomic import atomic_write

    atomic_write(side, lambda tmp: Path(tmp).write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in ordered), encoding="utf-8"))
    return DistillDataResult(kept, len(rows), total - len(rows), output, side, judge.name, ordered)


def _decide(row: _Row, out: Generated, judge: Check, keep_truncated: bool = False) -> dict:
    """The decision record of one rewrite."""
    decision = {"index": row.index, "line": row.line, "kept": False, "reason": "", "rewrite": out.text}
    if out.finish_reason.startswith("refused"):
        decision["reason"] = out.finish_reason
    elif out.finish_reason == "length" and not keep_truncated:
        decision["reason"] = "cut at --max-new-tokens"
    elif not out.text.strip():
        decision["reason"] = "empty rewrite"
    else:
        keep, reason, details = judge.judge(row.reference, out.text)
        decision.update(kept=keep, reason=reason, **details)
    return decision


def _put(obj: dict, where: tuple, text: str) -> None:
    """Replace the response at ``where`` in the raw record ``obj`` by ``text``."""
    if where[0] == "alpaca":
        obj[where[1]] = text
    else:
        _, key, turn, text_key = where
        obj[key][turn][text_key] = text


def _write(output: Path, lines: Optional[list[str]], raw: list, kept: set) -> None:
    """The output file, atomically: a JSON array whole; JSONL line for line, the rows not rewritten (blank
    and unreadable lines too) as they were."""
    from deltatune.formats.atomic import atomic_write

    if lines is None:
        text = json.dumps([obj for _, _, obj in raw], ensure_ascii=False, indent=2) + "\n"
    else:
        lines = list(lines)
        for i, (line, _, obj) in enumerate(raw):
            if i in kept:
                lines[line - 1] = json.dumps(obj, ensure_ascii=False)
        text = "".join(line + "\n" for line in lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# -- through the serving engine -------------------------------------------------------------------------
def engine_generate(engine, adapter: Optional[str] = None, refusal: type = ValueError, **sampling) -> GenerateFn:
    """``generate`` over a ``deltatune.serve.Engine``: every prompt of a call queued at once (continuous
    batching); a prompt the engine refuses (too long: ``refusal``, serve's ``RequestRefused``) comes back
    with finish reason "refused: ...". ``sampling``: SamplingParams fields (max_new_tokens, temperature, ...)."""
    def generate(prompts: list[list[int]]) -> list[Generated]:
        ids: dict[int, int] = {}
        refused: dict[int, str] = {}
        try:
            for i, prompt in enumerate(prompts):
                try:
                    ids[i] = engine.add_request(prompt, adapter, **sampling)
                except refusal as e:  # the prompt can never fit
                    refused[i] = f"refused: {e}"
            while engine.has_unfinished():
                engine.step()
        except BaseException:
            for r in ids.values():
                engine.abort(r)
            raise
        outs = {i: engine.pop_output(r) for i, r in ids.items()}
        return [Generated(outs[i].text, outs[i].finish_reason) if i in outs else Generated("", refused[i])
                for i in range(len(prompts))]

    return generate


def run_distill_data(args: DistillDataArgs, open_engine: Callable, refusal: type = ValueError, out=None) -> int:
    """``deltatune distill-data``: check the settings, open the engine (``open_engine(model, dtype=,
    device=)``, e.g. ``Engine.from_pretrained``; ``refusal``: the exception of a prompt it refuses), rewrite,
    print the summary; returns the exit status."""
    import sys

    from deltatune.hub import ModelLoadError

    prog, out = "deltatune distill-data", out or sys.stdout
    try:
        if not args.model and args.adapter:
            from deltatune.train.outputs import base_of

            args.model = base_of(args.adapter)
        for name in ("model", "data", "output"):
            if not getattr(args, name):
                raise DistillDataError(f"--{name} is required")
        check_named(args.check)
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise DistillDataError(f"--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]; got "
                                   f"{args.max_new_tokens}, {args.temperature}, {args.top_p}")
        if not Path(args.data).is_file():
            raise DataError(f"--data {args.data}: no such file")
        engine = open_engine(args.model, dtype=args.dtype, device=args.device)
        if args.adapter:
            engine.add_adapter("adapter", args.adapter)
        sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "seed": args.seed}
        log = (lambda message: print(message, file=sys.stderr))
        result = distill_data(args.data, args.output, engine.tokenizer,
                              engine_generate(engine, "adapter" if args.adapter else None, refusal, **sampling),
                              check=args.check, fmt=args.data_format, template=args.template,
                              batch_size=args.batch_size, max_examples=args.max_examples,
                              keep_truncated=args.keep_truncated, progress=args.progress,
                              log=log)
    except (ModelLoadError, ValueError, OSError, KeyError) as e:  # DataError, DistillDataError, AdapterFileError
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(result.summary(), file=out)
    return 0
