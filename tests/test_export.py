"""Merged models, full fine-tunes and GGUF files from any base we load, a GGUF base included.

A tiny random Llama with a byte-level BPE tokenizer is made here, written as GGUF by our own writer
(read back by transformers' GGUF loader) and used as the base of LoRA and full runs; SmolLM2-135M's
real GGUF is used only under ``slow``.
"""

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.formats.gguf_export import GGUFExportError, write_gguf
from deltatune.train import DataArgs, TrainArgs, TrainError, train
from deltatune.train.outputs import RUN_INFO, check_outputs

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TOL = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}
"""Largest logit error relative to the largest logit, by weight type of the file."""
TEXT = "repeat one two three four, then 42 and 7"


def byte_bpe_tokenizer():
    """A byte-level BPE tokenizer (GGUF's "gpt2" model) trained here on a few words; no download."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = ["repeat one two three four five six seven eight", TEXT, "the quick brown fox 0123456789"]
    bpe.train_from_iterator(corpus * 10, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<pad>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<pad>")


def tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=tie, initializer_range=0.2, eos_token_id=0, pad_token_id=1,
                                   bos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def load_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory, tok):
    """A tiny Llama as an f16 GGUF file, and its data file: the base of the runs below."""
    root = tmp_path_factory.mktemp("gguf_base")
    model = tiny_llama()
    path = write_gguf(root / "base" / "tiny.gguf", model.config, model.state_dict(), tok, dtype="f16")
    rows = [{"instruction": f"repeat {w}", "input": "", "output": f"{w} {w}"}
            for w in ["one", "two", "three", "four"] * 4]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, data


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_export_reads_back_with_equal_logits(tmp_path, tok, dtype, tie):
    model = tiny_llama(tie)
    path = write_gguf(tmp_path / f"m.{dtype}.gguf", model.config, model.state_dict(), tok, dtype=dtype)
    back = load_gguf(path)
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    err = rel_err(logits(back, ids), logits(model, ids))
    assert err <= TOL[dtype], f"{dtype}: relative logit error {err:.2e}"
    assert back.config.tie_word_embeddings == tie
    # the tokenizer travels in the file: transformers rebuilds one that gives the same ids
    tok_back = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok_back([TEXT])["input_ids"] == tok([TEXT])["input_ids"]
    assert tok_back.eos_token == "<|endoftext|>"


def test_gguf_q8_0_is_smaller_and_looser_than_f16(tmp_path, tok):
    model = tiny_llama()
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    sizes, errs = {}, {}
    for dtype in ("f16", "q8_0"):
        path = write_gguf(tmp_path / f"{dtype}.gguf", model.config, model.state_dict(), tok, dtype=dtype)
        sizes[dtype], errs[dtype] = path.stat().st_size, rel_err(logits(load_gguf(path), ids), logits(model, ids))
    assert sizes["q8_0"] < 0.7 * sizes["f16"] and errs["f16"] < errs["q8_0"]


def test_gguf_export_refuses_other_architectures(tmp_path, tok):
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=4)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(GGUFExportError, match="Llama-family.*'gpt2'"):
        write_gguf(tmp_path / "g.gguf", gpt2.config, gpt2.state_dict(), tok)
    llama = tiny_llama()
    llama.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(GGUFExportError, match="RoPE type 'llama3'"):
        write_gguf(tmp_path / "r.gguf", llama.config, llama.state_dict(), tok)
    with pytest.raises(GGUFExportError, match="dtype 'q4'"):
        write_gguf(tmp_path / "q.gguf", llama.config, llama.state_dict(), tok, dtype="q4")
    assert not list(tmp_path.iterdir())  # nothing half-written


def run_args(base, data, out, **kw):
    settings = dict(model=str(base), data=str(data), output=str(out), max_steps=3, micro_batch=4, lr=2e-2,
                    max_length=64, save_every=0, progress=False, device="cpu")
    settings.update(kw)
    train_fields = {f for f in TrainArgs.__dataclass_fields__}
    data_fields = {f for f in DataArgs.__dataclass_fields__}
    lora = {k: v for k, v in settings.items() if k not in train_fields | data_fields}
    return (TrainArgs(**{k: v for k, v in settings.items() if k in train_fields}),
            DataArgs(**{k: v for k, v in settings.items() if k in data_fields}),
            dt.LoraConfig(**lora) if settings.get("method", "lora") == "lora" else None)


def test_lora_on_gguf_base_merges_exports_and_records(tmp_path, gguf_base, tok, capsys):
    base_path, data = gguf_base
    res = train(*run_args(base_path, data, tmp_path / "run", merge=True, r=4, alpha=8), log=lambda s: None)
    adapter = res.adapter
    info = json.loads((adapter / RUN_INFO).read_text())
    assert info["base_model"] == str(base_path.resolve())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_path.parent.resolve())
    assert config["task_type"] == "CAUSAL_LM"

    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    adapted = dt.load_adapter(load_gguf(base_path), adapter)
    expected = logits(adapted, ids)
    # train --merge: a plain safetensors directory, tokenizer included, no GGUF marker left
    merged_dir = tmp_path / "run" / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(merged_dir)([TEXT])["input_ids"] == tok([TEXT])["input_ids"]

    # deltatune merge and deltatune export, as the README shows them
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m2")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m2").eval()
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-4, atol=1e-4)
    out = tmp_path / "gguf" / "merged.gguf"
    assert main(["export", "--adapter", str(adapter), "--output", str(out), "--dtype", "f16"]) == 0
    assert "GGUF file written" in capsys.readouterr().out
    exported = load_gguf(out)
    assert rel_err(logits(exported, ids), expected) <= TOL["f16"]
    base_logits = logits(load_gguf(base_path), ids)
    assert rel_err(logits(exported, ids), base_logits) > 10 * TOL["f16"]  # the adapter is in the file
    assert out.read_bytes() != base_path.read_bytes()
    # a merged directory exports too
    out2 = tmp_path / "gguf" / "from-dir.gguf"
    assert main(["export", "--model", str(tmp_path / "m2"), "--output", str(out2), "--dtype", "q8_0"]) == 0
    assert rel_err(logits(load_gguf(out2), ids), expected) <= TOL["q8_0"]


def test_full_fine_tune_on_gguf_base_writes_a_loadable_model(tmp_path, gguf_base, tok):
    base_path, data = gguf_base
    res = train(*run_args(base_path, data, tmp_path / "run", method="full", lr=1e-3), log=lambda s: None)
    assert res.adapter == tmp_path / "run" / "model" and (res.adapter / RUN_INFO).is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(res.adapter).eval()
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    assert rel_err(logits(loaded, ids), logits(load_gguf(base_path), ids)) > 1e-3  # it trained
    out = tmp_path / "full.gguf"
    assert main(["export", "--model", str(res.adapter), "--output", str(out)]) == 0
    assert rel_err(logits(load_gguf(out), ids), logits(loaded, ids)) <= TOL["f16"]


def test_a_failed_export_leaves_the_run_record(tmp_path, gguf_base, monkeypatch):
    """The adapter and deltatune_train.json are written before the merged model, so eval still works."""
    import deltatune.train.outputs as outputs

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "save_merged", broken)
    base_path, data = gguf_base
    with pytest.raises(OSError, match="No space"):
        train(*run_args(base_path, data, tmp_path / "run", merge=True, r=2, max_steps=1), log=lambda s: None)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / RUN_INFO).is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert main(["eval", "--adapter", str(adapter), "--data", str(data), "--max-length", "64"]) == 0


def test_outputs_are_checked_before_training(tmp_path, gguf_base):
    blocked = tmp_path / "file"
    blocked.write_text("")
    args, _, _ = run_args("m", "d", blocked / "out", merge=True)
    with pytest.raises(TrainError, match="cannot write there"):
        check_outputs(tiny_llama(), args, blocked / "out")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    args, _, _ = run_args("m", "d", tmp_path / "ok", merge=True)
    with pytest.raises(TrainError, match="--merge: Sequential has no Hugging Face config"):
        check_outputs(plain, args, tmp_path / "ok")
    check_outputs(tiny_llama(), args, tmp_path / "ok")  # a transformers model: fine


def test_export_command_errors_are_short(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(tmp_path), "--output", str(tmp_path / "x.bin")])
    assert e.value.code == 2 and "ends in .gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "--output", str(tmp_path / "x.gguf")])
    assert e.value.code == 2 and "--adapter or --model are required" in capsys.readouterr().err


def test_peft_auto_class_loads_an_adapter_on_a_gguf_base(tmp_path, gguf_base, tok):
    """PEFT users pass the GGUF file's name: the adapter records the directory holding it."""
    peft = pytest.importorskip("peft")
    base_path, data = gguf_base
    res = train(*run_args(base_path, data, tmp_path / "run", r=4, alpha=8), log=lambda s: None)
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    expected = logits(dt.load_adapter(load_gguf(base_path), res.adapter), ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(res.adapter, gguf_file=base_path.name,
                                                               dtype=torch.float32).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_gguf_export_keeps_the_vocabulary(smollm2, tmp_path):
    from deltatune.assets import smollm2_gguf
    from deltatune.train.outputs import export_gguf

    model, tok = smollm2
    path = export_gguf(model, tok, tmp_path / "smollm2.gguf", dtype="f16", vocab_from=smollm2_gguf())
    back = load_gguf(path)
    ids = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    assert rel_err(logits(back, ids), logits(model, ids)) <= TOL["f16"]
