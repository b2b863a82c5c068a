"""QLoRA end to end on the real SmolLM2-135M: NF4 base + LoRA trains, and the merged export agrees."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.train.optim import AdamW
from deltatune.train.report import count_params


@pytest.mark.slow
def test_qlora_smollm2_loss_falls(smollm2, shared_data):
    base, tok = smollm2
    model = copy.deepcopy(base)
    # The first 10 of the 30 real blocks: the dequantize-per-forward reference path on 2 CPU cores
    # is what dominates, and the check (LoRA on an NF4 base learns) does not need all of them.
    model.model.layers = model.model.layers[:10]
    model.config.num_hidden_layers = 10
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    batch = torch.stack([ids[i * 32:(i + 1) * 32] for i in range(4)])  # 4 x 32 tokens

    base_total = sum(p.numel() for p in model.parameters())  # tied embeddings once
    dt.quantize_model(model, kind="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
    quantized = [n for n, m in model.named_modules() if isinstance(m, dt.quant.QuantLinear)]
    assert len(quantized) == 7 * model.config.num_hidden_layers  # q k v o gate up down; head kept
    assert not isinstance(model.get_output_embeddings(), dt.quant.QuantLinear)

    dt.add_adapter(model, dt.LoraConfig(r=8, alpha=16, targets="all-linear"))
    assert all(isinstance(model.get_submodule(n).geometry, dt.quant.QuantLinearGeometry) for n in quantized)
    # The report counts each quantized weight as out x in values, not as its packed bytes.
    lora = sum(p.numel() for p in dt.adapter_params(model))
    assert count_params(model) == (lora, base_total + lora)
    opt = AdamW(dt.adapter_params(model), lr=2e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(input_ids=batch, labels=batch).loss.item()
    assert final < losses[0] - 0.3, losses + [final]

    with torch.no_grad():
        adapted = model(input_ids=batch[:1]).logits
        merged = dt.quant.export_merged(model, dtype=torch.float32)
        assert not any(isinstance(m, (dt.AdapterModule, dt.quant.QuantLinear)) for m in merged.modules())
        exported = merged(input_ids=batch[:1]).logits
    torch.testing.assert_close(exported, adapted, atol=2e-3, rtol=2e-3)
