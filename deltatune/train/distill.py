"""Knowledge distillation into an adapter: the KL between a teacher's and the student's token
distributions added to the training loss (``--teacher``, ``--distill-temperature``, ``--distill-weight``).

The teacher is either the base model itself (``--teacher base``: the student with its adapters switched
off through ``adapters.disabled``, no second copy of the weights), which pulls the adapted model back
towards what the base predicted and so works against forgetting, or another causal LM with the same
vocabulary (a larger model of the same family).

Per micro-batch, with logits s (student) and t (teacher) at the positions that carry a target (the
same positions as the cross-entropy: position i predicts label i + 1, labels -100 skipped, so padding,
prompts and the boundaries of packed examples carry no term either), temperature T and weight α:

    KD_sum = T² · Σ_i KL(softmax(t_i / T) ‖ softmax(s_i / T))          (Hinton et al. 2015, section 2)
    loss_sum = (1 - α) · CE_sum + α · KD_sum

and the loop divides by the targets of the whole optimizer step, as it does for the cross-entropy alone,
so gradient accumulation equals one large batch. T² keeps the soft term's gradient the same size
whatever T (its gradient scales as 1/T²); the convex mix keeps the loss on the cross-entropy's scale,
α = 0 is plain fine-tuning and α = 1 distillation alone. The direction KL(teacher ‖ student) is the
forward KL of classic distillation: the student must cover every token the teacher finds likely.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.train.args import TrainError
from deltatune.train.data import IGNORE

__all__ = ["BASE", "DistillError", "Distillation", "kd_loss", "make_distillation", "distill_metrics"]

BASE = "base"
"""The --teacher value that makes the base model (the student with its adapters off) the teacher."""


class DistillError(TrainError):
    """Distillation settings that cannot work (a teacher with another vocabulary, a weight outside [0, 1])."""


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0, ignore_index: int = IGNORE) -> torch.Tensor:
    """T² · Σ KL(softmax(teacher / T) ‖ softmax(student / T)) over the target positions, computed in fp32.

    Args:
        student_logits, teacher_logits: (B, L, V) causal-LM logits (of the same V).
        labels: (B, L) unshifted labels: position i is scored when ``labels[:, i + 1] != ignore_index``.
        temperature: T > 0.
    Returns the summed (not averaged) term, a scalar with the student's gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                           f"{tuple(student_logits.shape)}")
    targets = labels[:, 1:] != ignore_index  # (B, L-1)
    s = student_logits[:, :-1][targets].float() / temperature  # (N, V)
    t = teacher_logits[:, :-1][targets].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature ** 2


@dataclass
class Distillation:
    """A run's distillation: the teacher, T and α; ``loss`` mixes the KD term into a batch's loss."""

    temperature: float
    weight: float
    teacher: Optional[nn.Module] = None
    """A separate teacher model; None: the student with its adapters disabled (--teacher base)."""
    vocab: Optional[int] = None
    """Logit columns compared when the two heads differ in size (their shared vocabulary); None: all."""

    @torch.no_grad()
    def teacher_logits(self, student: nn.Module, batch: dict, device, autocast) -> torch.Tensor:
        """The teacher's (B, L, V) logits of a prepared batch, in eval mode (no dropout, no RNG drawn)."""
        from deltatune.adapters import disabled
        from deltatune.train.evaluate import _model_inputs
        from deltatune.train.packed_masks import host_packing

        model = self.teacher if self.teacher is not None else student
        was_training = model.training
        model.eval()
        try:
            off = disabled(student) if self.teacher is None else contextlib.nullcontext()
            with off, autocast(), host_packing(batch.get("position_ids"), device):
                return model(**_model_inputs(batch, device)).logits
        finally:
            model.train(was_training)

    def loss(self, student: nn.Module, batch: dict, ce_sum: torch.Tensor, logits: torch.Tensor, device,
             autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """(``(1 - α)·ce_sum + α·KD_sum``, the detached pair (ce_sum, KD_sum)) of one micro-batch whose
        student ``logits`` and summed cross-entropy ``ce_sum`` ``batch_loss`` gave."""
        teacher = self.teacher_logits(student, batch, device, autocast)
        s, t = (logits, teacher) if self.vocab is None else (logits[..., :self.vocab], teacher[..., :self.vocab])
        kd = kd_loss(s, t, batch["labels"].to(device, non_blocking=True), self.temperature)
        total = (1.0 - self.weight) * ce_sum + self.weight * kd
        return total, torch.stack([ce_sum.detach().float(), kd.detach()])

    def describe(self) -> str:
        """One line for the run's log."""
        who = "the base model (adapters off)" if self.teacher is None else type(self.teacher).__name__
        return (f"distillation from {who}: loss = {1 - self.weight:g}·CE + {self.weight:g}·"
                f"{self.temperature:g}²·KL(teacher ‖ student) at T={self.temperature:g}")


def distill_metrics(parts: list[torch.Tensor], targets: int) -> dict:
    """{"ce_loss", "kd_loss"} per target token of a step, from ``Distillation.loss``'s pairs."""
    ce, kd = (torch.stack(parts).sum(0) / max(targets, 1)).tolist()
    return {"ce_loss": ce, "kd_loss": kd}


def _vocab_ids(tokenizer) -> dict:
    return tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}


