"""The training step's host work (issue 15: a small model's step is mostly the host's): what a step must
not repeat, and that the faster forms compute what the slower ones did."""

import contextlib
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from test_train import args_for, make_tiny_llama, write_task  # noqa: E402  (tests/ is on sys.path under pytest)

from deltatune.train import loop  # noqa: E402
from deltatune.train.data import IGNORE, collate  # noqa: E402
from deltatune.train.packing import pack  # noqa: E402
from deltatune.train.seeding import seed_generators  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl")


def test_steps_walk_the_model_for_batch_preparers_once(tiny, tmp_path, monkeypatch):
    import deltatune.adapters.protocol as protocol

    run = loop.setup(*args_for(tiny, tmp_path, grad_accum=2, micro_batch=2), log=lambda s: None)
    walks = []
    real = protocol.adapter_modules
    monkeypatch.setattr(protocol, "adapter_modules", lambda model: walks.append(1) or real(model))
    for i in range(3):
        loop.step(run, i)
    assert len(walks) == 1  # not once per micro-batch (6 here)


def test_steps_seed_the_generators_without_torch_manual_seed(tiny, tmp_path, monkeypatch):
    """torch.manual_seed also queues seeds for XPU and MTIA with a stack trace each (~0.1 ms a call)."""
    run = loop.setup(*args_for(tiny, tmp_path, dropout=0.5), log=lambda s: None)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed in a step"))
    loop.step(run, 0)


@pytest.mark.parametrize("seed", [0, 12345, 2**62])
def test_step_seed_gives_the_cpu_stream_of_torch_manual_seed(seed):
    seed_generators(seed, torch.device("cpu"))
    ours = torch.rand(5), torch.randn(3), torch.randperm(10)
    torch.manual_seed(seed)
    theirs = torch.rand(5), torch.randn(3), torch.randperm(10)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def reference_collate(examples, pad_id, task):
    """data.collate written example by example (what the batched form replaced)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    rows = []
    for ex in examples:
        n = len(ex["input_ids"])
        row = {"input_ids": ex["input_ids"] + [pad_id] * (width - n), "attention_mask": [1] * n + [0] * (width - n)}
        if "position_ids" in ex:
            row["position_ids"] = ex["position_ids"] + list(range(width - n))  # the padding: one more segment
        if "token_type_ids" in ex:
            row["token_type_ids"] = ex["token_type_ids"] + [0] * (width - n)
        if task != "classification":
            row["labels"] = ex["labels"] + [IGNORE] * (width - n)
        rows.append(row)
    out = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}
    if task == "classification":
        out["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    return out


@pytest.mark.parametrize("kind", ["classification", "causal-lm", "packed"])
def test_collate_equals_the_example_by_example_reference(kind):
    rng = random.Random(0)
    for _ in range(20):
        examples = []
        for _ in range(rng.randrange(1, 9)):
            ids = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
            if kind == "classification":
                examples.append({"input_ids": ids, "token_type_ids": [rng.randrange(2) for _ in ids],
                                 "label": rng.randrange(3)})
            else:
                examples.append({"input_ids": ids, "labels": [t if rng.random() < 0.6 else IGNORE for t in ids]})
        if kind == "packed":
            examples = pack(examples, 64)
        task = "classification" if kind == "classification" else "causal-lm"
        got, want = collate(examples, 2, task), reference_collate(examples, 2, task)
        for key, value in want.items():
            assert got[key].dtype == torch.long and torch.equal(got[key], value), key


# -- one-off work per shape: padded widths in buckets on a GPU (session 12) --------------------------------------
def classification_examples(n=32, seed=0):
    """SST-2-like sentences: 3-59 tokens, a BERT segment id each, one of 3 labels."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 90) for _ in range(rng.randrange(3, 60))]
        out.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "label": rng.randrange(3)})
    return out


