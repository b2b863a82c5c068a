"""Knowledge distillation into an adapter (--teacher) and self-distillation data (distill-data): the KD
term against a float64 reference, a training step's gradient against autograd of the formula, the
flags and short runs, and distill-data's keep / reject decisions (fixed rewrites, then the real engine)."""

import copy
import json
import math
import shutil

import pytest
import torch

import deltatune as dt
from deltatune.cli import main, parse_train_args
from deltatune.train import DataArgs, TrainArgs
from deltatune.train.distill import DistillError, kd_loss
from deltatune.train.distill_data import (
    REWRITE_TEMPLATE, DistillDataError, Generated, decisions_path, distill_data,
)
from deltatune.train.formats import DataError

transformers = pytest.importorskip("transformers")
from _util import rel_error  # noqa: E402
from test_train import char_tokenizer, make_tiny_llama, write_task  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl", n=12)


# -- the KD term ---------------------------------------------------------------------------------------------
def reference_kd(student, teacher, labels, T):
    """T² Σ KL(softmax(t/T) ‖ softmax(s/T)) over positions i with labels[i + 1] != -100, in float64, by hand."""
    total = 0.0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            s = [float(v) / T for v in student[b, i]]
            t = [float(v) / T for v in teacher[b, i]]
            zs, zt = math.log(sum(math.exp(v) for v in s)), math.log(sum(math.exp(v) for v in t))
            total += sum(math.exp(tv - zt) * ((tv - zt) - (sv - zs)) for sv, tv in zip(s, t))
    return T * T * total


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kd_loss_matches_a_float64_reference(T):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 11, generator=g) * 3, torch.randn(2, 7, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 4] = -100   # a packed row's boundary inside the row
    labels[1, -1] = -100  # padding
    out = kd_loss(student, teacher, labels, T)
    assert abs(out.item() - reference_kd(student, teacher, labels, T)) < 1e-5 * max(1.0, abs(out.item()))
    # the gradient: autograd of the same formula in float64
    s32, s64 = student.clone().requires_grad_(), student.double().requires_grad_()
    kd_loss(s32, teacher, labels, T).backward()
    keep = labels[:, 1:] != -100
    ls = torch.log_softmax(s64[:, :-1][keep] / T, -1)
    lt = torch.log_softmax(teacher.double()[:, :-1][keep] / T, -1)
    (T * T * (lt.exp() * (lt - ls)).sum()).backward()
    assert rel_error(s32.grad, s64.grad) < 1e-5
    # masked positions carry nothing; a student equal to the teacher has none
    moved = student.clone()
    moved[0, :2] += 5.0  # positions 0 and 1 predict labels 1 and 2, both masked
    assert kd_loss(moved, teacher, labels, T).item() == pytest.approx(out.item(), rel=1e-6)
    assert abs(kd_loss(teacher, teacher, labels, T).item()) < 1e-5


def test_kd_loss_refuses_logits_of_different_shapes():
    with pytest.raises(DistillError, match="do not match"):
        kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.zeros(1, 3, dtype=torch.long))


