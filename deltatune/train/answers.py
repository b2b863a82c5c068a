"""Answer accuracy of instruction data by generation: the model answers each example's prompt greedily
and its answer is compared with the reference's (``deltatune.train.metrics.extract_answer``: GSM8K's
"#### N", else the last number)."""

from __future__ import annotations

import torch

from deltatune.train.data import IGNORE, Dataset
from deltatune.train.metrics import answers_match, extract_answer

__all__ = ["prompt_and_reference", "answer_accuracy"]


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]]:
    """(prompt token ids, reference answer token ids) of an unpacked instruction example: the answer is
    the span its labels train on (from the first label that is not ignored)."""
    labels = example["labels"]
    first = next((i for i, v in enumerate(labels) if v != IGNORE), len(labels))
    return example["input_ids"][:first], example["input_ids"][first:]


@torch.no_grad()
def answer_accuracy(model, tokenizer, ds: Dataset, max_new_tokens: int = 256, batch_size: int = 8,
                    device=None, progress: bool = False) -> dict:
    """{"answer_accuracy", "answered"}: the fraction of examples whose greedy answer matches the
    reference's, and the fraction where an answer could be extracted at all. ``ds`` must be unpacked
    (one example a row)."""
    if ds.task != "causal-lm" or ds.packed:
        raise ValueError("answer accuracy needs unpacked instruction data (read it with packing off)")
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct = answered = 0
    starts = range(0, len(ds), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", leave=False, dynamic_ncols=True)
    for start in starts:
        pairs = [prompt_and_reference(ex) for ex in ds.examples[start:start + batch_size]]
        width = max(len(p) for p, _ in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (prompt, _) in enumerate(pairs):  # left padding: every row's next token is at the end
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row, (_, reference) in zip(out[:, width:].tolist(), pairs):
            predicted = extract_answer(tokenizer.decode(row, skip_special_tokens=True))
            answered += predicted is not None
            correct += answers_match(predicted, extract_answer(tokenizer.decode(reference, skip_special_tokens=True)))
    model.train(was_training)
    n = max(len(ds), 1)
    return {"answer_accuracy": correct / n, "answered": answered / n}
