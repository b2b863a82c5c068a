"""Choosing the next token of each request from its logits: greedy, temperature, top-k, top-p, penalties.

``SamplingParams`` are per request, so one batch mixes greedy and sampled rows with their own
settings. A request's ``seed`` seeds its own ``torch.Generator``: its samples do not depend on what
else runs in the batch. Penalties follow their sources: ``repetition_penalty`` as in CTRL (Keskar et
al. 2019, Eq. 1) and transformers (over prompt and output tokens: a positive logit divided by it, a
negative one multiplied), ``frequency_penalty`` / ``presence_penalty`` as in the OpenAI API (over the
output tokens: ``logit - frequency * count - presence * (count > 0)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "Sampler"]


@dataclass
class SamplingParams:
    """How one request generates and when it stops."""

    max_new_tokens: int = 64
    """Tokens to generate at most (finish reason "length")."""
    temperature: float = 0.0
    """0: greedy (the most likely token); > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p (1.0: all)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (transformers' rule)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it was generated at all."""
    seed: int | None = None
    """Seed of this request's own generator (None: drawn from the engine's)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation; the text ends before the first one found (finish reason "stop")."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the generation (kept in token_ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    use_beam_search: bool = False
    """Beam search (transformers' ``num_beams``, ``do_sample=False``) instead of sampling; needs temperature 0."""
    beam_width: int = 4
    """Beams kept with ``use_beam_search``."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(log p) / generated_length ** length_penalty (transformers')."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0 (0: off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
                  (self.beam_width >= 1, "beam_width must be >= 1")]
        if self.use_beam_search:
            checks += [(self.temperature == 0, "beam search is deterministic: temperature must be 0"),
                       (not self.stop, "beam search takes stop_token_ids, not stop strings"),
                       (not (self.frequency_penalty or self.presence_penalty),
                        "beam search takes repetition_penalty only, not frequency/presence penalties")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}, got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks one token per row from a batch of logits, each row with its request's settings."""

    def __init__(self, seed: int | None = None):
        self._seeds = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def generator(self, params: SamplingParams, device: torch.device) -> torch.Generator | None:
        """A new request's own generator (None for a greedy request)."""
        if params.greedy:
            return None
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seeds))
        return torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                 outputs: list[list[int]], generators: list[torch.Generator | None]) -> list[int]:
        """The next token of each row of ``logits`` (R, vocab): row ``i`` with ``params[i]``, its
        prompt and output token ids so far (for the penalties) and its generator."""
        if not params:
            return []
        logits = logits.float()
        plain = [p.greedy and p.repetition_penalty == 1.0 and not (p.frequency_penalty or p.presence_penalty)
                 for p in params]
        picked = logits.argmax(-1)  # (R,) the greedy rows' answer, computed for all rows at once
        for i, (p, prompt, out, gen) in enumerate(zip(params, prompts, outputs, generators)):
            if plain[i]:
                continue
            row = penalize(logits[i], p, prompt, out)
            if p.greedy:
                picked[i] = row.argmax()
            else:
                probs = torch.softmax(filter_top(row / p.temperature, p.top_k, p.top_p), dim=-1)
                picked[i] = torch.multinomial(probs, 1, generator=gen)[0]
        return picked.tolist()  # one device-to-host copy for the batch


def penalize(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """``logits`` (vocab,) after the repetition, frequency and presence penalties of ``p`` (a prompt's virtual
    tokens, ids past the vocabulary, are not tokens to penalize)."""
    if p.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(t for t in set(prompt) | set(output) if t < logits.shape[0]), device=logits.device,
                            dtype=torch.long)
        picked = logits[seen]
        logits = logits.index_copy(0, seen, torch.where(picked > 0, picked / p.repetition_penalty,
                                                        picked * p.repetition_penalty))
    if (p.frequency_penalty or p.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_top(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (vocab,) with every token outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cum = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(ordered, dim=-1) >= top_p  # tokens after the nucleus is full (the first stays)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
