"""Block expansion (LLaMA-Pro): identity at init (logits and greedy decoding with a KV cache) on Llama and
a Qwen2 with per-layer sliding windows, only the new blocks train, disabled() and remove_adapter give the
base back, the adapter file round trip, the merged export loading in transformers with the expanded
model's logits, bad input, and `deltatune train --method block_expansion` where only new blocks change."""

import copy
import json

import pytest
import torch
import transformers

import deltatune as dt
from deltatune.methods.block_expansion import ExpandedLayers, even_positions

from _models import VOCAB, inputs, output

L = 4


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2)).eval()


def qwen2():
    """Layers 0-1 full attention, 2-3 a window of 3 tokens: a layer type off by one block changes outputs."""
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=2,
        initializer_range=0.2)).eval()


MODELS = {"llama": llama, "qwen2": qwen2}


def greedy(model, ids, use_cache=True):
    return model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)


def perturb(model, name="default"):
    """Move the adapter's parameters off their init (as training would), reproducibly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dt.adapter_params(model, name):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_even_positions_are_llama_pro_groups():
    assert even_positions(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]  # LLaMA-Pro 8B: 32 layers, 8 groups
    assert even_positions(4, 2) == [1, 3]
    assert even_positions(30, 4) == [6, 14, 21, 29]  # SmolLM2: groups of 7 or 8
    assert even_positions(5, 1) == [4]


@pytest.mark.parametrize("train", ["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_identity_at_init_and_cache_consistent(arch, train):
    base = MODELS[arch]()
    model = copy.deepcopy(base)
    batch = inputs(arch)
    ids = batch["input_ids"][:, :6]
    dt.add_adapter(model, dt.BlockExpansionConfig(positions=[0, 1], train=train))
    layers = model.model.layers
    assert isinstance(layers, ExpandedLayers) and len(layers) == L + 2 == model.config.num_hidden_layers
    assert [b.self_attn.layer_idx for b in layers] == list(range(L + 2))  # each block its own cache slot
    assert layers.is_new == [False, True, False, True, False, False]
    if arch == "qwen2":  # the copies have their sources' types; the base blocks keep theirs
        assert model.config.layer_types == ["full_attention"] * 4 + ["sliding_attention"] * 2
        assert [b.self_attn.sliding_window for b in layers] == [None] * 4 + [3, 3]
    assert torch.equal(output(model, batch), output(base, batch))  # exact: the new blocks add zeros
    assert torch.equal(greedy(model, ids), greedy(base, ids))
    perturb(model)
    assert not torch.allclose(output(model, batch), output(base, batch), atol=1e-3)
    # trained new blocks: decoding with the cache (one slot per block, the right window per layer) agrees
    # with recomputing every position without one
    assert torch.equal(greedy(model, ids), greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("train", ["full", "lora"])
def test_only_the_new_blocks_train(train):
    model = llama()
    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=2, train=train))  # after layers 1 and 3
    layers = model.model.layers
    new = [k for k, is_new in enumerate(layers.is_new) if is_new]
    assert new == [2, 5]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {id(p) for p in dt.adapter_params(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.5.")) for n in trainable)
    if train == "full":
        own = {n for n, _ in layers[2].named_parameters(prefix="model.layers.2")}
        assert own <= trainable
        assert torch.count_nonzero(layers[2].self_attn.o_proj.weight) == 0
        assert torch.count_nonzero(layers[5].mlp.down_proj.weight) == 0
        assert torch.equal(layers[2].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight)  # a copy
        assert layers[2].self_attn.q_proj.weight is not layers[1].self_attn.q_proj.weight
    else:
        assert all(".deltas.default." in n for n in trainable)  # LoRA only; the copies stay frozen
        assert len(trainable) == 2 * 7 * 2  # A and B on 7 linears of 2 blocks
    batch = inputs("llama")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and got <= trainable
    # at init the zero output projections (or their LoRA B) are where the gradient first arrives
    writers = {n for n in got if "o_proj" in n or "down_proj" in n}
    assert writers


def test_disabled_gives_the_base_and_remove_restores_it():
    base = llama()
    model = copy.deepcopy(base)
    keys = list(model.state_dict())
    batch = inputs("llama")
    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=2, train="lora"))
    perturb(model)
    trained = output(model, batch)
    with dt.disabled(model):
        assert torch.equal(output(model, batch), output(base, batch))
        assert torch.equal(greedy(model, batch["input_ids"][:, :5]), greedy(base, batch["input_ids"][:, :5]))
    assert torch.equal(output(model, batch), trained)
    dt.remove_adapter(model, "default")
    assert type(model.model.layers) is torch.nn.ModuleList and len(model.model.layers) == L
    assert list(model.state_dict()) == keys and model.config.num_hidden_layers == L
    assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(L))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, dt.DeltaLayer) for m in model.modules())
    assert torch.equal(output(model, batch), output(base, batch))


@pytest.mark.parametrize("train", ["full", "lora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_file_round_trip_and_merged_export_loads_in_transformers(arch, train, tmp_path):
    from deltatune.train.outputs import save_merged

    base = MODELS[arch]()
    model = copy.deepcopy(base)
    batch = inputs(arch)
    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=2, train=train))
    perturb(model)
    expected = output(model, batch)
    dt.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["deltatune_method"] == "block_expansion" and saved["config"]["num_blocks"] == 2
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    if train == "full":  # the merged model's own keys of new blocks 2 and 5 (after layers 1 and 3)
        assert "model.layers/2.self_attn.o_proj.weight" in keys and "model.layers/5.mlp.down_proj.weight" in keys
        assert not any(k.startswith(("model.layers/0.", "model.layers/1.", "model.layers/3.")) for k in keys)
    else:
        assert "model.layers.2.self_attn.o_proj/B" in keys and len(keys) == 2 * 7 * 2

    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(output(fresh, batch), expected)

    save_merged(fresh, None, tmp_path / "merged")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.num_hidden_layers == L + 2 and len(plain.model.layers) == L + 2
    if arch == "qwen2":
        assert plain.config.layer_types == fresh.config.layer_types
    torch.testing.assert_close(output(plain, batch), expected, rtol=1e-4, atol=1e-4)  # LoRA folded in: fp32 rounding
    ids = batch["input_ids"][:, :6]
    assert torch.equal(greedy(plain, ids), greedy(fresh, ids))
    assert len(fresh.model.layers) == L + 2 and not fresh.model.layers.merged  # the export left it as it was


def test_bad_input_is_refused_before_anything_changes(tmp_path):
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        dt.BlockExpansionConfig()
    with pytest.raises(ValueError, match="num_blocks=3 but 2 positions"):
        dt.BlockExpansionConfig(num_blocks=3, positions=[0, 1])
    with pytest.raises(ValueError, match="repeat a layer"):
        dt.BlockExpansionConfig(positions=[1, 1])
    with pytest.raises(ValueError, match="train must be"):
        dt.BlockExpansionConfig(num_blocks=1, train="half")
    model = llama()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="position 4 is past the last of the 4 layers"):
        dt.add_adapter(model, dt.BlockExpansionConfig(positions=[4]))
    with pytest.raises(ValueError, match="at most one block per layer"):
        dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=5))
    with pytest.raises(ValueError, match="match"):
        dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=1, train="lora", targets=["nothing"]))
    assert list(model.state_dict()) == keys and model.config.num_hidden_layers == L and not dt.list_adapters(model)

    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=1))
    with pytest.raises(ValueError, match="one block expansion per model"):
        dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=1), name="again")
    dt.save_adapter(model, tmp_path / "a")

    lora_first = llama()
    dt.add_adapter(lora_first, dt.LoraConfig(targets=["q_proj"]), name="lora")
    with pytest.raises(ValueError, match="before other adapters"):
        dt.add_adapter(lora_first, dt.BlockExpansionConfig(num_blocks=1), name="blocks")

    from deltatune.quant import quantize_model

    quantized = quantize_model(llama(), kind="nf4")
    with pytest.raises(ValueError, match="quantized base"):
        dt.add_adapter(quantized, dt.BlockExpansionConfig(num_blocks=1))

    deeper = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=L + 2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(dt.AdapterFileError, match="model.layers/4"):  # the copy lands elsewhere on 6 layers
        dt.load_adapter(deeper, tmp_path / "a")
    assert len(deeper.model.layers) == L + 2 and not dt.list_adapters(deeper)
    with pytest.raises(ValueError, match="no list of decoder blocks"):
        dt.add_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)), dt.BlockExpansionConfig(num_blocks=1))


def test_cli_train_changes_only_the_new_blocks(tmp_path):
    pytest.importorskip("jsonargparse")
    from safetensors.torch import load_file

    from deltatune.cli import main
    from test_train import make_tiny_llama, write_task

    model_dir, data = make_tiny_llama(tmp_path / "model"), write_task(tmp_path / "task.jsonl", n=8)
    out = tmp_path / "run"
    assert main(["train", "--method", "block_expansion", "--num-blocks", "1", "--model", str(model_dir),
                 "--data", str(data), "--output", str(out), "--micro-batch", "2", "--max-length", "64",
                 "--max-steps", "3", "--lr", "0.01", "--device", "cpu", "--no-progress"]) == 0
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3  # 2 + 1: the new block follows layer 1 (the last)
    for key, value in before.items():  # every base tensor unchanged, under its own (here unshifted) key
        assert torch.equal(after[key], value), key
    new = {k: v for k, v in after.items() if k.startswith("model.layers.2.")}
    assert set(new) == {k.replace("model.layers.1.", "model.layers.2.") for k in before if k.startswith("model.layers.1.")}
    assert torch.count_nonzero(new["model.layers.2.self_attn.o_proj.weight"]) > 0  # trained off its zero init
    assert torch.count_nonzero(new["model.layers.2.mlp.down_proj.weight"]) > 0
    assert set(after) - set(before) == set(new)


@pytest.mark.slow
def test_smollm2_identity_at_init(smollm2):
    base, tok = smollm2
    model = copy.deepcopy(base)
    dt.add_adapter(model, dt.BlockExpansionConfig(num_blocks=2))  # 30 layers: after layers 14 and 29
    assert len(model.model.layers) == 32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert torch.equal(greedy(model, ids), greedy(base, ids))
