"""Virtual-token adapters through the common verbs (add / set_active / disabled / remove / merge / save /
load), the training batch (packed rows split, masks and labels extended), bad input, and a P-tuning
run that resumes from its saved adapter (the encoder is in the file)."""

import copy
import json

import pytest
import torch

import deltatune as dt
from deltatune.formats.files import AdapterFileError

transformers = pytest.importorskip("transformers")
import _models  # noqa: E402
from _prompts import TOL, batch, logits_and_loss  # noqa: E402

CONFIGS = {
    "prompt_tuning": lambda: dt.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: dt.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=8),
    "prefix_tuning": lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, projection=True, encoder_hidden_size=8),
}


def _llama():
    torch.manual_seed(0)
    return _models.llama().eval()


@pytest.mark.parametrize("method", CONFIGS)
def test_verbs_train_switch_disable_save_and_remove_exactly(method, tmp_path):
    model = _llama()
    base = copy.deepcopy(model)
    keys, flags = list(model.state_dict()), [p.requires_grad for p in model.parameters()]
    inputs = batch("llama")
    base_logits, _ = logits_and_loss(base, inputs)
    dt.add_adapter(model, CONFIGS[method]())
    assert all(isinstance(m, dt.AdapterModule) for _, m in dt.adapter_modules(model))
    # only the adapter's parameters train, and all of them get gradients
    trainable = {id(p) for p in dt.adapter_params(model)}
    assert trainable and {id(p) for p in model.parameters() if p.requires_grad} == trainable
    model(**inputs).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dt.adapter_params(model))
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    model.zero_grad(set_to_none=True)

    logits, _ = logits_and_loss(model, inputs)
    with dt.disabled(model):
        torch.testing.assert_close(logits_and_loss(model, inputs)[0], base_logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge(model)
    # a second adapter of another kind: switching picks it, switching back gives the first's outputs
    dt.add_adapter(model, dt.PromptTuningConfig(num_virtual_tokens=2), name="other")
    assert logits_and_loss(model, inputs)[0].shape[1] == 2 + 9
    with pytest.raises(ValueError, match="one at a time"):
        dt.set_active(model, ["default", "other"])
        model(**inputs)
    dt.set_active(model, "default")
    torch.testing.assert_close(logits_and_loss(model, inputs)[0], logits)
    # save/load round trip into a fresh base
    dt.save_adapter(model, tmp_path)
    fresh = dt.load_adapter(copy.deepcopy(base), tmp_path, name="loaded")
    torch.testing.assert_close(logits_and_loss(fresh, inputs)[0], logits, atol=TOL, rtol=0)
    # removing both restores the module tree, the keys, the flags and the outputs (the hook is gone)
    dt.remove_adapter(model, "other")
    dt.remove_adapter(model, "default")
    assert not hasattr(model, "virtual_tokens") and list(model.state_dict()) == keys
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model._forward_pre_hooks
    torch.testing.assert_close(logits_and_loss(model, inputs)[0], base_logits)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_packed_rows_train_as_one_example_a_row(method):
    """prepare_batch splits packed rows, so every example gets its own virtual tokens: the summed loss
    equals that of the same examples collated one a row."""
    from deltatune.adapters import prepare_batch
    from deltatune.train.data import collate
    from deltatune.train.evaluate import batch_loss
    from deltatune.train.packing import pack

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 7, 4, 6):
        ids = torch.randint(3, _models.VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    model = dt.add_adapter(_llama(), CONFIGS[method]())
    packed = collate(pack(examples, 12), 0, "causal-lm")
    assert packed["input_ids"].shape[0] < len(examples)
    loss_packed, n_packed, _ = batch_loss(model, prepare_batch(model, packed), "causal-lm", "cpu", _null)
    loss_rows, n_rows, _ = batch_loss(model, prepare_batch(model, collate(examples, 0, "causal-lm")), "causal-lm",
                                      "cpu", _null)
    assert n_packed == n_rows and abs(loss_packed.item() - loss_rows.item()) <= 1e-4 * loss_rows.item()
    # evaluation counts each example once, packed or not (exact match over the split rows)
    from deltatune.train.data import Dataset
    from deltatune.train.evaluate import evaluate

    model.eval()  # one example exactly right: its targets are the model's own greedy continuation
    seq = model.generate(input_ids=torch.tensor([examples[0]["input_ids"][:1]]), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)[0].tolist()
    examples[0] = {"input_ids": seq, "labels": [-100] + seq[1:]}
    packed_eval = evaluate(model, Dataset(pack(examples, 12), "causal-lm"), batch_size=2)
    rows_eval = evaluate(model, Dataset(examples, "causal-lm"), batch_size=2)
    assert packed_eval["exact_match"] == rows_eval["exact_match"] == 0.25


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_prompt_longer_than_the_context_is_refused():
    torch.manual_seed(0)
    gpt2 = _models.gpt2().eval()  # 64 positions
    with pytest.raises(ValueError, match="no room for input in the model's context of 64"):
        dt.add_adapter(gpt2, dt.PromptTuningConfig(num_virtual_tokens=64))
    assert not dt.list_adapters(gpt2)
    dt.add_adapter(gpt2, dt.PTuningConfig(num_virtual_tokens=60, encoder_hidden_size=8))
    with pytest.raises(ValueError, match=r"60 virtual tokens \+ 9 input tokens = 69 positions, longer than the "
                                         r"model's context of 64"):
        gpt2(input_ids=_models.inputs("gpt2")["input_ids"])


def _saved(tmp_path, cfg):
    model = dt.add_adapter(_llama(), cfg)
    return dt.save_adapter(model, tmp_path / "ad")


def _rewrite(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_file_of_another_method_or_model_is_refused_naming_the_key(tmp_path):
    directory = _saved(tmp_path, dt.PromptTuningConfig(num_virtual_tokens=4))
    _rewrite(directory, peft_type="PREFIX_TUNING")  # a prompt's table read as a prefix
    model = _llama()
    with pytest.raises(AdapterFileError, match=r"key 'prompt_embeddings' has shape \(4, 32\), but prefix_tuning"):
        dt.load_adapter(model, directory)
    _rewrite(directory, peft_type="P_TUNING")  # P-tuning from the output only is PEFT's own case: a table
    dt.load_adapter(model, directory)
    assert model.virtual_tokens.encoders["default"].table
    with pytest.raises(AdapterFileError, match="shape"):
        dt.load_adapter(_models.gpt2(), _saved(tmp_path / "x", dt.PrefixTuningConfig(num_virtual_tokens=4)))

    directory = _saved(tmp_path / "p", dt.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    assert "deltatune_encoder.mlp_head.0.weight" in tensors  # the encoder travels with PEFT's prompt_embeddings
    del tensors["deltatune_encoder.mlp_head.0.weight"]
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    model = _llama()
    with pytest.raises(AdapterFileError, match="encoder's weights are incomplete"):
        dt.load_adapter(model, directory)
    assert not dt.list_adapters(model) and not hasattr(model, "virtual_tokens")
    _rewrite(directory, num_transformer_submodules=2)
    with pytest.raises(AdapterFileError, match="encoder-decoder"):
        dt.load_adapter(model, directory)


def test_ptuning_run_resumes_from_its_saved_adapter(tmp_path):
    """A short P-tuning run (--method ptuning) saves the encoder and --resume continues it; the adapter
    loads as trainable with its encoder (not a table) and training continues from there, lowering the loss."""
    from test_train import make_tiny_llama, write_task

    from deltatune.train import DataArgs, TrainArgs, train

    model_dir, data = make_tiny_llama(tmp_path / "model"), write_task(tmp_path / "task.jsonl")
    cfg = dt.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16)
    args = TrainArgs(model=str(model_dir), output=str(tmp_path / "run"), method="ptuning", max_steps=4, micro_batch=4,
                     lr=1e-2, save_every=2, progress=False, device="cpu")
    logs = []
    res = train(args, DataArgs(data=str(data), max_length=64), cfg, log=logs.append)
    assert res.status == "done" and (res.adapter / "adapter_config.json").is_file()
    res = train(args.__class__(**{**args.__dict__, "max_steps": 6, "resume": True}), DataArgs(data=str(data), max_length=64),
                cfg, log=logs.append)
    assert res.status == "done" and res.step == 6

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["repeat two two", "repeat six six"], return_tensors="pt")["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    dt.load_adapter(model, res.adapter, trainable=True)
    encoder = model.virtual_tokens.encoders["default"]
    assert not encoder.table and hasattr(encoder, "lstm_head")
    assert all(p.requires_grad for p in dt.adapter_params(model))
    opt = torch.optim.AdamW(dt.adapter_params(model), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_rows_of_one_batch_take_different_adapters(method):
    """The virtual tokens are a per-row input: one call with rows of adapters "a" and "b" (``feed``)
    gives each row what a call with that adapter alone gives (the serving seam)."""
    model = _llama()
    make = CONFIGS[method]
    dt.add_adapter(model, make(), name="a")
    dt.add_adapter(model, make(), name="b")
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    alone = {}
    for name in ("a", "b"):
        dt.set_active(model, name)
        alone[name] = logits_and_loss(model, inputs)[0]
    mixed = model.virtual_tokens.feed(inputs, rows=["b", "a"])
    got = logits_and_loss(model, mixed)[0]  # the hook ("b" active) takes the fed call as prepared
    assert (got[0] - alone["b"][0]).abs().max() <= TOL and (got[1] - alone["a"][1]).abs().max() <= TOL
    assert (alone["a"] - alone["b"]).abs().max() > 100 * TOL


def test_classification_prompt_with_its_head_both_ways_with_peft(tmp_path):
    """BERT sequence classification: a prompt plus a fully trained head (modules_to_save), PEFT's
    SEQ_CLS files both ways (PEFT lists its default head names whether the model has them or not)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _models.bert().eval()
    ids = _models.inputs("bert")["input_ids"]
    inputs = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}
    ours = dt.add_adapter(copy.deepcopy(base), dt.PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["classifier"]))
    with torch.no_grad():
        ours.classifier.copies["default"].weight.mul_(3)
    dt.save_adapter(ours.eval(), tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    assert (logits_and_loss(ours, inputs)[0] - logits_and_loss(theirs, inputs)[0]).abs().max() <= TOL
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=4, modules_to_save=["classifier"])).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert (logits_and_loss(ours, inputs)[0] - logits_and_loss(theirs, inputs)[0]).abs().max() <= TOL


def test_training_switches_the_fast_path_off_and_refuses_checkpointing_a_prefix():
    from deltatune.train import TrainArgs, TrainError
    from deltatune.train.prepare import enable_checkpointing, enable_fast

    model = dt.add_adapter(_llama(), CONFIGS["prefix_tuning"]())
    logs = []
    assert enable_fast(model, TrainArgs(method="prefix_tuning", fast=True), torch.device("cpu"), logs.append) is False
    assert logs and "fast path off: ['prefix_tuning']" in logs[0]
    with pytest.raises(TrainError, match="gradient-checkpointing does not combine with prefix tuning"):
        enable_checkpointing(model)
    with pytest.raises(TrainError, match="--merge"):
        from deltatune.train.prepare import prepare_model

        prepare_model(_llama(), TrainArgs(method="prompt_tuning", merge=True))