# -- one training step: the gradient of (1 - α)·CE + α·KD --------------------------------------------------------
def _inputs(batch):
    """The model inputs of a collated (packed) batch, as the training step passes them."""
    if "position_ids" in batch:
        return {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("fast", [False, True])  # the fused path on CPU runs its kernels' PyTorch branch
def test_teacher_base_step_gradient_equals_autograd_of_the_formula(tiny, tmp_path, fast):
    from deltatune.fast import fast_path_enabled
    from deltatune.train.loop import _collated, setup, step

    model_dir, data = tiny
    T, alpha = 2.0, 0.3
    args = TrainArgs(model=str(model_dir), output=str(tmp_path / "run"), max_steps=2, micro_batch=3, grad_accum=2,
                     lr=1e-3, max_grad_norm=0.0, progress=False, device="cpu", teacher="base",
                     distill_temperature=T, distill_weight=alpha, fast=fast)
    said = []
    run = setup(args, DataArgs(data=str(data), max_length=128), dt.LoraConfig(r=4, alpha=8), log=said.append)
    assert run.distill is not None and "position_ids" in run.train_data.examples[0]  # packed rows
    assert fast_path_enabled(run.model) == fast
    assert any("fused head + cross-entropy is off" in m for m in said) == fast
    torch.manual_seed(1)
    params = [p for p in run.model.parameters() if p.requires_grad]
    with torch.no_grad():  # move the adapter off zero, so student and teacher differ
        for p in params:
            p.normal_(0, 0.3)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()  # the teacher, independently

    micro = _collated(run, 0)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    total = 0.0
    for batch in micro:
        s = run.model(**_inputs(batch)).logits.double()
        with torch.no_grad():
            t = base(**_inputs(batch)).logits.double()
        keep = batch["labels"][:, 1:] != -100
        ls, lt = torch.log_softmax(s[:, :-1][keep], -1), t[:, :-1][keep]
        ce = -ls.gather(1, batch["labels"][:, 1:][keep][:, None]).sum()
        ls_T, lt_T = torch.log_softmax(s[:, :-1][keep] / T, -1), torch.log_softmax(lt / T, -1)
        kd = T * T * (lt_T.exp() * (lt_T - ls_T)).sum()
        total = total + ((1 - alpha) * ce + alpha * kd) / targets
    expected = torch.autograd.grad(total, params)
    run.model.zero_grad(set_to_none=True)

    seen = {}
    run.optimizer.register_step_pre_hook(lambda opt, a, kw: seen.update(grads=[p.grad.clone() for p in params]))
    rec = step(run, 0)
    assert len(seen["grads"]) == len(params)
    assert rel_error(torch.cat([g.flatten() for g in seen["grads"]]),
                     torch.cat([g.flatten() for g in expected])) < 1e-5
    assert rec["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    assert rec["loss"] == pytest.approx((1 - alpha) * rec["ce_loss"] + alpha * rec["kd_loss"], rel=1e-6)
    assert rec["kd_loss"] > 1e-3


# -- flags and short runs ------------------------------------------------------------------------------------
def _train_argv(tiny, out, *extra):
    model_dir, data = tiny
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--micro-batch", "4", "--lr", "1e-2", "--max-length", "64", "--device", "cpu",
            "--no-progress", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_flags_parse_and_a_teacher_that_is_a_copy_of_the_base_equals_teacher_base(tiny, tmp_path):
    args, _, _ = parse_train_args(_train_argv(tiny, tmp_path / "x", "--teacher", "base", "--distill-temperature",
                                              "2", "--distill-weight", "0.25")[1:])
    assert (args.teacher, args.distill_temperature, args.distill_weight) == ("base", 2.0, 0.25)
    assert TrainArgs().teacher is None  # off unless asked

    assert main(_train_argv(tiny, tmp_path / "base", "--teacher", "base")) == 0
    assert main(_train_argv(tiny, tmp_path / "copy", "--teacher", str(tiny[0]))) == 0
    a, b = _metrics(tmp_path / "base"), _metrics(tmp_path / "copy")
    assert [r["step"] for r in a] == [1, 2] and all(r["kd_loss"] >= 0 for r in a)
    for ra, rb in zip(a, b):  # the same teacher reached two ways: the same numbers
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key
    assert a[0]["kd_loss"] < 1e-6 < a[1]["kd_loss"]  # LoRA starts as the base: no KL before the first update
    saved = json.loads((tmp_path / "base" / "train_args.json").read_text())
    assert (saved["teacher"], saved["distill_weight"]) == ("base", 0.5)
    assert (tmp_path / "base" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_distillation_settings_fail_clearly(tiny, tmp_path, capsys):
    assert main(_train_argv(tiny, tmp_path / "w", "--teacher", "base", "--distill-weight", "1.5")) == 2
    assert "--distill-weight must be in [0, 1]" in capsys.readouterr().err
    assert main(_train_argv(tiny, tmp_path / "f", "--teacher", "base", "--method", "full")) == 2
    assert "--teacher base needs an adapter method" in capsys.readouterr().err
    # a teacher whose vocabulary is not the student's
    other = tmp_path / "other"
    shutil.copytree(tiny[0], other)
    tok = char_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    assert main(_train_argv(tiny, tmp_path / "v", "--teacher", str(other))) == 2
    assert "tokenizer differs from the student's" in capsys.readouterr().err


# -- distill-data with fixed rewrites ----------------------------------------------------------------------------
GSM = [
    {"question": "Ann has 3 boxes of 24 pens. How many pens?", "answer": "3 * 24 = 72\n#### 72"},
    {"question": "Bob reads 5 pages a day for 6 days. Pages?", "answer": "5 * 6 = 30\n#### 30"},
    {"question": "A cake costs $12, a pie $8. Both?", "answer": "12 + 8 = 20\n#### 20"},
    {"question": "Cal has 1,200 coins and spends 200. Left?", "answer": "1,200 - 200 = 1,000\n#### 1,000"},
    {"question": "Dee runs 4 km twice. Distance?", "answer": "4 * 2 = 8\n#### 8"},
    {"question": "Eve has 9 cats and 0 dogs. Pets?", "answer": "no number here"},
]
REWRITES = [
    Generated("Three boxes with 24 each make 3 * 24 = 72 pens.\n#### 72"),  # kept: same final number
    Generated("He reads 5 + 6 = 11 pages.\n#### 11"),                       # wrong number
    Generated("I do not know."),                                            # no number
    Generated("1200 - 200 leaves 1000 coins in the end"),                   # kept: the last number, commas aside
    Generated("4 + 4 = 8 and then", "length"),                              # cut at max_new_tokens
    Generated("9 pets #### 9"),                                             # the reference has no number
]


def _write_gsm(path, bad_line=True):
    lines = [json.dumps(r) for r in GSM]
    if bad_line:
        lines.insert(2, "{not json")  # an unreadable row passes through as it was
        lines.insert(4, "")
    path.write_text("\n".join(lines) + "\n")
    return path


class Fixed:
    """A generate function returning fixed rewrites in order, remembering the prompts it was given."""

    def __init__(self, outs):
        self.outs, self.prompts = list(outs), []

    def __call__(self, prompts):
        self.prompts += prompts
        return [self.outs.pop(0) for _ in prompts]


def test_distill_data_gsm8k_keeps_exactly_the_rewrites_with_the_same_final_number(tmp_path):
    src, out = _write_gsm(tmp_path / "gsm.jsonl"), tmp_path / "sd" / "gsm.sd.jsonl"
    tok = char_tokenizer()
    gen = Fixed(REWRITES)
    result = distill_data(src, out, tok, gen, check="gsm8k", batch_size=4, log=lambda m: None)
    assert (result.kept, result.total, result.passed) == (2, 6, 1)
    assert result.summary().startswith("kept 2 of 6 rewrites (check: gsm8k final number)")

    src_lines, out_lines = src.read_text().splitlines(), out.read_text().splitlines()
    assert len(out_lines) == len(src_lines)
    rows = [json.loads(line) for line in out_lines if line.strip() and line != "{not json"]
    assert [r["answer"] for r in rows] == [REWRITES[0].text, GSM[1]["answer"], GSM[2]["answer"], REWRITES[3].text,
                                           GSM[4]["answer"], GSM[5]["answer"]]
    assert all(list(r) == ["question", "answer"] for r in rows)  # the same columns
    kept_lines = {0, 5}  # file lines (0-based) of the kept rows
    assert [a for i, a in enumerate(src_lines) if i not in kept_lines] == \
        [b for i, b in enumerate(out_lines) if i not in kept_lines]  # the rest verbatim, the bad line included

    decisions = [json.loads(line) for line in decisions_path(out).read_text().splitlines()]
    assert [d["kept"] for d in decisions] == [True, False, False, False, True, False, False]
    reasons = [d["reason"] for d in decisions]
    assert reasons[2].startswith("bad row: invalid JSON")
    assert reasons[1] == "final number 11 != 30" and reasons[3] == "the rewrite has no final number"
    assert reasons[5] == "cut at --max-new-tokens" and reasons[6] == "the reference has no final number"
    assert decisions[0]["rewrite_answer"] == "72" and decisions[0]["line"] == 1

    prompt = tok.decode(gen.prompts[0])  # the request: the question, the reference, the check's hint
    assert GSM[0]["question"] in prompt and GSM[0]["answer"] in prompt and "#### <number>" in prompt
    assert prompt.rstrip().endswith("assistant")  # the assistant's turn comes next


def test_distill_data_check_none_keeps_every_non_empty_rewrite_and_a_chat_array(tmp_path):
    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
                      {"role": "assistant", "content": "Red."}], "id": 7},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": "user", "content": "Say x"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Say y"}, {"role": "assistant", "content": "y"}]},
    ]
    src, out = tmp_path / "chat.json", tmp_path / "chat.sd.json"
    src.write_text(json.dumps(chats, indent=1))
    gen = Fixed([Generated("Blue, for instance."), Generated("   "), Generated("cut", "length"),
                 Generated("", "refused: too long")])
    tok = char_tokenizer()
    result = distill_data(src, out, tok, gen, check="none", log=lambda m: None)
    assert result.summary().startswith("kept 1 of 4 rewrites (check: none")
    written = json.loads(out.read_text())
    expected = copy.deepcopy(chats)
    expected[0]["messages"][4]["content"] = "Blue, for instance."  # only the last assistant turn
    assert written == expected
    reasons = [json.loads(line)["reason"] for line in decisions_path(out).read_text().splitlines()]
    assert reasons == ["non-empty", "empty rewrite", "cut at --max-new-tokens", "refused: too long"]
    # the context stays: the system turn and the first exchange precede the rewrite request
    prompt = tok.decode(gen.prompts[0])
    assert prompt.index("Be brief.") < prompt.index("Hello!") < prompt.index("Name a colour") < prompt.index("Red.")
    # --keep-truncated judges a cut rewrite like any other
    again = distill_data(src, tmp_path / "k.json", tok, Fixed([Generated("a"), Generated("b"), Generated("c", "length"),
                                                                Generated("d")]),
                         check="none", keep_truncated=True, log=lambda m: None)
    assert again.kept == 4


