"""The training step's host work (issue 15: a small model's step is mostly the host's): what a step must
not repeat, and that the faster forms compute what the slower ones did."""

import random

import pytest
import torch

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