def _head_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.shape[0] if weight is not None else model.config.vocab_size


def make_distillation(args, student: nn.Module, tokenizer, task: str, device, dtype: torch.dtype,
                      fast: bool, log=print) -> Optional[Distillation]:
    """The distillation ``args`` (a ``TrainArgs``) asks for, teacher loaded and checked; None without --teacher.

    ``student`` is the prepared model (adapters added), ``tokenizer`` its tokenizer, ``dtype`` the frozen
    base's dtype (a loaded teacher gets it too). Raises ``DistillError`` for a teacher that cannot
    work: one of another vocabulary, --teacher base with nothing to switch off, a classification task."""
    from deltatune.train.args import FULL

    if not args.teacher:
        return None
    if not args.distill_temperature > 0:
        raise DistillError(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if not 0.0 <= args.distill_weight <= 1.0:
        raise DistillError(f"--distill-weight must be in [0, 1], got {args.distill_weight}")
    if task != "causal-lm":
        raise DistillError(f"--teacher distills token distributions of a causal LM; this run's task is {task}")
    from deltatune.adapters import virtual_tokens

    if virtual_tokens(student) is not None:
        raise DistillError("--teacher: prompt, P- and prefix tuning change the model's input (virtual tokens), so "
                           "teacher and student logits do not line up; distill with a per-layer method (LoRA, ...)")
    teacher, vocab = None, None
    if args.teacher == BASE:
        if args.method == FULL:
            raise DistillError("--teacher base needs an adapter method: with --method full there is no adapter to "
                               "switch off; give a teacher model path (a copy of the base) instead")
        if args.cuda_graphs:
            raise DistillError("--teacher base switches the adapters off and on every micro-batch, which CUDA "
                               "graphs would recapture each time; drop --cuda-graphs")
    else:
        from deltatune.hub import DTYPES, load_model, load_tokenizer

        teacher_tok = load_tokenizer(args.teacher)
        mine, theirs = _vocab_ids(tokenizer), _vocab_ids(teacher_tok)
        if mine != theirs:
            differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:5]
            raise DistillError(f"--teacher {args.teacher}: its tokenizer differs from the student's ({args.model}): "
                               f"{len(theirs)} vs {len(mine)} tokens, e.g. {differ}; the teacher must share the "
                               f"student's vocabulary (token ids) for their distributions to be compared")
        name = next(k for k, v in DTYPES.items() if v == dtype)
        log(f"loading teacher {args.teacher} ...")
        teacher, _ = load_model(args.teacher, dtype=name, tokenizer=teacher_tok)
        teacher.to(device).eval().requires_grad_(False)
        heads = _head_size(student), _head_size(teacher)
        if heads[0] != heads[1]:  # heads padded past the vocabulary to different multiples
            vocab = min(heads)
            if len(tokenizer) > vocab:
                raise DistillError(f"--teacher {args.teacher}: output heads of {heads[1]} (teacher) and {heads[0]} "
                                   f"(student) logits, but {len(tokenizer)} tokens; they must share the vocabulary")
    out = Distillation(args.distill_temperature, args.distill_weight, teacher, vocab)
    log(out.describe())
    if fast:
        log("distillation: the KD term needs the student's logits, so the fused head + cross-entropy is off "
            "(the fused decoder layers stay on)")
    return out
