"""Every metric against scikit-learn's on fixed predictions; GSM8K's answer extraction."""

import random

import pytest

from deltatune.train.metrics import (accuracy, answers_match, binary_f1, classification_metrics, extract_answer,
                                     macro_f1, matthews)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _cases():
    rng = random.Random(0)
    cases = [([0, 1, 1, 0], [0, 1, 0, 0], 2), ([1, 1, 1, 1], [0, 1, 0, 1], 2), ([0, 0, 0], [0, 0, 0], 2),
             ([2, 0, 1, 2, 1], [2, 1, 1, 0, 1], 3), ([0, 0, 1], [1, 1, 0], 2)]
    for classes in (2, 3, 5):
        for n in (7, 50):
            gold = [rng.randrange(classes) for _ in range(n)]
            pred = [g if rng.random() < 0.6 else rng.randrange(classes) for g in gold]
            cases.append((pred, gold, classes))
    return cases


@pytest.mark.parametrize("pred, gold, classes", _cases())
def test_metrics_equal_scikit_learns(pred, gold, classes):
    labels = list(range(classes))
    assert accuracy(pred, gold) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
    assert macro_f1(pred, gold, classes) == pytest.approx(
        sklearn_metrics.f1_score(gold, pred, average="macro", labels=sorted(set(gold) | set(pred)), zero_division=0))
    assert matthews(pred, gold, classes) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred), abs=1e-12)
    if classes == 2:
        assert binary_f1(pred, gold) == pytest.approx(sklearn_metrics.f1_score(gold, pred, labels=labels,
                                                                               zero_division=0))
        assert classification_metrics(pred, gold, 2)["f1"] == binary_f1(pred, gold)
    else:
        assert "f1" not in classification_metrics(pred, gold, classes)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("so the total is $1,234.50.\n#### $1,234.50", "1234.50"),
    ("She has 5 apples, then 3 more: 5 + 3 = 8.", "8"),
    ("The answer is -7.", "-7"),
    ("no number here", None),
])
def test_gsm8k_answers_are_extracted(text, answer):
    assert extract_answer(text) == answer


def test_answers_compare_as_numbers():
    assert answers_match("18", "18.00") and not answers_match("18", "17") and not answers_match(None, "1")
