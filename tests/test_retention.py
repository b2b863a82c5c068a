"""Forgetting (--retention): each part of a suite equals a hand computation in float64 on a tiny random Llama
(Shakespeare blocks, Alpaca and chat responses through ChatML, SST-2 by the next-token logits of its two
words); the change against the base is exactly 0 for LoRA at init and not after a step; training logs
it at each evaluation (adapters and full fine-tuning); `deltatune eval --retention` reports it; errors."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.cli import main
from deltatune.train import TrainArgs, TrainError, train
from deltatune.train import retention as ret
from deltatune.train.retention import Suite, report

from test_train import args_for, char_tokenizer, split_settings, write_sentiment_tsv, write_task  # noqa: E402  (tests/ is on sys.path)

transformers = pytest.importorskip("transformers")

WORDS = (" negative", " positive")
ROWS = 3


def tokenizer():
    """The character tokenizer of test_train plus the SST-2 words as whole tokens (a mask slot holds one)."""
    from tokenizers import AddedToken

    tok = char_tokenizer()
    tok.add_tokens([AddedToken(w, normalized=False) for w in WORDS])
    return tok


def tiny_lm(tok):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, initializer_range=0.2)).eval()


SHAKESPEARE = "".join(f"FIRST CITIZEN {i}:\nWe are accounted poor citizens, the patricians good.\n\n"
                      for i in range(120))
ALPACA = [{"instruction": f"Name a colour {i}.", "input": "", "output": f"Blue number {i}."} for i in range(6)]
CHATS = [{"id": f"identity_{i}", "conversations": [{"from": "human", "value": f"Who are you {i}?"},
                                                   {"from": "gpt", "value": f"I am a model {i}."}]} for i in range(6)]
SST2 = [("a charming film .", 1), ("bleak and slow .", 0), ("very , very good", 1), ("tedious", 0), ("fun", 1)]


@pytest.fixture
def data_dir(tmp_path):
    """A made-up copy of ../shared/data's layout: the four files a suite reads."""
    root = tmp_path / "data"
    for sub in ("tinyshakespeare", "alpaca", "chat", "sst2"):
        (root / sub).mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text(SHAKESPEARE)
    (root / "alpaca" / "alpaca_tiny.json").write_text(json.dumps(ALPACA))
    (root / "chat" / "sharegpt_identity.json").write_text(json.dumps(CHATS))
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in SST2))
    return root


