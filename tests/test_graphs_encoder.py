"""CUDA graphs over an encoder's layers (BERT): positional arguments, one cached capture per row width,
least recently used captures freed, and when `deltatune train` turns them on by itself."""

import copy
import types

import pytest
import torch

import deltatune as dt
from deltatune.fast import enable_fast_path, fast_path_of
from deltatune.fast.graphs import MAX_CACHED, _positional_names
from deltatune.train.args import TrainArgs
from deltatune.train.objective import WIDTH_MULTIPLE
from deltatune.train.prepare import graphs_setting

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def tiny_bert(layers=4, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=128, num_labels=2,
                                  attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(cfg).to(dtype).to(device)
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, targets=["query", "value"], init="random"))
    return model.train()


def batch(rows, width, device="cpu", pad_from=None):
    """Token ids, a mask padding each row after a random length (at least one row full), labels."""
    ids = torch.randint(1, 100, (rows, width), device=device)
    lengths = torch.randint(max(1, width // 2), width + 1, (rows,))
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device).long()
    return ids, mask, torch.randint(0, 2, (rows,), device=device)


def train(model, batches, **fast):
    """Losses of AdamW steps on ``batches`` and the final adapters."""
    enable_fast_path(model, **fast)
    opt = torch.optim.AdamW(dt.adapter_params(model), lr=1e-2)
    losses = []
    for ids, mask, labels in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in dt.adapter_params(model)]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_an_encoders_layers_are_graphed_and_take_the_mask_by_position():
    """BERT's encoder passes the attention mask by position; the graphed layers bind it to its name (a
    positional argument would keep them eager) and, on the CPU, run eagerly with the same results."""
    model = no_dropout(tiny_bert())
    assert _positional_names(model.bert.encoder.layer[0].forward)[:2] == ("attention_mask", "encoder_hidden_states")
    plain = copy.deepcopy(model)
    batches = [batch(4, 16) for _ in range(3)]
    losses, params = train(model, batches, cuda_graphs=True)
    ref_losses, ref_params = train(plain, batches)
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    stack = fast_path_of(model).graphs
    assert stack.layers == list(model.bert.encoder.layer) and stack.captures == 0

    seen = []
    stack.call = lambda i, x, *args, **kwargs: seen.append((args, sorted(kwargs))) or stack.forwards[i](x, **kwargs)
    ids, mask, labels = batch(2, 8)
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert seen and all(args == () and "attention_mask" in names for args, names in seen)


def run_args(**kw):
    return TrainArgs(model="m", precision="bf16", method="lora", **kw)


def test_graphs_default_on_for_an_encoder_with_few_row_widths(monkeypatch):
    """Unset --cuda-graphs: on for BERT's one-example rows on a GPU when their widths (multiples of 16 up to
    the longest example) fit the graph cache and their captures a quarter of the GPU's memory; off for
    longer rows, a small GPU, on the CPU, with checkpointing, and for a decoder's unpacked rows (up to 64
    widths)."""
    import deltatune.train.prepare as prepare

    monkeypatch.setattr(prepare, "device_memory", lambda device: 80 << 30)
    model, gpu, cpu = tiny_bert(), torch.device("cuda"), torch.device("cpu")
    short = types.SimpleNamespace(packed=False, examples=[{"input_ids": [1] * n} for n in (5, 40, 66)])
    longest = MAX_CACHED * WIDTH_MULTIPLE + 1
    long = types.SimpleNamespace(packed=False, examples=[{"input_ids": [1] * n} for n in (5, longest)])
    assert graphs_setting(run_args(), model, gpu, short, "none")
    assert not graphs_setting(run_args(), model, gpu, long, "none")
    assert not graphs_setting(run_args(), model, cpu, short, "none")
    assert not graphs_setting(run_args(gradient_checkpointing=True), model, gpu, short, "none")
    assert not graphs_setting(run_args(fast=False), model, gpu, short, "none")
    assert graphs_setting(run_args(cuda_graphs=True), model, gpu, long, "none")  # as given
    monkeypatch.setattr(prepare, "device_memory", lambda device: 1 << 20)  # 5 captures, ~16 MiB: > 1/4 MiB
    assert not graphs_setting(run_args(), model, gpu, short, "none")
    monkeypatch.setattr(prepare, "device_memory", lambda device: 80 << 30)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    llama = transformers.LlamaForCausalLM(cfg)
    dt.add_adapter(llama, dt.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    assert not graphs_setting(run_args(), llama, gpu, short, "none")
    assert graphs_setting(run_args(), llama, gpu, types.SimpleNamespace(packed=True, examples=short.examples), "none")


@pytest.mark.gpu
@cuda
def test_gpu_encoder_graphs_cache_one_capture_per_width():
    """Steps at three row widths, revisited and with a partial last batch, equal eager training; each shape
    is captured once, and with a cache of two the least recently used capture is freed and recaptured."""
    widths = [16, 32, 16, 48, 32, 16, 48]
    batches = [batch(8, w, "cuda") for w in widths] + [batch(3, 16, "cuda")]
    model = no_dropout(tiny_bert(device="cuda", dtype=torch.bfloat16))
    eager = copy.deepcopy(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses, params = train(model, batches, cuda_graphs=True)
        ref_losses, ref_params = train(eager, batches)
    stack = fast_path_of(model).graphs
    assert stack.off is None and stack.captures == 4 and len(stack.cache) == 4  # 16, 32, 48 wide; 3 rows
    assert stack.generation == len(batches)
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    for a, b in zip(params, ref_params):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2

    small = no_dropout(tiny_bert(device="cuda", dtype=torch.bfloat16))
    enable_fast_path(small, cuda_graphs=True)
    stack = fast_path_of(small).graphs
    stack.max_cached = 2
    for w in (16, 32, 16, 48, 16, 32):  # 16 stays recent; 32 is freed by 48, then captured again
        ids, mask, labels = batch(4, w, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            small(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert stack.captures == 4 and len(stack.cache) == 2 and stack.off is None


@pytest.mark.gpu
@cuda
def test_gpu_graphs_check_the_layers_every_nth_step_when_asked(monkeypatch):
    """With ``check_every = 3`` the layers' state is checked on every third step only (what `deltatune train`
    sets, GRAPH_CHECK_EVERY), and a change is captured at the next check."""
    import deltatune.fast.graphs as graphs

    model = no_dropout(tiny_bert(device="cuda", dtype=torch.bfloat16))
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["query", "value"], init="random"), name="other", activate=False)
    enable_fast_path(model, cuda_graphs=True)
    stack = fast_path_of(model).graphs
    stack.check_every = 3
    checks = []
    real = graphs._state
    monkeypatch.setattr(graphs, "_state", lambda layers: checks.append(1) or real(layers))
    ids, mask, labels = batch(4, 16, "cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    for _ in range(7):
        step()
    assert stack.captures == 1 and len(checks) == 3  # the capture, then steps 4 and 7
    dt.set_active(model, "other")
    step()  # step 8: no check, the old capture replays
    assert stack.captures == 1
    step()
    step()  # step 10 checks, finds the change, recaptures
    assert stack.captures == 2 and stack.off is None
