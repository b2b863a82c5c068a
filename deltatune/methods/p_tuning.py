"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): the virtual tokens come out of a
small prompt encoder, an MLP or a bidirectional LSTM + MLP, over n trainable input embeddings.

The encoder is PEFT's ``PromptEncoder``: ``embedding`` (n, hidden); "mlp": Linear(hidden, h) ReLU
Linear(h, h) ReLU Linear(h, hidden) (PEFT uses exactly these layers, whatever ``encoder_num_layers``);
"lstm": a bidirectional LSTM(hidden, h, encoder_num_layers) then Linear(2h, 2h) ReLU Linear(2h, hidden).
Its output (n, hidden) is prepended to the input as prompt tuning's table is.

Files: PEFT's ``prompt_embeddings`` holds the encoder's *output* (what PEFT loads); deltatune also
writes the encoder's own weights (``deltatune_encoder.*``, keys PEFT ignores), so training resumes from
a saved adapter. A file with the output only (PEFT-made) loads as a fixed table: the prompt is that
table, and training it further trains the table directly (the encoder cannot be recovered).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from deltatune.adapters.method import register_method
from deltatune.adapters.virtual_tokens import check_length, token_dim, virtual_tokens

__all__ = ["PTuningConfig", "PromptEncoder", "P_TUNING"]

ENCODERS = ("mlp", "lstm")
OUTPUT = "prompt_embeddings"


@dataclass
class PTuningConfig:
    """Settings of one P-tuning adapter."""

    method: ClassVar[str] = "p_tuning"

    num_virtual_tokens: int = 20
    """Virtual tokens prepended to every input."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The prompt encoder: an MLP, or a bidirectional LSTM followed by an MLP."""
    encoder_hidden_size: int = 128
    """Hidden width of the prompt encoder."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP encoder always has PEFT's three linear layers)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"PTuningConfig: encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for field in ("num_virtual_tokens", "encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PTuningConfig: {field} must be a positive integer, got {value!r}")

    def replace(self, **changes) -> "PTuningConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


class PromptEncoder(nn.Module):
    """PEFT's P-tuning encoder (same module names: ``embedding``, ``lstm_head``, ``mlp_head``); after a
    PEFT file (output only) is loaded, ``table`` mode: the heads are dropped and ``embedding`` is the prompt."""

    kind = "prompt"
    method = "p_tuning"

    def __init__(self, cfg: PTuningConfig, dim: int):
        super().__init__()
        n, h = cfg.num_virtual_tokens, cfg.encoder_hidden_size
        self.num_virtual_tokens = n
        self.encoder = cfg.encoder
        self.embedding = nn.Embedding(n, dim)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, dim))

    @property
    def table(self) -> bool:
        """Whether the prompt is a fixed table (loaded from a file without the encoder's weights)."""
        return not hasattr(self, "mlp_head")

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (n, dim)
        if self.table:
            return x
        if self.encoder == "lstm":
            x = self.lstm_head(x[None])[0][0]  # one sequence of n tokens: (1, n, 2h) -> (n, 2h)
        return self.mlp_head(x)  # (n, dim)

    def encoder_weights(self) -> dict[str, torch.Tensor]:
        """The encoder's own parameters by name (empty in table mode)."""
        return {} if self.table else dict(self.named_parameters())

    def roles(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            output = self()
        return {OUTPUT: output, **self.encoder_weights()}

    def load_roles(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = {k: v for k, v in tensors.items() if k != OUTPUT}
        if not weights:  # the output only (a PEFT file): the prompt becomes that table
            del self.mlp_head
            if hasattr(self, "lstm_head"):
                del self.lstm_head
            with torch.no_grad():
                self.embedding.weight.copy_(tensors[OUTPUT])
            return
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ValueError(f"p_tuning: the encoder's weights {missing} are missing (a file holds all or none)")
        with torch.no_grad():
            for k, v in weights.items():
                own[k].copy_(v)
            if OUTPUT in tensors:
                out = self()
                if (out - tensors[OUTPUT].to(out)).abs().max() > 1e-4 * (1 + out.abs().max()):
                    raise ValueError("p_tuning: prompt_embeddings differ from the encoder's output: the file's "
                                     "encoder weights and prompt do not belong together")


class PTuningMethod:
    """P-tuning as a model-level method (``deltatune.adapters.ModelMethod``)."""

    name = "p_tuning"
    config = PTuningConfig

    def model_shapes(self, model: nn.Module, cfg: PTuningConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            encoder = PromptEncoder(cfg, token_dim(model))
        shapes = {k: tuple(p.shape) for k, p in encoder.named_parameters()}
        return {OUTPUT: (cfg.num_virtual_tokens, token_dim(model)), **shapes}

    def add_to(self, model: nn.Module, cfg: PTuningConfig, name: str) -> None:
        check_length(model, cfg.num_virtual_tokens, self.name)
        device = model.get_input_embeddings().weight.device
        encoder = PromptEncoder(cfg, token_dim(model)).to(device)
        virtual_tokens(model, create=True).add(name, encoder)


P_TUNING = register_method(PTuningMethod())
