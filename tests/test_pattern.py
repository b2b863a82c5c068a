"""Pattern-verbalizer (PET): class scores equal the LM's logits at the mask slot computed by hand (causal LM
and masked LM, soft tokens included), training lowers the loss, save/load keeps the scores, the CLI trains
and evaluates (zero-shot and with the adapter), bad input gets clear errors; SmolLM2 on SST-2 (slow)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.cli import main
from deltatune.methods.pattern import PatternConfig, PatternModel
from deltatune.train.formats import DataError

from test_train import char_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)

transformers = pytest.importorskip("transformers")

CAUSAL = dict(template="{text} sentiment:{mask}", verbalizer={"neg": ["n"], "pos": ["y", "p"]})
TEXTS = ["good film", "a bad one", "ok"]


def tiny_llama(tok, context=128):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, pad_token_id=tok.pad_token_id,
        initializer_range=0.2)).eval()


WORDS = ["it", "was", ".", "good", "bad", "film", "great", "terrible", "a", "movie", "ok", "one"]


def word_tokenizer():
    """A made-up word-level BERT-style tokenizer ([CLS] ... [SEP], a [MASK] token); needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert_mlm(tok):
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).eval()


def causal_reference(lm, tok, texts, suffix, words):
    """Each class's mean logit of its words after ``text + suffix``, one unpadded forward per text."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text + suffix, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            last = lm(input_ids=ids).logits[0, -1]
        rows.append([last[[tok.convert_tokens_to_ids(w) for w in ws]].mean() for ws in words])
    return torch.tensor(rows)


def test_causal_scores_are_the_next_token_logits_of_the_verbalizer():
    tok = char_tokenizer()
    lm = tiny_llama(tok)
    model = PatternModel(lm, PatternConfig(**CAUSAL), tok)
    ref = causal_reference(lm, tok, TEXTS, " sentiment:", [["n"], ["y", "p"]])
    torch.testing.assert_close(model.scores(TEXTS), ref, rtol=1e-5, atol=1e-5)  # rows padded to one batch


def test_masked_lm_scores_are_the_logits_at_the_mask_token():
    tok = word_tokenizer()
    lm = tiny_bert_mlm(tok)
    cfg = PatternConfig(template="{text} it was {mask} .", verbalizer={"0": ["terrible", "bad"], "1": ["great"]})
    model = PatternModel(lm, cfg, tok)
    assert model.pattern.kind == "masked"
    rows = []
    for text in TEXTS:
        enc = tok(text + " it was [MASK] .", return_tensors="pt")
        at = int((enc["input_ids"][0] == tok.mask_token_id).nonzero())
        with torch.no_grad():
            logits = lm(**enc).logits[0, at]
        ids = [[tok.convert_tokens_to_ids(w) for w in ws] for ws in (["terrible", "bad"], ["great"])]
        rows.append([logits[i].mean() for i in ids])
    torch.testing.assert_close(model.scores(TEXTS), torch.tensor(rows), rtol=1e-5, atol=1e-5)


def test_soft_tokens_are_learned_embeddings_at_their_slots():
    tok = char_tokenizer()
    lm = tiny_llama(tok)
    cfg = PatternConfig(template="{text}{soft} sentiment:{mask}", verbalizer=CAUSAL["verbalizer"], soft_tokens=2)
    model = PatternModel(lm, cfg, tok)
    table = model.soft_prompt.weight.detach()  # (3, hidden): two prepended, one at {soft}
    assert table.shape == (3, 32)
    embed = lm.get_input_embeddings()
    rows = []
    for text in TEXTS:
        parts = [table[:2], embed(torch.tensor(tok(text, add_special_tokens=False)["input_ids"])), table[2:],
                 embed(torch.tensor(tok(" sentiment:", add_special_tokens=False)["input_ids"]))]
        with torch.no_grad():
            last = lm(inputs_embeds=torch.cat(parts)[None]).logits[0, -1]
        ids = [[tok.convert_tokens_to_ids(w) for w in ws] for ws in (["n"], ["y", "p"])]
        rows.append([last[i].mean() for i in ids])
    torch.testing.assert_close(model.scores(TEXTS), torch.tensor(rows), rtol=1e-5, atol=1e-5)


def _batch(model, n=8):
    texts = [("good " if i % 2 else "bad ") + "film" * (1 + i % 3) for i in range(n)]
    return model.encode(texts), torch.tensor([i % 2 for i in range(n)])


@pytest.mark.parametrize("settings", [dict(soft_tokens=3), dict(lora_r=4), dict(soft_tokens=2, lora_r=4)])
def test_training_lowers_the_loss_and_trains_only_the_adapter(settings):
    tok = char_tokenizer()
    model = PatternModel(tiny_llama(tok), PatternConfig(**CAUSAL, **settings), tok)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dt.add_adapter(model, PatternConfig(**CAUSAL, **settings))
    trainable = dt.adapter_params(model)
    assert trainable and all(p.requires_grad for p in trainable)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    batch, labels = _batch(model)
    opt = torch.optim.Adam(trainable, lr=3e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():  # the base never moved
        if n in base:
            assert torch.equal(p, base[n]), n


def test_save_load_round_trip_keeps_the_scores(tmp_path):
    tok = char_tokenizer()
    cfg = PatternConfig(template="{soft}{text} sentiment:{mask}", verbalizer=CAUSAL["verbalizer"], soft_tokens=1,
                        lora_r=4, targets=["q_proj", "v_proj"])
    lm = tiny_llama(tok)
    fresh = copy.deepcopy(lm)
    model = PatternModel(lm, cfg, tok)
    dt.add_adapter(model, cfg)
    with torch.no_grad():  # move the adapter away from its init so the round trip can fail
        for p in dt.adapter_params(model):
            p.add_(0.1 * torch.randn_like(p))
    before = model.scores(TEXTS)
    dt.save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["deltatune_method"] == "pattern"
    assert raw["config"]["template"] == cfg.template and raw["config"]["verbalizer"] == cfg.verbalizer
    torch.manual_seed(123)  # another initial soft table: the file's must win
    other = PatternModel(fresh, cfg, tok)
    assert not torch.allclose(other.scores(TEXTS), before)
    dt.load_adapter(other, tmp_path / "ad")
    torch.testing.assert_close(other.scores(TEXTS), before, rtol=1e-5, atol=1e-6)
    dt.remove_adapter(other, "default")  # the exact inverse: plain modules again
    assert isinstance(other.soft_prompt, torch.nn.Embedding)
    assert type(other.lm.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# -- the command line ---------------------------------------------------------------------------------------
def write_tsv(path, n=24):
    rows = ["sentence\tlabel"] + [f"{'good' if i % 2 else 'bad'} film {'x' * (i % 4)}\t{'pos' if i % 2 else 'neg'}"
                                  for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pattern")
    tok = char_tokenizer()
    tiny_llama(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", write_tsv(root / "train.tsv"), write_tsv(root / "dev.tsv", n=10)


def _eval(capsys, *argv):
    assert main(["eval", "--no-progress", "--device", "cpu", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_trains_and_evaluates_a_pattern(tiny_dir, tmp_path, capsys):
    model, train_tsv, dev_tsv = tiny_dir
    pattern = ["--template", CAUSAL["template"], "--verbalizer", json.dumps(CAUSAL["verbalizer"])]
    zero = _eval(capsys, "--method", "pattern", "--model", str(model), "--data", str(dev_tsv), *pattern)
    assert zero["examples"] == 10 and 0.0 <= zero["accuracy"] <= 1.0
    out = tmp_path / "run"
    code = main(["train", "--method", "pattern", "--model", str(model), "--data", str(train_tsv), "--output", str(out),
                 *pattern, "--soft-tokens", "2", "--lora-r", "4", "--max-steps", "25", "--micro-batch", "8",
                 "--lr", "3e-2", "--device", "cpu", "--no-progress", "--save-every", "0"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["deltatune_method"] == "pattern"
    trained = _eval(capsys, "--adapter", str(out / "adapter"), "--data", str(dev_tsv))
    assert trained["examples"] == 10 and trained["loss"] < zero["loss"]
    assert trained["accuracy"] >= 0.9  # "good"/"bad" in the text decides the label


def test_cli_pattern_errors_are_short_and_name_the_problem(tiny_dir, tmp_path, capsys):
    model, train_tsv, _ = tiny_dir
    base = ["train", "--method", "pattern", "--model", str(model), "--data", str(train_tsv), "--output",
            str(tmp_path / "r"), "--device", "cpu", "--no-progress"]
    assert main([*base, "--template", "{text} sentiment:{mask}", "--verbalizer", '{"neg": ["n"], "pos": ["y"]}']) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert main([*base, "--template", "{text} is", "--soft-tokens", "1"]) == 2
    assert "exactly one {mask}" in capsys.readouterr().err
    assert main([*base, "--template", "{text} sentiment: {mask}", "--verbalizer", '{"neg": ["n"], "pos": ["y"]}',
                 "--soft-tokens", "1"]) == 2
    assert "word ' n' (label 'neg') is 2 tokens" in capsys.readouterr().err  # the space before {mask} joins the word
    assert main([*base, "--template", "{text} sentiment:{mask}", "--verbalizer", '{"neg": ["n"], "other": ["y"]}',
                 "--soft-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "['pos']" in err and "not in the verbalizer" in err and "line 3" in err


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, message", [
    ("{text} it was", "exactly one {mask}"), ("it was {mask}", "exactly one {text}"),
    ("{text} {mask} {mask}", "exactly one {mask}"), ("{text} {label} {mask}", "unknown placeholder {label}"),
])
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PatternConfig(template=template)


def test_bad_verbalizers_are_refused():
    tok = char_tokenizer()
    lm = tiny_llama(tok)
    with pytest.raises(ValueError, match="two or more labels"):
        PatternConfig(verbalizer={"0": ["n"]})
    with pytest.raises(ValueError, match=r"'great' \(label 'pos'\) is 5 tokens"):
        PatternModel(lm, PatternConfig(template="{text}:{mask}", verbalizer={"neg": ["n"], "pos": ["great"]}), tok)
    first = PatternModel(lm, PatternConfig(template="{text}:{mask}", verbalizer={"neg": ["n"], "pos": ["great"]},
                                           multi_token="first"), tok)  # documented rule: the first token
    assert first.pattern.word_ids == [[tok.convert_tokens_to_ids("n")], [tok.convert_tokens_to_ids("g")]]
    with pytest.raises(ValueError, match="share token"):
        PatternModel(lm, PatternConfig(template="{text}:{mask}", verbalizer={"a": ["y"], "b": ["y"]}), tok)
    with pytest.raises(ValueError, match=r"\{text\} must come before \{mask\}"):
        PatternModel(lm, PatternConfig(template="{mask} means {text}", verbalizer=CAUSAL["verbalizer"]), tok)


def test_prompts_longer_than_the_context_are_refused(tmp_path):
    tok = char_tokenizer()
    lm = tiny_llama(tok, context=24)
    long = PatternModel(lm, PatternConfig(template="{text} the sentiment of this review is:{mask}",
                                          verbalizer=CAUSAL["verbalizer"]), tok)
    with pytest.raises(ValueError, match="leaves no room for the text within 24 tokens"):
        long.encode(["good"])
    model = PatternModel(lm, PatternConfig(**CAUSAL), tok)
    assert model.encode(["good " * 20])["input_ids"].shape[1] == 24  # a long text is cut to fit
    with pytest.raises(ValueError, match="longer than the model's context of 24"):
        model(input_ids=torch.zeros(1, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="goes on a PatternModel"):
        dt.add_adapter(lm, PatternConfig(**CAUSAL, lora_r=4))


def test_labels_outside_the_verbalizer_name_file_and_line(tmp_path):
    from deltatune.train.args import DataArgs
    from deltatune.train.pattern import pattern_dataset

    tok = char_tokenizer()
    model = PatternModel(tiny_llama(tok), PatternConfig(**CAUSAL), tok)
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\ngood\tpos\nmeh\tneutral\n")
    with pytest.raises(DataError, match=r"d.tsv: labels \['neutral'\] \(first at line 3\) are not in the verbalizer"):
        pattern_dataset(str(path), model, DataArgs(), log=lambda m: None)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("premise\thypothesis\tlabel\ngood\tok\tpos\n")
    with pytest.raises(DataError, match=r"rows have 2 text column\(s\), the template .* places 1"):
        pattern_dataset(str(pairs), model, DataArgs(), log=lambda m: None)
    two = PatternModel(model.lm, PatternConfig(template="{text}/{text2}:{mask}", verbalizer=CAUSAL["verbalizer"]), tok)
    ds = pattern_dataset(str(pairs), two, DataArgs(), log=lambda m: None)
    assert ds.examples == [{"input_ids": tok("good/ok:", add_special_tokens=False)["input_ids"], "label": 1}]


@pytest.mark.slow
def test_smollm2_zero_shot_on_sst2_beats_chance(smollm2, shared_data):
    model, tok = smollm2
    lm = copy.deepcopy(model)
    pattern = PatternModel(lm, PatternConfig(template="Review: {text}\nSentiment: {mask}",
                                             verbalizer={"0": ["negative"], "1": ["positive"]}), tok)
    lines = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[1:97]
    texts, labels = zip(*(line.rsplit("\t", 1) for line in lines))
    pred = torch.cat([pattern.scores(list(texts[i:i + 16])).argmax(-1) for i in range(0, len(texts), 16)])
    accuracy = (pred == torch.tensor([int(y) for y in labels])).float().mean().item()
    assert accuracy > 0.7, accuracy  # 0.81 on 200 dev rows; chance is 0.5
