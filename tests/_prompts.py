"""What the virtual-token tests share (prompt tuning, P-tuning, prefix tuning against PEFT): the tiny
models, a greedy decoder over a model's full forward, and a word-level tokenizer for text inits."""

import torch

import _models

MODELS = {"llama": _models.llama, "qwen2": _models.qwen2, "gpt2": _models.gpt2}
TOL = 1e-5


def batch(name: str) -> dict:
    """The shared ids with a padded tail on the second row, and causal-LM labels."""
    ids = _models.inputs(name)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def logits_and_loss(model, inputs: dict):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.loss


def greedy_by_forward(model, ids: torch.Tensor, steps: int) -> list:
    """Greedy tokens by running the whole sequence again each step (no cache): the reference decoder.

    PEFT's own ``generate`` with the cache is no oracle with transformers 5 here: it looks for
    ``past_key_values``, which transformers 5 calls ``cache``, so it feeds the prompt again at every
    decoding step (prompt and P-tuning) and its prefix cache is dropped (prefix tuning). Without the
    cache (``use_cache=False``) it agrees with this for prompts, not for prefixes on Llama."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids.tolist()


def word_tokenizer(path, vocab: int = _models.VOCAB):
    """A whitespace tokenizer over the words w0 .. w{vocab-1}, saved at ``path`` (AutoTokenizer loads it)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(path)
    return str(path)