def test_width_buckets_on_cuda_only_for_rows_of_one_example():
    from deltatune.train import DataArgs, TrainArgs
    from deltatune.train.data import Dataset
    from deltatune.train.objective import WIDTH_MULTIPLE, width_buckets

    rows = Dataset(classification_examples(), "classification")
    packed = Dataset(pack([{"input_ids": [5] * 10, "labels": [5] * 10}] * 4, 32), "causal-lm")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert width_buckets(TrainArgs(), DataArgs(max_length=128), rows, cuda) == (WIDTH_MULTIPLE, 128)
    assert width_buckets(TrainArgs(), DataArgs(max_length=None), rows, cuda)[1] == max(
        len(ex["input_ids"]) for ex in rows.examples)  # no --max-length given: the longest example caps
    assert width_buckets(TrainArgs(), DataArgs(max_length=128), rows, cpu) is None
    assert width_buckets(TrainArgs(), DataArgs(max_length=128), packed, cuda) is None
    assert width_buckets(TrainArgs(tokens_per_step=4096), DataArgs(max_length=128), rows, cuda) is None


def test_bucketed_widths_are_multiples_at_most_the_cap_with_the_same_tokens():
    from deltatune.train.objective import TokenObjective

    plain, bucketed = TokenObjective("classification", 0), TokenObjective("classification", 0, widths=(16, 40))
    widths = set()
    for seed in range(40):
        examples = classification_examples(1 + seed % 8, seed)
        want, got = plain.collate(examples), bucketed.collate(examples)
        longest, width = want["input_ids"].shape[1], got["input_ids"].shape[1]
        assert width == (longest if longest > 40 else min(-(-longest // 16) * 16, 40)), (longest, width)
        widths.add(width)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(got[key][:, :longest], want[key]), key
            assert not got[key][:, longest:].any(), key  # padding: pad id 0, masked, segment 0
        assert torch.equal(got["labels"], want["labels"])
    assert {w for w in widths if w <= 40} == {16, 32, 40}  # rows longer than the cap keep their width
    with pytest.raises(ValueError, match="at least 1"):
        TokenObjective("classification", 0, widths=(0, 50))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bucketed_rows_give_the_loss_of_unpadded_ones(kind):
    """The padding a bucket adds is masked (and carries no labels): the loss and the adapter's gradients are
    those of the batch padded to its longest row only."""
    import _models
    import deltatune as dt
    from deltatune.train.evaluate import batch_loss
    from deltatune.train.objective import TokenObjective

    torch.manual_seed(0)
    model = getattr(_models, kind)()
    task = "classification" if kind == "bert" else "causal-lm"
    dt.add_adapter(model, dt.LoraConfig(r=4, init="random", targets=["query", "value"] if kind == "bert"
                                        else ["q_proj", "v_proj"]), name="default")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.eval()  # dropout off: both forwards compute the same function
    examples = classification_examples(6, 1)
    if task == "causal-lm":
        examples = [{"input_ids": ex["input_ids"], "labels": ex["input_ids"]} for ex in examples]
    longest = max(len(ex["input_ids"]) for ex in examples)
    results = []
    for objective in (TokenObjective(task, 0), TokenObjective(task, 0, widths=(16, 128))):
        batch = objective.collate(examples)
        loss, n, _ = batch_loss(model, batch, task, torch.device("cpu"), contextlib.nullcontext)
        model.zero_grad()
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.detach(), n,
                        [p.grad.clone() for p in dt.adapter_params(model)]))
    (w0, l0, n0, g0), (w1, l1, n1, g1) = results
    assert w0 == longest and w1 == -(-longest // 16) * 16 > longest
    assert n0 == n1
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- the fused path by default where it fuses more than the adapter's projections (session 12) -------------------
@pytest.mark.parametrize("kind,task,fast,expected", [
    ("bert", "classification", None, False),  # an encoder: only the LoRA projections would be fused
    ("bert", "classification", True, True),  # --fast still turns it on
    ("llama", "causal-lm", None, True),  # Llama blocks and the fused head + loss
    ("llama", "classification", None, True),  # Llama blocks
    ("gpt2", "causal-lm", None, True),  # the fused head + loss
])
def test_the_default_fast_path_on_cuda_depends_on_what_it_fuses(kind, task, fast, expected):
    pytest.importorskip("deltatune.fast")
    import _models
    import deltatune as dt
    from deltatune.fast import fast_path_enabled
    from deltatune.train import TrainArgs
    from deltatune.train.prepare import enable_fast

    model = getattr(_models, kind)()
    dt.add_adapter(model, dt.LoraConfig(r=4), name="default")
    logs = []
    # the decision is made on the CPU; the device only says "a CUDA run" (nothing is moved)
    on = enable_fast(model, TrainArgs(fast=fast), torch.device("cuda"), logs.append, task)
    assert on is expected and fast_path_enabled(model) is expected
    assert any("plain path" in line for line in logs) is (not expected)
    assert enable_fast(getattr(_models, kind)(), TrainArgs(fast=None), torch.device("cpu"), logs.append, task) is False


# -- the plain LoRA forward under autocast (session 12) ------------------------------------------------------------
class _Float32Copies(TorchDispatchMode):
    """Records the shapes of the float32 tensors that ``_to_copy`` makes (casts), forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._to_copy and out.dtype == torch.float32:
            self.shapes.append(tuple(out.shape))
        return out


def _lora_linear(dropout=0.0):
    import deltatune as dt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    dt.add_adapter(model, dt.LoraConfig(r=4, alpha=8, dropout=dropout, init="random", targets=["0"]), name="default")
    model[0].weight.data, model[0].bias.data = model[0].weight.data.bfloat16(), model[0].bias.data.bfloat16()
    return model


def test_plain_lora_under_autocast_copies_no_activation_to_float32():
    """Autocast casts x for the adapter's matmuls itself; an fp32 copy of it first (and its gradient's
    cast back) were two kernels forward and two backward a layer, for the same numbers."""
    model = _lora_linear()
    layer = model[0]
    delta = layer.deltas["default"]
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    copies = _Float32Copies()
    with copies, torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    with copies:
        y.sum().backward()
    assert (5, 16) not in copies.shapes, copies.shapes  # (the adapter's own gradients are cast to fp32)
    # the same numbers as the fp32 copy gave: autocast rounds it straight back to x's bf16 values
    got = [y.detach(), x.grad, delta.A.grad, delta.B.grad]
    x2 = x.detach().clone().requires_grad_(True)
    delta.A.grad = delta.B.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.linear(torch.nn.functional.linear(x2.float(), delta.A), delta.B)
        want_y = torch.nn.functional.linear(x2, layer.weight, layer.bias) + (delta.scale * low).to(torch.bfloat16)
    want_y.sum().backward()
    for a, b in zip(got, [want_y.detach(), x2.grad, delta.A.grad, delta.B.grad]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_plain_lora_dropout_under_autocast_still_drops_an_fp32_copy():
    model = _lora_linear(dropout=0.5)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    copies = _Float32Copies()
    with copies, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert (5, 16) in copies.shapes  # dropout's input is the fp32 copy, as before (same random stream)


# -- the optimizer (session 12) ---------------------------------------------------------------------------------
def test_adamw_is_torchs_fused_one_on_cuda_and_steps_like_the_default():
    """One kernel a parameter group instead of the multi-tensor form's dozen launches (host time on CUDA)."""
    import deltatune as dt
    from deltatune.train import TrainArgs
    from deltatune.train.prepare import make_optimizer

    def adapted():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 4))
        dt.add_adapter(model, dt.LoraConfig(r=4, init="random"), name="default")
        return model

    args = TrainArgs(lr=1e-2, weight_decay=0.1)
    fused_model, plain_model = adapted(), adapted()
    # the choice follows the run's device; these parameters stay on the CPU, where torch has the fused kernel too
    fused, plain = make_optimizer(fused_model, args, torch.device("cuda")), make_optimizer(plain_model, args,
                                                                                             torch.device("cpu"))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x = torch.randn(8, 16)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(dt.adapter_params(fused_model), dt.adapter_params(plain_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert make_optimizer(adapted(), TrainArgs(optimizer_states="cpu"), torch.device("cuda")).__class__ \
        is not torch.optim.AdamW  # deltatune's AdamW where the states live elsewhere
