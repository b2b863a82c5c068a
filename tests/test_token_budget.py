"""--tokens-per-step: micro-batches filled to a padded-token budget, in the sampling order, resumable."""

import random

import pytest
import torch

from deltatune.train.data import sample_index
from deltatune.train.token_budget import BudgetSchedule, step_examples


def _lengths(n=57, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(3, 12), rng.randint(30, 60)]) for _ in range(n)]


def test_micro_batches_fill_the_budget_in_sampling_order():
    lengths = _lengths()
    sched = BudgetSchedule(lengths, seed=3, tokens_per_step=240, grad_accum=2)
    drawn = []
    for index in range(40):
        for picked in sched.step(index):
            cost = max(lengths[i] for i in picked) * len(picked)
            assert cost <= 120
            drawn += picked
    # nothing skipped or repeated: the draws are the sampling order itself, over several epochs
    assert drawn == [sample_index(k, len(lengths), 3) for k in range(len(drawn))]
    assert len(drawn) > 2 * len(lengths)
    # a short-example micro-batch holds many examples, a long-example one few: the work stays near the budget
    sizes = {len(p) for i in range(40) for p in sched.step(i)}
    assert max(sizes) >= 4 * min(sizes)


def test_a_step_is_the_same_whether_reached_in_order_or_directly():
    lengths = _lengths(31, seed=1)
    walked = BudgetSchedule(lengths, 0, 100)
    for i in range(25):
        walked.step(i)
    direct = BudgetSchedule(lengths, 0, 100)
    assert direct.step(24) == walked.step(24)
    assert direct.samples_before(24) == walked.samples_before(24)


def test_epochs_and_a_budget_below_the_longest_example():
    lengths = [10] * 20
    sched = BudgetSchedule(lengths, 0, 40)  # 4 examples a step
    assert sched.steps_for_epochs(2) == 10
    with pytest.raises(ValueError, match=r"fewer than the longest example \(60 tokens\); raise it to at least 120"):
        BudgetSchedule([5, 60], 0, 100, grad_accum=2)


def test_without_a_budget_micro_batches_are_micro_batch_examples():
    assert step_examples(None, 2, 10, 3, 2, 0) == [[sample_index(12 + i * 3 + j, 10, 0) for j in range(3)]
                                                   for i in range(2)]


def test_training_by_token_budget_resumes_exactly(tmp_path):
    pytest.importorskip("transformers")
    from test_train import adapter_tensors, args_for, make_tiny_llama, write_task

    from deltatune.train import train

    tiny = (make_tiny_llama(tmp_path / "m"), write_task(tmp_path / "t.jsonl"))
    quiet = dict(log=lambda s: None)
    kw = dict(max_steps=6, tokens_per_step=96, packing=False, save_every=3)
    whole = train(*args_for(tiny, tmp_path / "a", **kw), **quiet)

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash after step 4")

    with pytest.raises(RuntimeError, match="simulated"):
        train(*args_for(tiny, tmp_path / "b", **kw), on_step=crash, **quiet)
    resumed = train(*args_for(tiny, tmp_path / "b", resume=True, **kw), **quiet)
    a, b = adapter_tensors(whole.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    steps = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"tok_s"' in line]
    assert all(s["padded_tokens"] <= 96 for s in steps)
