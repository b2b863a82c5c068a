"""Named tasks (--task sst2/mrpc/cola/rte/gsm8k): columns, labels and the official metric, in training and
in evaluation; GLUE's metrics on a model's predictions; GSM8K's answer accuracy by generation."""

import json

import pytest
import torch

from deltatune.cli import main
from deltatune.train import DataArgs, train
from deltatune.train.answers import answer_accuracy, prompt_and_reference
from deltatune.train.data import load_dataset
from deltatune.train.evaluate import evaluate, evaluate_adapter
from deltatune.train.tasks import TASKS, apply_task, head_of, named_task, task_score

transformers = pytest.importorskip("transformers")
pytest.importorskip("jsonargparse")
from test_train import args_for, make_tiny_llama  # noqa: E402  (shared tiny model and run settings)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tasks") / "model")


def write_cola(path, n=16, labels=("0", "1")):
    """CoLA's layout: no header; source, label, original label, sentence."""
    rows = [f"src{i}\t{labels[i % len(labels)]}\t\tthe cat number {i} {'sat' if i % 2 else 'sat sat'} ." for i in range(n)]
    path.write_text("".join(r + "\n" for r in rows))
    return path


def write_mrpc(path, n=12):
    rows = [f"{i % 2}\t{i}\t{i + 100}\tone sentence {i}\tanother {i}" for i in range(n)]
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(r + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_task_names_and_heads():
    assert head_of("cola") == "classification" and head_of("gsm8k") == "causal-lm" and head_of("auto") == "auto"
    assert named_task("causal-lm") is None
    with pytest.raises(ValueError, match="unknown --task 'qqp'"):
        named_task("qqp")
    filled = apply_task(DataArgs(data="x", task="rte"))
    assert (filled.data_format, filled.text_columns, filled.label_column) == (
        "classification", ["sentence1", "sentence2"], "label")
    own = apply_task(DataArgs(data="x", task="rte", text_columns=["a", "b"]))
    assert own.text_columns == ["a", "b"]  # explicit columns win
    assert task_score(TASKS["mrpc"], {"f1": 0.8, "accuracy": 0.6}) == pytest.approx(0.7)
    assert task_score(TASKS["cola"], {"accuracy": 0.5}) is None


def test_a_named_task_trains_records_and_evaluates_with_its_metric(llama, tmp_path, capsys):
    """CoLA (headerless) saved as .txt: --task cola reads its columns; eval takes the task from the
    adapter and scores it by Matthews correlation."""
    data = write_cola(tmp_path / "cola.txt")
    res = train(*args_for((llama, data), tmp_path / "run", max_steps=2, task="cola", targets=["q_proj", "v_proj"]),
                log=lambda s: None)
    info = json.loads((res.adapter / "deltatune_train.json").read_text())
    assert (info["task"], info["task_name"], info["label_names"]) == ("classification", "cola", ["0", "1"])
    assert main(["eval", "--adapter", str(res.adapter), "--data", str(data), "--max-length", "64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["task"] == "cola" and report["score"] == report["mcc"] and report["examples"] == 16
    assert {"accuracy", "macro_f1", "f1", "mcc"} <= set(report)
    # data of other labels than the adapter learned: one clear error naming them
    other = write_cola(tmp_path / "other.tsv", labels=("0", "1", "2"))
    assert main(["eval", "--adapter", str(res.adapter), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "labels ['2'] are not among the labels the model was trained on (['0', '1'])" in err


def test_evaluate_reports_glue_metrics_of_the_models_predictions(llama, tmp_path):
    metrics = pytest.importorskip("sklearn.metrics")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    ds = load_dataset(write_mrpc(tmp_path / "mrpc.tsv"), tok, text_columns=["#1 String", "#2 String"],
                      label_column="Quality", log=lambda *a: None)
    torch.manual_seed(3)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    out = evaluate(model, ds, batch_size=5)
    from deltatune.train.data import collate

    with torch.no_grad():
        batch = collate(ds.examples, tok.pad_token_id, "classification")
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()
    gold = [ex["label"] for ex in ds.examples]
    assert out["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred))
    assert out["f1"] == pytest.approx(metrics.f1_score(gold, pred, zero_division=0))
    assert out["mcc"] == pytest.approx(metrics.matthews_corrcoef(gold, pred))
    assert out["macro_f1"] == pytest.approx(metrics.f1_score(gold, pred, average="macro", zero_division=0))


def test_mrpc_score_is_the_mean_of_f1_and_accuracy(llama, tmp_path):
    report = evaluate_adapter(DataArgs(data=str(write_mrpc(tmp_path / "dev.tsv")), task="mrpc"), model=str(llama),
                              device="cpu")
    assert report["task"] == "mrpc" and report["score"] == pytest.approx((report["f1"] + report["accuracy"]) / 2)


def write_gsm8k(path):
    rows = [{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 minus 4?", "answer": "10 - 4 = 6\n#### 6"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Answers(torch.nn.Module):
    """A stand-in model whose greedy answer is a fixed text per prompt (the reference, or a wrong one)."""

    def __init__(self, tok, replies):
        super().__init__()
        self.tok, self.replies, self.dummy = tok, replies, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, **kw):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [i for i, m in zip(ids, mask) if m]
            rows.append(ids + self.tok(self.replies[tuple(prompt)], add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def test_answer_accuracy_compares_extracted_answers(llama, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    ds = load_dataset(write_gsm8k(tmp_path / "g.jsonl"), tok, log=lambda *a: None)
    pairs = [prompt_and_reference(ex) for ex in ds.examples]
    from deltatune.train.metrics import extract_answer

    assert [extract_answer(tok.decode(ref, skip_special_tokens=True)) for _, ref in pairs] == ["5", "6"]
    right = {tuple(p): "so it is 5" if i == 0 else "#### 6" for i, (p, _) in enumerate(pairs)}
    wrong = {tuple(p): "it is 7" for p, _ in pairs}
    assert answer_accuracy(_Answers(tok, right), tok, ds) == {"answer_accuracy": 1.0, "answered": 1.0}
    assert answer_accuracy(_Answers(tok, wrong), tok, ds, batch_size=1) == {"answer_accuracy": 0.0, "answered": 1.0}


def test_gsm8k_task_on_the_command_line(llama, tmp_path, capsys):
    data = write_gsm8k(tmp_path / "g.jsonl")
    assert main(["eval", "--model", str(llama), "--data", str(data), "--task", "gsm8k", "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["task"] == "gsm8k" and report["score"] == report["answer_accuracy"] and "loss" in report
