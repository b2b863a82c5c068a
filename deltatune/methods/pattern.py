"""Pattern-verbalizer training (PET; Schick & Schütze 2021, arXiv:2001.07676): a classification task posed
to a language model as a cloze question, the pretrained LM head reused as the classifier.

A *template* ("{text} It was {mask}.") renders each example with one mask slot; a *verbalizer* maps each
label to words ({"0": ["terrible"], "1": ["great"]}). A class's score is the LM's logit of its word at
the mask slot, the mean over the class's words when it has several (PET's rule), so zero-shot
classification needs no training, and training is cross-entropy over these scores.

- Masked LMs (``...ForMaskedLM``): {mask} is the tokenizer's mask token; the slot is its position.
- Causal LMs: the class score is the next-token logit after the template's text before {mask}; what
  follows {mask} is dropped (so {text} and {soft} must come before it).
- Whitespace right before {mask} belongs to the word: BPE tokenizers (GPT-2, SmolLM2, RoBERTa) spell
  " great" as one token ("Ġgreat"), so each word is tokenized with that whitespace in front (unless it
  starts with whitespace already) and a causal LM's prefix ends before it. WordPiece (BERT) ignores it.
- A word that is several tokens is an error (``multi_token="error"``) or scored by its first token
  (``multi_token="first"``).
- Soft tokens: ``soft_tokens=n`` trainable embeddings before the template, and one more at each
  ``{soft}`` in it. They are rendered as ids ``vocab + k`` (k-th soft slot) that ``PatternModel`` looks
  up in its own table ``soft_prompt`` (n, hidden), trained in full (``modules_to_save``); every other
  id goes through the LM's embedding. A per-row input, no state.
- LoRA: ``lora_r > 0`` adds LoRA deltas (``lora_alpha``, ``targets``) to the same adapter.

``PatternModel(lm, cfg, tokenizer)`` holds the LM under ``lm`` (composition) and returns the class
scores (B, classes) as its ``logits``, so the training loop's classification path trains it unchanged.
The adapter (soft table, LoRA deltas, config with template and verbalizer) is saved in deltatune's own
format (``formats/native.py``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from deltatune.adapters.geometry import geometry_for
from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.method import register_method
from deltatune.adapters.targeting import select_targets, set_module
from deltatune.methods.lora import LORA, LoraConfig

__all__ = ["PatternConfig", "Template", "Pattern", "PatternModel", "PatternOutput", "PATTERN", "lm_kind",
           "context_of", "SOFT_MODULE"]

SOFT_MODULE = "soft_prompt"
"""The ``PatternModel`` child holding the soft-token table (trained in full, as ``modules_to_save``)."""
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_NAMES = ("text", "text2", "mask", "soft")


@dataclass
class PatternConfig:
    """Settings of one pattern-verbalizer (PET) adapter."""

    method: ClassVar[str] = "pattern"

    template: str = "{text} It was {mask}."
    """The cloze question: {text} (and {text2} for pairs) is the example, {mask} the slot the verbalizer's words fill, each {soft} a trainable token."""
    verbalizer: dict[str, list[str]] | str = dataclasses.field(
        default_factory=lambda: {"0": ["terrible"], "1": ["great"]})
    """Label -> its words, e.g. {"0": ["terrible"], "1": ["great"]} (a JSON object on the command line); key order is class order."""
    soft_tokens: int = 0
    """Trainable soft tokens placed before the template (besides its {soft} slots)."""
    multi_token: Literal["error", "first"] = "error"
    """A verbalizer word that is several tokens: "error", or "first" (its first token's logit)."""
    lora_r: int = 0
    """LoRA rank on the LM's layers besides the pattern (0: no LoRA)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on LoRA's input."""
    targets: list[str] | str | None = None
    """LoRA's target modules (suffixes, a regex or "all-linear"; default "all-linear" when lora_r > 0)."""
    exclude: list[str] | str | None = None
    """Modules LoRA never adapts: suffixes or a full-name regex."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes trained in full (the soft-token table is added when there are soft tokens)."""

    def __post_init__(self):
        if isinstance(self.verbalizer, str):
            try:
                self.verbalizer = json.loads(self.verbalizer)
            except json.JSONDecodeError as e:
                raise ValueError(f"PatternConfig: verbalizer is not a JSON object ({e})") from None
        if not isinstance(self.verbalizer, dict) or len(self.verbalizer) < 2:
            raise ValueError(f"PatternConfig: verbalizer must map two or more labels to words, got {self.verbalizer!r}")
        words = {}
        for label, ws in self.verbalizer.items():
            ws = [ws] if isinstance(ws, str) else list(ws)
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise ValueError(f"PatternConfig: verbalizer label {label!r} needs one or more non-empty words, got {ws!r}")
            words[str(label)] = ws
        self.verbalizer = words
        Template(self.template)  # raises on a bad template
        if self.multi_token not in ("error", "first"):
            raise ValueError(f"PatternConfig: multi_token must be 'error' or 'first', got {self.multi_token!r}")
        if not isinstance(self.soft_tokens, int) or self.soft_tokens < 0:
            raise ValueError(f"PatternConfig: soft_tokens must be an integer >= 0, got {self.soft_tokens!r}")
        if self.lora_r < 0:
            raise ValueError(f"PatternConfig: lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r == 0 and self.targets is not None:
            raise ValueError("PatternConfig: targets select LoRA layers; set lora_r > 0 to use them")
        if self.lora_r > 0 and self.targets is None:
            self.targets = "all-linear"
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.num_soft and SOFT_MODULE not in (self.modules_to_save or []):
            self.modules_to_save = list(self.modules_to_save or []) + [SOFT_MODULE]

    @property
    def num_soft(self) -> int:
        """Soft tokens in all: ``soft_tokens`` plus the template's {soft} slots."""
        return self.soft_tokens + Template(self.template).count("soft")

    def lora(self) -> LoraConfig | None:
        """The LoRA part of this adapter (None when ``lora_r`` is 0)."""
        if self.lora_r == 0:
            return None
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.targets,
                          exclude=self.exclude)

    def replace(self, **changes) -> "PatternConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class Template:
    """A parsed template: its pieces in order, ("lit", text) / ("text", 0 or 1) / ("soft", None) / ("mask", None)."""

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise ValueError(f"PatternConfig: template must be a string, got {type(template).__name__}")
        self.source = template
        self.pieces: list[tuple[str, object]] = []
        end = 0
        for m in _PLACEHOLDER.finditer(template):
            if m.start() > end:
                self.pieces.append(("lit", template[end:m.start()]))
            name = m.group(1)
            if name not in _NAMES:
                raise ValueError(f"template {template!r}: unknown placeholder {m.group(0)} "
                                 f"(known: {', '.join('{' + n + '}' for n in _NAMES)})")
            self.pieces.append(("text", 1 if name == "text2" else 0) if name.startswith("text") else (name, None))
            end = m.end()
        if end < len(template):
            self.pieces.append(("lit", template[end:]))
        for name, kind, value in (("{mask}", "mask", None), ("{text}", "text", 0)):
            n = sum(1 for k, v in self.pieces if k == kind and v == value)
            if n != 1:
                raise ValueError(f"template {template!r} needs exactly one {name}, has {n}")
        if sum(1 for k, v in self.pieces if k == "text" and v == 1) > 1:
            raise ValueError(f"template {template!r} has {{text2}} more than once")

    def count(self, kind: str) -> int:
        """How many pieces of ``kind`` ("soft", "text", ...) the template has."""
        return sum(1 for k, _ in self.pieces if k == kind)

    @property
    def texts(self) -> int:
        """How many texts an example fills in (1 or 2)."""
        return self.count("text")


