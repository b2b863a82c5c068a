"""Rendering conversations with the tokenizer's chat template, cut into trained and untrained pieces."""

from __future__ import annotations

import json

from deltatune.train.formats import DataError

__all__ = ["CHATML_TEMPLATE", "render_chat", "prompt_ids"]

# Used when a tokenizer has no chat template of its own (tiny test tokenizers, BERT-style vocabularies).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _template(tokenizer) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[dict], tools=None) -> list[tuple[str, bool]]:
    """Split a conversation into (text, trained) pieces whose concatenation is the templated chat.

    Piece boundaries come from rendering growing prefixes of the conversation: the text an
    assistant turn adds after the generation prompt is trained, everything else is context. Each
    trained piece stops at the end-of-turn marker; the whitespace after it is context, so that a
    greedy answer which stops at the marker counts as exact.
    """
    template = _template(tokenizer)

    def render(msgs, gen):
        kwargs = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                             chat_template=template, **kwargs)

    if tools and json.dumps(tools)[:40] not in render(messages[:1], False):
        # The template ignores tools: give them to the model in a system turn.
        note = "You can call these tools:\n" + json.dumps(tools, ensure_ascii=False)
        if messages[0]["role"] == "system":
            messages = [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}] + messages[1:]
        else:
            messages = [{"role": "system", "content": note}] + messages
        tools = None
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                            "responses cannot be masked")
        answer = full[len(prompt):]
        tail = answer[len(answer.rstrip()):]
        pieces.append((prompt[len(done):], False))
        pieces.append((answer[:len(answer) - len(tail)], True))
        done = full[:len(full) - len(tail)]
    rest = render(messages, False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation's prompt for generation (ends with the assistant header)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=_template(tokenizer))
    return tokenizer(text, add_special_tokens=False)["input_ids"]
