"""Step metrics: real and padded tokens, the FLOPs count behind MFU, example lengths of packed rows."""

import pytest
import torch

import deltatune as dt
from deltatune.train.data import collate
from deltatune.train.packing import pack
from deltatune.train.throughput import Meter, example_lengths, matmul_params, step_flops

transformers = pytest.importorskip("transformers")


def _llama(tie=True):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_are_the_linear_weights_head_included(tie):
    model = _llama(tie)
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    per_layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 24  # q, k, v (2 kv heads of 4 dims), o, mlp
    frozen, trained = matmul_params(model)
    assert frozen == 2 * per_layer + 50 * 16  # the head once, the embedding table never (tied or not)
    assert trained == 2 * ((2 * 16 + 16 * 2) + (2 * 16 + 8 * 2))  # LoRA A and B of q (16 out) and v (8 out)


def test_step_flops_counts_4n_frozen_6n_trained_and_causal_attention_per_example():
    flops = step_flops((100, 10), tokens=7, example_lengths=[3, 4], layers=2, attention_width=8)
    assert flops == 7 * (4 * 100 + 6 * 10) + 3 * 2 * 2 * 8 * (9 + 16)


def test_packed_rows_give_each_examples_length_and_padding_none():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 3, 7, 2)]
    rows = pack(examples, 10)
    batch = collate(rows, 0, "causal-lm")
    assert sorted(example_lengths(batch)) == [2, 3, 5, 7]
    plain = collate(examples, 0, "causal-lm")
    assert example_lengths(plain) == [5, 3, 7, 2]


def test_meter_reports_real_and_padded_tokens_and_mfu_against_a_peak():
    model = _llama()
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 3)]
    batch = collate(examples, 0, "causal-lm")
    meter = Meter(model, torch.device("cpu"), None)
    out = meter.measure([batch], 2.0)
    assert (out["tokens"], out["padded_tokens"], out["tok_s"], out["padded_tok_s"]) == (8, 10, 4.0, 5.0)
    assert "mfu" not in out and "mem_gib" not in out  # no known peak, no CUDA memory on a CPU
    meter.peak = 1e9
    flops = step_flops(matmul_params(model), 8, [5, 3], 2, 16)
    assert meter.measure([batch], 2.0)["mfu"] == round(flops / 2.0 / 1e9, 4)


def test_4bit_weights_count_by_their_logical_shape():
    from deltatune.quant import quantize_model

    plain, quantized = _llama(tie=False), _llama(tie=False)
    quantize_model(quantized, kind="nf4")
    dt.add_adapter(quantized, dt.LoraConfig(r=2, targets=["q_proj"]))
    dt.add_adapter(plain, dt.LoraConfig(r=2, targets=["q_proj"]))
    assert matmul_params(quantized) == matmul_params(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the allocator's statistics)")
def test_gpu_cuda_peaks_are_torchs_peaks():
    """The meter's cheap read of the allocator's peaks equals torch.cuda's public (slower) calls."""
    from deltatune.train.throughput import cuda_peaks

    x = torch.empty(1 << 20, device="cuda")
    device = x.device
    del x
    assert cuda_peaks(device) == (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
