"""Beam search for one request: a group of sequences stepped together by transformers' rule.

A request with ``use_beam_search`` runs as up to ``beam_width`` sequences (beams) in the scheduler,
each with its own block table; a beam that starts from another shares the parent's full KV blocks and
copies the partly filled last one (``PagedKVCache.fork``). The engine gives each beam's next-token
log-probabilities to its group; once every beam has them, ``advance`` makes one step of transformers'
``_beam_search`` (``do_sample=False``, its default ``early_stopping=False``):

* every beam's log-probabilities (log-softmax of the logits, the repetition penalty applied to them
  as transformers' processor does) plus the beam's score; the best ``max(2, 1 + #stop ids) * width``
  candidates over all beams (a beam index and a token each);
* a candidate that ends (an EOS / stop token, or the length limit) and ranks among the first
  ``width`` is a finished hypothesis scored ``sum log p / generated_length ** length_penalty``; the
  best ``width`` finished hypotheses are kept;
* the best ``width`` candidates that do not end are the next beams;
* the search stops when every candidate ends, or when ``width`` hypotheses are finished and the best
  beam's score divided by ``generated_length ** length_penalty`` cannot beat the worst of them.

The result is the best finished hypothesis; all of them, best first, come with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltatune.serve.sampling import SamplingParams, penalize
from deltatune.serve.scheduler import Sequence

__all__ = ["BeamGroup"]


@dataclass
class BeamGroup:
    """The beams of one request and what transformers' beam search keeps between steps."""

    request: Sequence
    """The request as the engine reports it (never scheduled); its output is set when the search ends."""
    stop_ids: set[int]
    """Tokens that end a hypothesis (EOS ids unless ignore_eos, and stop_token_ids)."""
    max_new: int
    """Generated tokens at most (max_new_tokens, or less where the model's length ends first)."""
    beams: list[Sequence] = field(default_factory=list)
    """The running beams, best first."""
    scores: list[float] = field(default_factory=list)
    """Each running beam's sum of log-probabilities."""
    finished: list[tuple[float, list[int]]] = field(default_factory=list)
    """(score, generated tokens) of the finished hypotheses, best first, at most ``width``."""
    pending: dict[int, torch.Tensor] = field(default_factory=dict)
    """Beams' next-token log-probabilities (vocab,) received this step, by sequence id."""

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def width(self) -> int:
        return self.params.beam_width

    def receive(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Take beam ``seq``'s logits (vocab,); True once every beam has given its own."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.params.repetition_penalty != 1.0:  # transformers applies it to the log-probabilities
            logp = penalize(logp, self.params, seq.prompt_ids, seq.output_ids)
        self.pending[seq.seq_id] = logp
        return all(b.seq_id in self.pending for b in self.beams)

    def advance(self) -> list[tuple[int, int]] | None:
        """One beam-search step over the received log-probabilities.

        Returns the next beams as (index of the parent in ``beams``, token), best first, with
        ``scores`` updated; or None when the search has ended (``finished`` holds the result)."""
        logp = torch.stack([self.pending.pop(b.seq_id) for b in self.beams])  # (B, V)
        vocab = logp.shape[1]
        total = logp + torch.tensor(self.scores, dtype=logp.dtype, device=logp.device)[:, None]
        keep = min(max(2, 1 + len(self.stop_ids)) * self.width, total.numel())
        top, index = torch.topk(total.flatten(), keep)  # one device-to-host copy below
        top, index = top.tolist(), index.tolist()
        generated = len(self.beams[0].output_ids) + 1  # tokens of each candidate
        at_limit = generated >= self.max_new
        penalty = generated ** self.params.length_penalty
        nxt, scores = [], []
        for rank, (score, flat) in enumerate(zip(top, index)):
            parent, token = divmod(flat, vocab)
            if at_limit or token in self.stop_ids:
                if rank < self.width:
                    self.finished.append((score / penalty, self.beams[parent].output_ids + [token]))
            elif len(nxt) < self.width:
                nxt.append((parent, token))
                scores.append(score)
        self.finished = sorted(self.finished, key=lambda f: -f[0])[: self.width]
        if not nxt:
            return None
        if len(self.finished) == self.width and scores[0] / penalty <= self.finished[-1][0]:
            return None  # the best beam cannot beat the worst finished hypothesis any more
        self.scores = scores
        return nxt