def test_distill_data_json_keeps_the_same_object_in_any_layout(tmp_path):
    def row(sentence, answer):  # the demo's records (deltatune/demo.py): system, user, one line of JSON
        return {"messages": [{"role": "system", "content": "Extract the record."},
                             {"role": "user", "content": sentence}, {"role": "assistant", "content": answer}]}

    ana = '{"name": "Ana Ortiz", "age": 41, "city": "Lyon"}'
    rows = [row("Meet Ana Ortiz, a 41-year-old from Lyon.", ana)] * 5 + [row("Ben is 7.", "Ben, 7")]
    src, out = tmp_path / "demo.jsonl", tmp_path / "demo.sd.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewrites = ['{"city":"Lyon",\n "name":"Ana Ortiz","age":41}',          # kept: same object, another layout
                '{"name": "Ana Ortiz", "age": 42, "city": "Lyon"}',        # wrong value
                'Ana Ortiz is 41 and lives in Lyon.',                      # not JSON
                '{"name": "Ana Ortiz", "age": "41", "city": "Lyon"}',      # 41 as a string
                ' ' + ana + ' ',                                           # kept: the reference itself
                '{"name": "Ben", "age": 7}']                               # the reference is not JSON
    gen = Fixed([Generated(t) for t in rewrites])
    result = distill_data(src, out, char_tokenizer(), gen, check="json", log=lambda m: None)
    assert result.summary().startswith("kept 2 of 6 rewrites (check: json: the same JSON object")
    written = [json.loads(line)["messages"][2]["content"] for line in out.read_text().splitlines()]
    assert written == [rewrites[0], ana, ana, ana, ana, "Ben, 7"]  # a kept rewrite verbatim, stripped
    decisions = [json.loads(line) for line in decisions_path(out).read_text().splitlines()]
    assert [d["kept"] for d in decisions] == [True, False, False, False, True, False]
    reasons = [d["reason"] for d in decisions]
    assert reasons[0] == reasons[4] == "same JSON object"
    assert reasons[1] == reasons[3] == "JSON object differs at keys ['age']"
    assert reasons[2].startswith("the rewrite is not JSON (Expecting value at char 0")
    assert reasons[5].startswith("the reference is not JSON")
    assert [d.get("same_text") for d in decisions] == [False, False, None, False, True, None]
    assert "JSON object alone" in char_tokenizer().decode(gen.prompts[0])  # the check's hint is asked for


