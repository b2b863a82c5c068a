"""Padding-free packing: examples share rows but never attend across each other, so the loss of a
packed batch is the sum of the examples' unpacked losses."""

import contextlib
import random

import pytest
import torch

from deltatune.train.data import IGNORE, Dataset, collate
from deltatune.train.evaluate import batch_loss, evaluate
from deltatune.train.packing import pack, segments

transformers = pytest.importorskip("transformers")


def _examples(n=11, seed=0, vocab=97):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)  # a prompt without loss, then the answer
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _tiny_llama(attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_rows_hold_every_example_once_with_restarting_positions():
    examples = _examples(40, seed=1)
    rows = pack(examples, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    total = sum(len(e["input_ids"]) for e in examples)
    assert len(rows) <= total // 64 + 2  # best-fit: rows come out nearly full
    found = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        for a, b in segments(r["position_ids"]):
            found.append(tuple(r["input_ids"][a:b]))
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE  # predicted from another example's last token: masked
    assert sorted(found) == sorted(tuple(e["input_ids"]) for e in examples)
    assert pack(examples, 64) == rows  # deterministic: resuming needs the same rows
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pack(examples, 1)


def test_long_examples_are_cut_to_the_row():
    rows = pack([{"input_ids": list(range(1, 51)), "labels": list(range(1, 51))}], 16)
    assert rows == [{"input_ids": list(range(1, 17)), "labels": [IGNORE] + list(range(2, 17)),
                     "position_ids": list(range(16))}]


@pytest.mark.parametrize("fast", [False, True])
def test_packed_loss_equals_the_sum_of_unpacked_losses(fast):
    model = _tiny_llama()
    examples = _examples()
    ctx = torch.autocast("cpu", enabled=False)

    def autocast():
        return ctx

    with torch.no_grad():
        alone = [batch_loss(model, collate([e], 0, "causal-lm"), "causal-lm", "cpu", autocast)[:2] for e in examples]
        rows = pack(examples, 64)
        batch = collate(rows, 0, "causal-lm")
        assert "position_ids" in batch and len(rows) < len(examples)
        if fast:
            from deltatune.fast import disable_fast_path, enable_fast_path

            enable_fast_path(model)
        packed, n = batch_loss(model, batch, "causal-lm", "cpu", autocast, fast=fast)[:2]
        if fast:
            disable_fast_path(model)
    assert n == sum(k for _, k in alone)
    expected = sum(float(loss) for loss, _ in alone)
    assert abs(float(packed) - expected) <= 1e-5 * abs(expected), (float(packed), expected)


@pytest.mark.parametrize("fast", [False, True])
def test_a_packed_forward_reads_nothing_back_from_the_device(fast, monkeypatch):
    """transformers branches on where the packed examples start; on a GPU reading that back stalls the host
    once a micro-batch. The step answers it from the host copy (deltatune.train.packed_masks)."""
    import traceback

    model = _tiny_llama()
    if fast:
        from deltatune.fast import enable_fast_path

        enable_fast_path(model)
    batch = collate(pack(_examples(), 64), 0, "causal-lm")
    reads = []
    real_bool = torch.Tensor.__bool__

    def watched(t):
        frames = [f.filename for f in traceback.extract_stack(limit=6)[:-1]]
        if any("transformers" in f for f in frames):
            reads.append(frames[-1])
        return real_bool(t)

    monkeypatch.setattr(torch.Tensor, "__bool__", watched)
    with torch.no_grad():
        loss, _, _ = batch_loss(model, batch, "causal-lm", "cpu", contextlib.nullcontext, fast=fast)
    monkeypatch.undo()
    assert reads == []
    from transformers import masking_utils

    assert masking_utils.find_packed_sequence_indices.__wrapped__(batch["position_ids"]) is not None  # it was packed


def test_packing_without_masks_would_leak_across_examples():
    """The check above can fail: packed rows read without their positions attend across examples."""
    model = _tiny_llama()
    examples = _examples()
    rows = pack(examples, 64)
    with torch.no_grad():
        batch = collate(rows, 0, "causal-lm")
        leaky = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}  # no positions, no boundaries
        packed = float(batch_loss(model, batch, "causal-lm", "cpu", torch.no_grad)[0])
        crossed = float(batch_loss(model, leaky, "causal-lm", "cpu", torch.no_grad)[0])
    assert abs(packed - crossed) > 1e-4 * abs(packed)  # ten times the tolerance of the check above


def test_evaluate_gives_the_same_loss_and_exact_match_packed():
    model = _tiny_llama()
    examples = _examples(9, seed=3)
    plain = Dataset(examples, "causal-lm")
    packed = Dataset(pack(examples, 64), "causal-lm")
    a, b = evaluate(model, plain, batch_size=4), evaluate(model, packed, batch_size=2)
    assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"]
    assert a["exact_match"] == b["exact_match"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length FlashAttention needs a CUDA GPU")
def test_gpu_packed_rows_take_the_variable_length_kernel(monkeypatch):
    from deltatune.fast import blocks, disable_fast_path, enable_fast_path

    if blocks._VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    calls = []
    fn, windowed, gqa = blocks._VARLEN
    monkeypatch.setattr(blocks, "_VARLEN", (lambda *a, **k: calls.append(1) or fn(*a, **k), windowed, gqa))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    examples = _examples(13, seed=5)
    with torch.no_grad():
        alone = [batch_loss(model, collate([e], 0, "causal-lm"), "causal-lm", "cuda", torch.no_grad)[:2]
                 for e in examples]
        enable_fast_path(model)
        packed, n = batch_loss(model, collate(pack(examples, 64), 0, "causal-lm"), "causal-lm", "cuda",
                               torch.no_grad, fast=True)[:2]
        disable_fast_path(model)
    assert calls, "the fused attention did not take the packed rows"
    expected = sum(float(loss) for loss, _ in alone)
    assert n == sum(k for _, k in alone) and abs(float(packed) - expected) <= 2e-2 * expected


def test_precision_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere(monkeypatch):
    from deltatune.train.args import TrainArgs, resolve_precision

    assert TrainArgs().precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # a name given stands for itself


def test_static_shapes_keep_the_loss_and_list_empty_segments_at_the_end():
    """Under CUDA graphs packed micro-batches take one shape: rows padded to a width, empty rows added,
    the boundaries padded with empty segments; the loss is the same as the dynamic batch's."""
    from deltatune.train.objective import TokenObjective

    model = _tiny_llama()
    rows = pack(_examples(), 64)
    dynamic = collate(rows, 0, "causal-lm")
    obj = TokenObjective("causal-lm", 0, static=(len(rows) + 2, 80))
    static = obj.collate(rows)
    assert static["input_ids"].shape == (len(rows) + 2, 80)
    cu = static["cu_seq_lens_q"]
    real = int((cu.diff() > 0).sum())  # the examples, each row's padding and the 2 empty rows
    assert real >= len(dynamic["cu_seq_lens_q"]) - 1 + 2
    assert len(cu) - 1 == max(16, 1 << (real - 1).bit_length())
    assert (cu[real:] == cu[-1]).all() and int(cu[-1]) == static["input_ids"].numel()
    assert static["max_length_q"] == 80 and (static["labels"][len(rows):] == IGNORE).all()
    assert obj.targets(static) == obj.targets(dynamic)
    with torch.no_grad():
        a = batch_loss(model, dynamic, "causal-lm", "cpu", contextlib.nullcontext)[0]
        b = batch_loss(model, static, "causal-lm", "cpu", contextlib.nullcontext)[0]
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(a))
    # the segment count never shrinks, so the shapes change a few times in a run at most
    first = len(cu)
    assert len(obj.collate(rows[:1])["cu_seq_lens_q"]) == first
    with pytest.raises(ValueError, match="static width"):
        TokenObjective("causal-lm", 0, static=(2, 8)).collate(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length FlashAttention needs a CUDA GPU")
def test_gpu_static_packed_batches_replay_one_capture_and_match_eager():
    """Packed micro-batches of different examples (different segment counts) in static shapes: the graphed
    layers capture once, and every step's loss and gradients equal the eager fast path's."""
    import copy

    import deltatune as dt
    from deltatune.fast import blocks, enable_fast_path, fast_path_of
    from deltatune.train.objective import TokenObjective

    if blocks._VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   attn_implementation="sdpa", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init="random"))
    model.train()
    eager = copy.deepcopy(model)
    enable_fast_path(model, cuda_graphs=True)
    enable_fast_path(eager)
    obj = TokenObjective("causal-lm", 0, static=(4, 64))
    rows = [pack(_examples(14, seed=s), 64)[:4] for s in range(5)]
    for r in rows:  # the segment count grows to what the batches need (a power of two), then stays
        obj.collate(r)
    batches = [obj.collate(r) for r in rows]
    assert len({len(b["cu_seq_lens_q"]) for b in batches}) == 1
    assert len({int((b["cu_seq_lens_q"].diff() > 0).sum()) for b in batches}) > 1  # real segments differ

    def step(m, batch):
        for p in dt.adapter_params(m):
            p.grad = None
        loss = batch_loss(m, batch, "causal-lm", "cuda", contextlib.nullcontext, fast=True)[0]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in dt.adapter_params(m)]

    for batch in batches:
        loss, grads = step(model, batch)
        ref, ref_grads = step(eager, batch)
        assert loss == pytest.approx(ref, rel=2e-3)
        for a, b in zip(grads, ref_grads):
            assert ((a - b).norm() / b.norm()).item() < 2e-3
    stack = fast_path_of(model).graphs
    assert stack.off is None and stack.captures == 1
    # the empty segments change nothing: the same rows with their own boundaries give the same loss
    dynamic = collate(pack(_examples(14, seed=0), 64)[:4], 0, "causal-lm")
    with torch.no_grad():
        a = batch_loss(eager, dynamic, "causal-lm", "cuda", contextlib.nullcontext, fast=True)[0]
        b = batch_loss(eager, batches[0], "causal-lm", "cuda", contextlib.nullcontext, fast=True)[0]
    assert float(a) == pytest.approx(float(b), rel=1e-3)


