"""Scores of predictions: GLUE's classification metrics and GSM8K's answer accuracy.

Classification: accuracy, macro-F1 (the unweighted mean of each class's F1), the F1 of the positive
class (binary tasks; GLUE's F1 for MRPC and QQP) and Matthews' correlation coefficient (GLUE's metric for
CoLA; the multi-class form of Gorodkin 2004 for more than two classes). Each is 0 where its
denominator is 0, as scikit-learn reports them (tests/test_metrics.py compares the two).

GSM8K: a solution's answer is the number after its last "####"; without one, the last number in the
text (what a model that was not trained on the "####" format writes last is usually its result).
Numbers are compared after removing thousands separators, a trailing period and a leading "$", as
exact decimals (``"18"`` equals ``"18.00"``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["classification_metrics", "accuracy", "macro_f1", "binary_f1", "matthews", "extract_answer",
           "answers_match"]


def _confusion(pred: list[int], gold: list[int], classes: int) -> list[list[int]]:
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    table = [[0] * classes for _ in range(classes)]  # table[gold][pred]
    for p, g in zip(pred, gold):
        table[g][p] += 1
    return table


def accuracy(pred: list[int], gold: list[int]) -> float:
    """Fraction of predictions equal to the label."""
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def _f1(table: list[list[int]], k: int) -> float:
    tp = table[k][k]
    predicted = sum(row[k] for row in table)
    actual = sum(table[k])
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def macro_f1(pred: list[int], gold: list[int], classes: int) -> float:
    """The unweighted mean over classes of each class's F1 (classes absent from both count 0)."""
    table = _confusion(pred, gold, classes)
    present = [k for k in range(classes) if sum(table[k]) or sum(row[k] for row in table)]
    return sum(_f1(table, k) for k in present) / len(present) if present else 0.0


def binary_f1(pred: list[int], gold: list[int], positive: int = 1) -> float:
    """F1 of class ``positive``."""
    classes = max([positive, *pred, *gold]) + 1
    return _f1(_confusion(pred, gold, classes), positive)


def matthews(pred: list[int], gold: list[int], classes: int) -> float:
    """Matthews' correlation coefficient (multi-class: Gorodkin's R_K); 0 when it is undefined."""
    table = _confusion(pred, gold, classes)
    n = sum(map(sum, table))
    correct = sum(table[k][k] for k in range(classes))
    p = [sum(row[k] for row in table) for k in range(classes)]  # predicted per class
    t = [sum(table[k]) for k in range(classes)]  # true per class
    cov_pt = correct * n - sum(a * b for a, b in zip(p, t))
    cov_pp = n * n - sum(a * a for a in p)
    cov_tt = n * n - sum(b * b for b in t)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / (cov_pp * cov_tt) ** 0.5


def classification_metrics(pred: list[int], gold: list[int], classes: int, positive: int | None = None) -> dict:
    """accuracy, macro_f1 and mcc; with two classes also f1 (of class ``positive``, default 1)."""
    out = {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold, classes),
           "mcc": matthews(pred, gold, classes)}
    if classes == 2:
        out["f1"] = binary_f1(pred, gold, 1 if positive is None else positive)
    return out


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after the last "####", else the last number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        return _normal(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _normal(found[-1]) if found else None


def _normal(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Whether two extracted answers are the same number (as exact decimals), or the same text."""
    if predicted is None or gold is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return predicted.strip() == gold.strip()