# -- float64 references ---------------------------------------------------------------------------------------
def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def summed_nll(lm, ids, targets):
    """(sum of -log p(token t | tokens < t) over the positions t in ``targets``, their count), float64."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([ids])).logits[0].double()
    logp = F.log_softmax(logits, -1)
    return sum(-float(logp[t - 1, ids[t]]) for t in targets), len(targets)


def chatml_nll(lm, tok, user, answer):
    """A one-turn chat in ChatML (the fallback template of a tokenizer without one): loss on the answer
    and its end-of-turn marker only."""
    prompt = ids_of(tok, f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    response = ids_of(tok, f"{answer}<|im_end|>")
    ids = prompt + response + ids_of(tok, "\n")
    return summed_nll(lm, ids, range(len(prompt), len(prompt) + len(response)))


def reference(lm, tok, rows):
    text = SHAKESPEARE[int(len(SHAKESPEARE) * 0.9):]
    stream = ids_of(tok, text)
    blocks = [stream[i:i + ret.LENGTH] for i in range(0, len(stream), ret.LENGTH)][:rows]
    assert len(blocks) == rows and all(len(b) == ret.LENGTH for b in blocks)
    parts = {"shakespeare": [summed_nll(lm, b, range(1, len(b))) for b in blocks],
             "alpaca": [chatml_nll(lm, tok, r["instruction"], r["output"]) for r in ALPACA[:rows]],
             "chat": [chatml_nll(lm, tok, c["conversations"][0]["value"], c["conversations"][1]["value"])
                      for c in CHATS[:rows]]}
    out = {f"{k}_perplexity": math.exp(sum(n for n, _ in v) / sum(c for _, c in v)) for k, v in parts.items()}
    word = [tok.convert_tokens_to_ids(w) for w in WORDS]
    hits = 0
    for sentence, label in SST2[:rows]:
        with torch.no_grad():
            last = lm(input_ids=torch.tensor([ids_of(tok, f"Review: {sentence}\nSentiment:")])).logits[0, -1]
        hits += int(int(last[word].argmax()) == label)
    out["sst2_accuracy"] = hits / rows
    return out


def test_suite_equals_a_hand_computation(data_dir):
    tok = tokenizer()
    lm = tiny_lm(tok)
    suite = Suite("general", tok, str(data_dir), rows=ROWS)
    got, want = suite.measure(lm, batch_size=2), reference(lm, tok, ROWS)
    assert list(got) == ["shakespeare_perplexity", "alpaca_perplexity", "chat_perplexity", "sst2_accuracy"]
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert 0 < got["sst2_accuracy"] < 1  # the random model gets some rows right and some wrong
    assert suite.describe()["parts"]["shakespeare"] == {"examples": ROWS, "targets": ROWS * ret.LENGTH}
    assert not lm.training  # the measurement keeps the model's mode


def test_change_is_zero_at_init_and_moves_after_a_step(data_dir):
    tok = tokenizer()
    base = tiny_lm(tok)
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets="all-linear"))
    suite = Suite("general", tok, str(data_dir), rows=ROWS)
    at_init = report(suite, model, batch_size=2)
    assert at_init["base"] == "adapters disabled"
    assert all(m["change"] == 0.0 for m in at_init["metrics"].values())  # B = 0: exactly the base
    truth = suite.measure(base, batch_size=2)
    assert {k: m["base"] for k, m in at_init["metrics"].items()} == truth

    model.train()
    opt = torch.optim.SGD(dt.adapter_params(model), lr=0.5)
    ids = torch.tensor([ids_of(tok, "Blue number zero. " * 4)])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    after = report(suite, model, batch_size=2)
    assert {k: m["base"] for k, m in after["metrics"].items()} == truth  # the base is still the base
    for key in ("shakespeare_perplexity", "alpaca_perplexity", "chat_perplexity"):
        m = after["metrics"][key]
        assert m["change"] != 0.0 and m["change"] == m["tuned"] - m["base"]
    assert "metric" in ret.format_table(after) and "+" in ret.format_table(after)


def test_a_fully_tuned_model_needs_its_base_apart(data_dir, tmp_path):
    tok = tokenizer()
    base = tiny_lm(tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    suite = Suite("text", tok, str(data_dir), rows=2)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.lm_head.weight.mul_(1.5)
    with pytest.raises(ValueError, match="--retention-base"):
        report(suite, tuned)
    res = report(suite, tuned, base=str(tmp_path / "base"))
    assert {k: m["base"] for k, m in res["metrics"].items()} == suite.measure(base)
    assert all(m["change"] != 0 for m in res["metrics"].values())


# -- training ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with the retention tokenizer, saved as an HF directory, and a small task."""
    root = tmp_path_factory.mktemp("retention")
    tok = tokenizer()
    tiny_lm(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", write_task(root / "task.jsonl")


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_logs_retention_at_each_evaluation(tiny, data_dir, tmp_path):
    out = tmp_path / "run"
    res = train(*args_for(tiny, out, max_steps=4, eval_every=2, retention="general", retention_data=str(data_dir),
                          retention_rows=2, save_every=0), log=lambda s: None)
    logged = [r for r in metrics(out) if "retention_sst2_accuracy" in r]
    assert [r["step"] for r in logged] == [2, 4]
    tok = tokenizer()
    suite = Suite("general", tok, str(data_dir), rows=2)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    truth = suite.measure(base)
    assert json.loads((out / ret.BASE_CACHE).read_text())["metrics"] == pytest.approx(truth, rel=1e-6)
    dt.load_adapter(base, res.adapter)
    final = suite.measure(base)  # the saved adapter on the base: what the last record measured
    for key, value in final.items():
        assert logged[-1][f"retention_{key}"] == pytest.approx(value, rel=1e-5)
        assert logged[-1][f"retention_{key}_change"] == pytest.approx(value - truth[key], rel=1e-5, abs=1e-9)
    assert logged[-1]["retention_shakespeare_perplexity_change"] != 0
    assert not any("retention_" in k for r in metrics(out) if "loss" in r for k in r)  # own records


def test_full_fine_tuning_measures_its_base_before_the_first_step(tiny, data_dir, tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    settings = dict(model=str(tiny[0]), data=str(tiny[1]), output=str(tmp_path / "full"), method="full",
                    max_steps=2, micro_batch=4, lr=1e-3, max_length=128, save_every=0, progress=False,
                    device="cpu", retention="text", retention_data=str(data_dir), retention_rows=2)
    args = TrainArgs(**{k: v for k, v in settings.items() if k in TrainArgs.__dataclass_fields__})
    data = split_settings({k: v for k, v in settings.items() if k not in TrainArgs.__dataclass_fields__})[1]
    res = train(args, data, log=lambda s: None)
    tok = tokenizer()
    suite = Suite("text", tok, str(data_dir), rows=2)
    truth = suite.measure(transformers.AutoModelForCausalLM.from_pretrained(tiny[0]).eval())
    cached = json.loads((tmp_path / "full" / ret.BASE_CACHE).read_text())["metrics"]
    assert cached == pytest.approx(truth, rel=1e-6)
    last = metrics(tmp_path / "full")[-1]
    assert last["step"] == 2 and last["retention_chat_perplexity_change"] != 0
    # deltatune eval on the fully tuned model: the base its deltatune_train.json names, loaded apart
    assert main(["eval", "--model", str(res.adapter), "--retention", "text", "--retention-data", str(data_dir),
                 "--retention-rows", "2", "--device", "cpu", "--no-progress"]) == 0
    report_ = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["retention"]
    assert report_["base"] == str(tiny[0])
    assert {k: m["base"] for k, m in report_["metrics"].items()} == pytest.approx(truth, rel=1e-6)
    assert report_["metrics"]["chat_perplexity"]["tuned"] == pytest.approx(last["retention_chat_perplexity"], rel=1e-5)


# -- the command line ------------------------------------------------------------------------------------------
def test_eval_retention_reports_the_table_and_json(tiny, data_dir, tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    res = train(*args_for(tiny, tmp_path / "run", max_steps=2, save_every=0), log=lambda s: None)
    common = ["--adapter", str(res.adapter), "--retention", "general", "--retention-data", str(data_dir),
              "--retention-rows", "2", "--device", "cpu", "--no-progress"]
    assert main(["eval", *common]) == 0
    captured = capsys.readouterr()
    alone = json.loads(captured.out.strip().splitlines()[-1])["retention"]
    assert alone["suite"] == "general" and alone["rows"] == 2 and alone["base"] == "adapters disabled"
    assert set(alone["metrics"]) == {"shakespeare_perplexity", "alpaca_perplexity", "chat_perplexity", "sst2_accuracy"}
    assert all(set(m) == {"base", "tuned", "change"} for m in alone["metrics"].values())
    assert "metric" in captured.err and "shakespeare_perplexity" in captured.err  # the table, on stderr
    # beside --data: one model load, both reports
    assert main(["eval", *common, "--data", str(tiny[1]), "--max-length", "128"]) == 0
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "perplexity" in both and both["retention"]["metrics"] == alone["metrics"]


def test_a_pattern_adapter_is_measured_on_its_language_model(tiny, data_dir, tmp_path, capsys):
    """A PET adapter with LoRA (deltatune train --method pattern) changes its LM: eval --retention measures it."""
    pytest.importorskip("jsonargparse")
    tsv = write_sentiment_tsv(tmp_path / "train.tsv")
    assert main(["train", "--method", "pattern", "--model", str(tiny[0]), "--data", str(tsv), "--output",
                 str(tmp_path / "pet"), "--template", "{text} Sentiment:{mask}", "--verbalizer", '{"0": ["n"], "1": ["y"]}',
                 "--lora-r", "4", "--max-steps", "2", "--lr", "0.05", "--device", "cpu", "--no-progress",
                 "--save-every", "0", "--retention", "text", "--retention-data", str(data_dir),
                 "--retention-rows", "2"]) == 0
    logged = metrics(tmp_path / "pet")[-1]
    assert main(["eval", "--adapter", str(tmp_path / "pet" / "adapter"), "--retention", "text", "--retention-data",
                 str(data_dir), "--retention-rows", "2", "--device", "cpu", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["retention"]
    assert res["base"] == "adapters disabled"
    for key, m in res["metrics"].items():
        assert m["change"] != 0 and m["tuned"] == pytest.approx(logged[f"retention_{key}"], rel=1e-5)


def test_cli_errors(tiny, data_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("jsonargparse")
    assert main(["eval", "--model", str(tiny[0]), "--retention", "nonesuch", "--retention-data", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown suite" in err and "general" in err and "text" in err and "sst2" in err
    assert main(["train", "--model", str(tiny[0]), "--data", str(tiny[1]), "--output", str(tmp_path / "t"),
                 "--retention", "nonesuch", "--device", "cpu", "--no-progress"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything was written
    assert main(["eval", "--model", str(tiny[0]), "--retention", "general",
                 "--retention-data", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (data_dir / "sst2" / "dev.tsv").unlink()
    assert main(["eval", "--model", str(tiny[0]), "--retention", "general", "--retention-data", str(data_dir)]) == 2
    assert "sst2/dev.tsv" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny[0]), "--retention", "text", "--retention-data", str(data_dir),
                 "--retention-rows", "0"]) == 2
    assert "--retention-rows" in capsys.readouterr().err
    # a plain model without an adapter, its base unnamed: nothing to compare with
    assert main(["eval", "--model", str(tiny[0]), "--retention", "text", "--retention-data", str(data_dir),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--retention-base" in capsys.readouterr().err
    monkeypatch.setattr(ret, "_default_dirs", lambda: [tmp_path / "a" / "shared" / "data"])
    with pytest.raises(ValueError, match="--retention-data DIR"):
        ret.find_data_dir()


def test_a_classifier_is_refused(data_dir):
    tok = tokenizer()
    head = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    with pytest.raises(ValueError, match="causal language model"):
        Suite("text", tok, str(data_dir), rows=1).measure(head)


@pytest.mark.slow
def test_smollm2_general_suite_on_the_shared_data(smollm2, shared_data):
    """SmolLM2-135M-Instruct with LoRA at init on the real suite (4 rows a part): no change, sane numbers."""
    lm, tok = smollm2
    model = copy.deepcopy(lm)
    dt.add_adapter(model, dt.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    suite = Suite("general", tok, str(shared_data), rows=4)
    res = report(suite, model, batch_size=4)
    assert all(m["change"] == 0.0 for m in res["metrics"].values())
    for key in ("shakespeare_perplexity", "alpaca_perplexity", "chat_perplexity"):
        assert 1.0 < res["metrics"][key]["base"] < 200.0, key  # a pretrained model, not a random one (~49k)
    assert res["parts"]["alpaca"]["examples"] == 4 and res["parts"]["sst2"]["examples"] == 4
