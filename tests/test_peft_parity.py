"""Adapters made by PEFT load into deltatune with the same outputs, and the other way round.

The oracle is the real ``peft`` package; models are real transformers architectures (random small
configs, and the pretrained SmolLM2-135M-Instruct).
"""

import copy
import json
import warnings

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import _models  # noqa: E402  (needs transformers)

TOL = 1e-5


def _llama():
    return _models.llama(), "all-linear", None


def _qwen2():
    return _models.qwen2(), ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], None


def _gpt2():
    return _models.gpt2(), ["c_attn", "c_proj", "c_fc", "wte"], None


def _bert():  # the classification head trained in full
    return _models.bert(), ["query", "value", "dense"], ["classifier"]


def _convnet():
    return _models.ConvNet(), ["conv1", "conv2", "fc"], None


MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert, "convnet": _convnet}


_inputs, _output = _models.inputs, _models.output


def _peft_adapter(base, targets, saved, r=4):
    cfg = peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, modules_to_save=saved,
                          init_lora_weights=False, rank_pattern={"value": 2} if saved else {}, use_rslora=bool(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    if saved:  # make the saved copy differ from the original head
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.1)
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_peft_made_adapter_loads_into_deltatune(name, tmp_path):
    torch.manual_seed(0)
    base, targets, saved = MODELS[name]()
    base.eval()
    inputs = _inputs(name)
    reference = _peft_adapter(base, targets, saved)
    reference.save_pretrained(tmp_path)
    expected = _output(reference, inputs)

    ours = dt.load_adapter(copy.deepcopy(base), tmp_path)
    got = _output(ours, inputs)
    assert (got - _output(base, inputs)).abs().max() > 1e-3  # the adapter does something
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_deltatune_adapter_loads_into_peft(name, tmp_path):
    torch.manual_seed(0)
    base, targets, saved = MODELS[name]()
    base.eval()
    inputs = _inputs(name)
    ours = copy.deepcopy(base)
    cfg = dt.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=saved, init="random",
                        rank_pattern={"value": 2} if saved else {}, use_rslora=bool(saved))
    dt.add_adapter(ours, cfg)
    if saved:
        with torch.no_grad():
            for p in dt.adapter_params(ours):
                p.add_(0.05)
    ours.eval()
    expected = _output(ours, inputs)
    dt.save_adapter(ours, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _output(loaded, inputs)
    assert (expected - _output(base, inputs)).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= TOL
    # PEFT resolved exactly the modules we adapted
    ours_targets = {n for n, _ in dt.adapters.delta_layers(ours)}
    peft_targets = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours_targets == peft_targets


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_peft_auto_classes_load_our_adapter_alone(name, tmp_path):
    """``AutoPeftModelFor*.from_pretrained(adapter_dir)``, nothing else given: the config names the base
    (the local directory the model was loaded from) and the task type."""
    torch.manual_seed(0)
    base, targets, saved = MODELS[name]()
    base.save_pretrained(tmp_path / "base")
    cls = type(base)
    ours = cls.from_pretrained(tmp_path / "base").eval()
    inputs = _inputs(name)
    dt.add_adapter(ours, dt.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=saved, init="random"))
    expected = _output(ours, inputs)
    dt.save_adapter(ours, tmp_path / "adapter")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tmp_path / "base")
    assert raw["task_type"] == {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}[name]
    auto = {"llama": peft.AutoPeftModelForCausalLM, "bert": peft.AutoPeftModelForSequenceClassification}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = auto.from_pretrained(tmp_path / "adapter").eval()
    assert (expected - _output(base.eval(), inputs)).abs().max() > 1e-3
    assert (_output(loaded, inputs) - expected).abs().max().item() <= TOL


def test_all_linear_selects_what_peft_selects():
    torch.manual_seed(0)
    base, _, _ = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(dt.adapters.select_targets(base, dt.LoraConfig(targets="all-linear"))) == peft_targets


@pytest.mark.slow
def test_smollm2_both_directions(smollm2, tmp_path):
    base, tok = smollm2
    inputs = tok(["The capital of France is", "LoRA adds a low-rank"], return_tensors="pt", padding=True)
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    reference = _peft_adapter(base, targets, None, r=8)
    reference.save_pretrained(tmp_path / "peft")
    expected = _output(reference, inputs)
    del reference

    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    got = _output(ours, inputs)
    assert (got - expected).abs().max().item() <= TOL

    dt.save_adapter(ours, tmp_path / "ours")
    del ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert (_output(back, inputs) - expected).abs().max().item() <= TOL