def lm_kind(lm: nn.Module) -> str:
    """"masked" for a masked LM (``...ForMaskedLM``), "causal" for a causal LM; ValueError otherwise."""
    name = type(lm).__name__
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    raise ValueError(f"a pattern needs a masked LM (...ForMaskedLM) or a causal LM (...ForCausalLM), got {name}")


def context_of(lm: nn.Module) -> int | None:
    """The model's context in tokens (max_position_embeddings / n_positions), None if its config does not say."""
    config = getattr(lm, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Pattern:
    """A template and verbalizer resolved against a tokenizer and a model kind: renders examples to ids
    and names the verbalizer's token ids. ValueError on what cannot work (a word of several tokens,
    a causal template with the text after {mask}, a masked LM tokenizer without a mask token)."""

    def __init__(self, cfg: PatternConfig, tokenizer, kind: str, vocab_size: int):
        self.cfg, self.tokenizer, self.kind, self.vocab_size = cfg, tokenizer, kind, vocab_size
        self.label_names = list(cfg.verbalizer)
        pieces = list(Template(cfg.template).pieces)
        at = next(i for i, (k, _) in enumerate(pieces) if k == "mask")
        space = ""
        if at > 0 and pieces[at - 1][0] == "lit":
            text = pieces[at - 1][1]
            space = text[len(text.rstrip()):]
            if kind == "causal":  # the whitespace goes with the word (" great"), not the prefix
                pieces[at - 1] = ("lit", text.rstrip())
        if kind == "causal":
            late = [k for k, _ in pieces[at + 1:] if k in ("text", "soft")]
            if late:
                raise ValueError(f"template {cfg.template!r}: a causal LM scores the token after the text before "
                                 f"{{mask}}, so {{{late[0]}}} must come before {{mask}}")
            pieces = pieces[:at + 1]
        self.mask_id = None
        if kind == "masked":
            self.mask_id = getattr(tokenizer, "mask_token_id", None)
            if self.mask_id is None:
                raise ValueError(f"{type(tokenizer).__name__} has no mask token; a masked LM pattern needs one")
        # special tokens around an encoded text ([CLS] ... [SEP]; BOS ...): found from a probe
        probe, plain = tokenizer("x")["input_ids"], _ids(tokenizer, "x")
        start = next((i for i in range(len(probe) - len(plain) + 1) if probe[i:i + len(plain)] == plain), 0)
        self.head = list(probe[:start])
        self.tail = list(probe[start + len(plain):]) if kind == "masked" else []  # causal: the prefix ends at the slot
        soft = iter(range(cfg.num_soft))
        self.parts: list[tuple[str, object]] = [("ids", [vocab_size + next(soft) for _ in range(cfg.soft_tokens)])]
        for k, v in pieces:
            if k == "lit":
                self.parts.append(("ids", _ids(tokenizer, v)))
            elif k == "soft":
                self.parts.append(("ids", [vocab_size + next(soft)]))
            elif k == "mask":
                self.parts.append(("ids", [self.mask_id] if kind == "masked" else []))
            else:
                self.parts.append(("text", v))
        self.fixed = len(self.head) + len(self.tail) + sum(len(v) for k, v in self.parts if k == "ids")
        self.word_ids = self._verbalizer_ids(space)

    def _verbalizer_ids(self, space: str) -> list[list[int]]:
        """Each class's token ids (one per word)."""
        out, seen = [], {}
        for label, words in self.cfg.verbalizer.items():
            ids = []
            for word in words:
                spelled = word if word[:1].isspace() else space + word
                tokens = _ids(self.tokenizer, spelled)
                if len(tokens) != 1 and (self.cfg.multi_token == "error" or not tokens):
                    raise ValueError(
                        f"verbalizer word {spelled!r} (label {label!r}) is {len(tokens)} tokens {tokens} for this "
                        f"tokenizer, and a mask slot holds one: choose a one-token word, or multi_token='first' "
                        f"to score its first token")
                if tokens[0] in seen and seen[tokens[0]] != label:
                    raise ValueError(f"verbalizer words of labels {seen[tokens[0]]!r} and {label!r} share token "
                                     f"{tokens[0]}: their classes could not be told apart")
                seen[tokens[0]] = label
                ids.append(tokens[0])
            out.append(ids)
        return out

    def encode(self, texts: list[str], max_length: int) -> tuple[dict, bool]:
        """The ids of one example (``input_ids``, and ``token_type_ids`` for pair-aware tokenizers), and
        whether its texts were cut (from the end of the longest) to fit ``max_length``. ValueError if the
        template alone does not fit."""
        if len(texts) < Template(self.cfg.template).texts:
            raise ValueError(f"the template needs {Template(self.cfg.template).texts} texts, the example has {len(texts)}")
        if self.fixed >= max_length:
            raise ValueError(f"the template with its soft tokens and special tokens is {self.fixed} tokens, which "
                             f"leaves no room for the text within {max_length} tokens")
        encoded = [_ids(self.tokenizer, t) for t in texts]
        cut = False
        while self.fixed + sum(len(e) for e in encoded) > max_length:
            longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
            over = self.fixed + sum(len(e) for e in encoded) - max_length
            encoded[longest] = encoded[longest][:max(len(encoded[longest]) - over, 0)]
            cut = True
        ids = list(self.head)
        for k, v in self.parts:
            ids += v if k == "ids" else encoded[v]
        ids += self.tail
        if self.kind == "masked" and ids.count(self.mask_id) != 1:
            raise ValueError(f"the rendered example holds the mask token {ids.count(self.mask_id)} times (its text "
                             f"contains the tokenizer's mask token); a pattern needs exactly one")
        return {"input_ids": ids}, cut


@dataclass
class PatternOutput:
    """What ``PatternModel`` returns: the class scores as ``logits`` (B, classes)."""

    logits: torch.Tensor


class PatternModel(nn.Module):
    """A language model asked a cloze question: ``forward`` returns the verbalizer scores (B, classes).

    ``lm`` is a masked or causal LM, kept under ``lm``; ``cfg`` the pattern; ``tokenizer`` the LM's. The
    soft-token table (``soft_prompt``, (n, hidden)) starts as the embeddings of n random vocabulary
    tokens (seed torch first); an adapter (``add_adapter(model, cfg)``) trains a copy of it.
    """

    def __init__(self, lm: nn.Module, cfg: PatternConfig, tokenizer):
        super().__init__()
        self.lm = lm
        embed = lm.get_input_embeddings()
        self.pattern = Pattern(cfg, tokenizer, lm_kind(lm), embed.num_embeddings)
        self.register_buffer("word_ids", torch.tensor([i for ids in self.pattern.word_ids for i in ids]),
                             persistent=False)
        self.register_buffer("word_class", torch.tensor([c for c, ids in enumerate(self.pattern.word_ids) for _ in ids]),
                             persistent=False)
        self.soft_prompt = None
        if cfg.num_soft:
            picks = torch.randint(0, embed.num_embeddings, (cfg.num_soft,))
            self.soft_prompt = nn.Embedding(cfg.num_soft, embed.embedding_dim, device=embed.weight.device,
                                            dtype=embed.weight.dtype)
            with torch.no_grad():
                self.soft_prompt.weight.copy_(embed.weight[picks])
            self.soft_prompt.requires_grad_(False)  # the base table; an adapter trains its own copy

    @property
    def config(self):
        """The LM's config (memory estimates, context length)."""
        return self.lm.config

    @property
    def name_or_path(self) -> str:
        return getattr(self.lm, "name_or_path", "")

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    def _embeds(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Input embeddings with the soft slots (ids >= vocab) filled from the table; None without soft slots."""
        vocab = self.pattern.vocab_size
        soft = input_ids >= vocab  # (B, T)
        if not bool(soft.any()):
            return None
        if self.soft_prompt is None or int(input_ids.max()) >= vocab + self.pattern.cfg.num_soft:
            raise ValueError(f"input ids up to {int(input_ids.max())}, beyond the vocabulary ({vocab}) and the "
                             f"pattern's {self.pattern.cfg.num_soft} soft tokens")
        table = self.soft_prompt(torch.arange(self.pattern.cfg.num_soft, device=input_ids.device))  # (n, H)
        base = self.lm.get_input_embeddings()(input_ids.masked_fill(soft, 0))  # (B, T, H)
        picked = table[(input_ids - vocab).clamp(min=0)].to(base.dtype)  # (B, T, H)
        return torch.where(soft[..., None], picked, base)

    def slots(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) the position whose logits score the classes: the mask token (masked LM) or the last real
        token (causal LM: it predicts the word after the prefix; left or right padding)."""
        if self.pattern.kind == "masked":
            hits = input_ids == self.pattern.mask_id
            if not bool((hits.sum(1) == 1).all()):
                raise ValueError("every row needs exactly one mask token (render examples with PatternModel.encode)")
            return hits.int().argmax(1)
        if attention_mask is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        return input_ids.shape[1] - 1 - attention_mask.flip(1).int().argmax(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> PatternOutput:
        """Class scores (B, classes): each class's mean LM logit of its words at the slot."""
        limit = context_of(self.lm)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"input of {input_ids.shape[1]} tokens is longer than the model's context of {limit}")
        embeds = self._embeds(input_ids)
        inputs = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": input_ids}
        logits = self.lm(attention_mask=attention_mask, **inputs, **kwargs).logits  # (B, T, V)
        at = logits[torch.arange(logits.shape[0], device=logits.device), self.slots(input_ids, attention_mask)]
        words = at.float()[:, self.word_ids]  # (B, words)
        classes = len(self.pattern.word_ids)
        total = words.new_zeros(words.shape[0], classes).index_add_(1, self.word_class, words)
        counts = torch.bincount(self.word_class, minlength=classes).to(words.dtype)
        return PatternOutput(total / counts)

    def encode(self, texts: list[str] | list[list[str]], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """A right-padded batch (``input_ids``, ``attention_mask``) of the rendered ``texts`` (a string, or a
        list of strings for {text}/{text2}), cut to ``max_length`` (default: the model's context)."""
        limit = max_length or context_of(self.lm) or 512
        rows = [self.pattern.encode([t] if isinstance(t, str) else list(t), limit)[0]["input_ids"] for t in texts]
        width = max(len(r) for r in rows)
        pad = getattr(self.pattern.tokenizer, "pad_token_id", None) or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        device = self.lm.get_input_embeddings().weight.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def scores(self, texts: list[str] | list[list[str]]) -> torch.Tensor:
        """Class scores (B, classes) of raw ``texts``, without grad."""
        with torch.no_grad():
            return self(**self.encode(texts)).logits


class PatternMethod:
    """The pattern as a model-level method for the core: ``add_to`` puts its LoRA part (if any) on the LM
    inside a ``PatternModel``; the soft table trains as ``modules_to_save`` (the core copies it)."""

    name = "pattern"
    config = PatternConfig

    def _check(self, model: nn.Module, cfg: PatternConfig) -> None:
        if not isinstance(model, PatternModel):
            raise ValueError(f"a PatternConfig adapter goes on a PatternModel(lm, cfg, tokenizer), not on "
                             f"{type(model).__name__}")
        if cfg.num_soft != model.pattern.cfg.num_soft:
            raise ValueError(f"the adapter's template has {cfg.num_soft} soft tokens, the PatternModel's "
                             f"{model.pattern.cfg.num_soft}")

    def _lora_targets(self, model: nn.Module, cfg: PatternConfig) -> list[str]:
        lora = cfg.lora()
        return select_targets(model, lora.replace(modules_to_save=cfg.modules_to_save), LORA.supports) if lora else []

    # the LoRA part, for the per-layer file checks (formats/files.py) and the core's view of layers
    def supports(self, geometry) -> bool:
        return LORA.supports(geometry)

    def shapes(self, geometry, base: nn.Module, cfg: PatternConfig, path: str) -> dict[str, tuple[int, ...]]:
        return LORA.shapes(geometry, base, cfg.lora(), path)

    def settings(self, cfg: PatternConfig, path: str) -> dict:
        return LORA.settings(cfg.lora(), path)

    def make_delta(self, layer: nn.Module, cfg: PatternConfig, path: str, dtype) -> nn.Module:
        return LORA.make_delta(layer, cfg.lora(), path, dtype)

    def add_to(self, model: nn.Module, cfg: PatternConfig, name: str) -> None:
        self._check(model, cfg)
        lora = cfg.lora()
        for target in self._lora_targets(model, cfg):  # all checked before any module changes
            module = model.get_submodule(target)
            if not isinstance(module, DeltaLayer):
                module = DeltaLayer(module, geometry_for(module))
                set_module(model, target, module)
            module.add(name, self.make_delta(module, cfg, target, torch.float32))

    def model_shapes(self, model: nn.Module, cfg: PatternConfig) -> dict[str, dict[str, tuple[int, ...]]]:
        """{module path: {role: shape}} of the LoRA part (the soft table is a modules_to_save copy)."""
        self._check(model, cfg)
        lora, out = cfg.lora(), {}
        for target in self._lora_targets(model, cfg):
            module = model.get_submodule(target)
            base = module.base_module if isinstance(module, DeltaLayer) else module
            out[target] = LORA.shapes(geometry_for(module), base, lora, target)
        return out


PATTERN = register_method(PatternMethod())