def test_cuda_graphs_default_on_for_lora_on_packed_rows_on_a_gpu_only():
    """--cuda-graphs left unset: on where one capture serves the run (LoRA/DoRA on the fast path, packed rows,
    a GPU, bf16/fp16, no token budget, no full checkpointing, no --teacher base, no FSDP), else off."""
    import dataclasses

    from deltatune.train.args import TrainArgs
    from deltatune.train.prepare import graphs_setting

    packed, plain = Dataset(pack(_examples(), 64), "causal-lm"), Dataset(_examples(), "causal-lm")
    model, cuda, cpu = torch.nn.Linear(2, 2), torch.device("cuda"), torch.device("cpu")
    args = TrainArgs(precision="bf16")
    assert args.cuda_graphs is None
    assert graphs_setting(args, model, cuda, packed, "none") is True
    assert graphs_setting(args, model, cuda, packed, "ddp") is True
    assert graphs_setting(args, model, cpu, packed, "none") is False
    assert graphs_setting(args, model, cuda, plain, "none") is False
    assert graphs_setting(args, model, cuda, packed, "fsdp") is False
    for change in [dict(method="full"), dict(method="loha"), dict(fast=False), dict(tokens_per_step=4096),
                   dict(gradient_checkpointing=True), dict(teacher="base"), dict(precision="fp32")]:
        assert graphs_setting(dataclasses.replace(args, **change), model, cuda, packed, "none") is False, change
    assert graphs_setting(dataclasses.replace(args, gradient_checkpointing=True, checkpoint_fraction=0.5), model,
                          cuda, packed, "none") is True
    # given explicitly, it stands (the run then checks it: --cuda-graphs needs the fast path)
    assert graphs_setting(dataclasses.replace(args, cuda_graphs=False), model, cuda, packed, "none") is False
    assert graphs_setting(dataclasses.replace(args, cuda_graphs=True), model, cpu, plain, "none") is True