def test_distill_data_refuses_bad_settings_and_files(tmp_path):
    src = _write_gsm(tmp_path / "gsm.jsonl", bad_line=False)
    tok, never = char_tokenizer(), Fixed([])
    with pytest.raises(DistillDataError, match=r"unknown --check 'exact'; choose one of \['gsm8k', 'json', 'none'\]"):
        distill_data(src, tmp_path / "o.jsonl", tok, never, check="exact")
    with pytest.raises(DistillDataError, match="is the input file"):
        distill_data(src, src, tok, never)
    with pytest.raises(DistillDataError, match=r"must contain \['\{reference\}'\]"):
        distill_data(src, tmp_path / "o.jsonl", tok, never, template="Redo: {instruction}")
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "just text"}\n')
    with pytest.raises(DistillDataError, match="no responses to rewrite"):
        distill_data(text, tmp_path / "o.jsonl", tok, never)
    with pytest.raises(DataError, match="no such file"):
        distill_data(tmp_path / "missing.jsonl", tmp_path / "o.jsonl", tok, never)
    assert not (tmp_path / "o.jsonl").exists()


# -- distill-data through the real engine ------------------------------------------------------------------------
def test_distill_data_command_through_the_engine(tiny, tmp_path, capsys, monkeypatch):
    from deltatune.serve.engine import Engine
    from deltatune.train.chat import prompt_ids

    small = Engine.from_pretrained.__func__  # a small KV cache: the default 1 GiB on the CPU takes seconds to set up
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, path, **kw: small(cls, path, num_blocks=64,
                                                                                             **kw)))

    model_dir, _ = tiny
    rows = [{"instruction": "repeat one", "output": "one one"}, {"instruction": "repeat two", "output": "two two"},
            {"instruction": "x" * 300, "output": "too long for the model"}]  # past max_position_embeddings (256)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = "{instruction} | {reference} | again:"
    argv = ["distill-data", "--model", str(model_dir), "--data", str(src), "--output", str(out), "--check", "none",
            "--template", template, "--max-new-tokens", "6", "--keep-truncated", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    decisions = [json.loads(x) for x in decisions_path(out).read_text().splitlines()]
    assert decisions[2]["reason"].startswith("refused: the prompt has")
    # each rewrite is the engine's own greedy continuation of the rewrite request
    engine = Engine.from_pretrained(str(model_dir), device="cpu")
    for row, d in zip(rows[:2], decisions):
        ask = template.replace("{instruction}", row["instruction"]).replace("{reference}", row["output"])
        want = engine.generate([prompt_ids(engine.tokenizer, [{"role": "user", "content": ask}])],
                               max_new_tokens=6)[0].text
        assert d["rewrite"] == want
        assert d["kept"] == bool(want.strip())
    kept = sum(d["kept"] for d in decisions)
    assert f"kept {kept} of 3 rewrites (check: none" in line
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["output"] for w in written] == [d["rewrite"].strip() if d["kept"] else r["output"]
                                              for r, d in zip(rows, decisions)]
    # a clear error for an unknown check, before any model loads
    assert main(argv[:7] + ["--check", "bogus"]) == 2
    assert "unknown --check 'bogus'" in capsys.readouterr().err
