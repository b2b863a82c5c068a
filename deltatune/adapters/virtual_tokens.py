"""Virtual tokens: adapters that act on a model's input instead of its weights (prompt tuning, P-tuning,
prefix tuning), as one ``AdapterModule`` attached to the model.

``VirtualTokens`` sits on the root model under ``virtual_tokens`` and holds one *encoder* per adapter
(``encoders.<adapter>``, written by each method). An encoder answers:

| member | what it is |
|---|---|
| ``kind`` | "prompt": n embeddings prepended to the input; "prefix": n keys/values per layer, in the cache |
| ``num_virtual_tokens`` | n |
| ``forward() -> table`` | prompt: (n, hidden); prefix: (n, layers * 2 * kv_heads * head_dim), PEFT's layout |
| ``kv_layout`` | prefix only: (layers, kv_heads, head_dim) |
| ``roles()``, ``load_roles(tensors)``, ``method`` | the file's tensors by role, and the method's name |

The virtual tokens are a per-row *input*, never model state: every call computes them from the
adapter of each row (``feed(kwargs, rows)`` takes one adapter name per row, so a serving engine can
batch rows of different prompts and pass the resulting ``inputs_embeds`` / ``cache``). Two seams feed
them in:

- ``prepare_batch(batch)`` (the training step and evaluation call it, ``adapters.prepare_batch``): one
  example a row (packed rows are split), the attention mask and causal-LM labels extended by n;
- a forward pre-hook on the root model, for every call (``model(...)``, ``model.generate(...)``): with
  ``input_ids`` and an empty cache it prepends the prompt embeddings (or fills the cache with the
  prefix); an ``attention_mask`` / ``labels`` not yet covering the virtual tokens is extended
  (a tensor of the extended length is taken as prepared); a call with ``inputs_embeds`` is taken as
  prepared. Position ids follow PEFT: dropped for prompts (the model counts from 0 over prompt +
  input), shifted by n for prefixes.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

__all__ = ["text_config", "VirtualTokens", "ATTRIBUTE", "virtual_tokens", "unpack_rows", "IGNORE_INDEX", "context_length",
           "token_dim", "kv_layout", "check_length"]

ATTRIBUTE = "virtual_tokens"
"""Where the module sits on the root model (``model.virtual_tokens``)."""
IGNORE_INDEX = -100
"""The label of a virtual token: no loss (transformers' and PEFT's ignore index)."""


def virtual_tokens(model: nn.Module, create: bool = False) -> "VirtualTokens | None":
    """The model's ``VirtualTokens`` module (created and attached if ``create``), or None."""
    module = getattr(model, ATTRIBUTE, None)
    if isinstance(module, VirtualTokens):
        return module
    if module is not None:
        raise ValueError(f"{type(model).__name__} already has an attribute {ATTRIBUTE!r}; cannot attach virtual tokens")
    if not create:
        return None
    if not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"virtual tokens need a transformers model (get_input_embeddings()); got {type(model).__name__}")
    module = VirtualTokens(model)
    model.add_module(ATTRIBUTE, module)
    return module


def context_length(config) -> int | None:
    """The model's context (max_position_embeddings / n_positions), None if its config does not say."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def text_config(model: nn.Module, who: str = "virtual tokens need"):
    """The text part of ``model``'s transformers config (the config itself for a text-only model);
    ValueError, naming ``who`` needs it, for a model without one."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{who} a transformers model with a config; got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def token_dim(model: nn.Module) -> int:
    """The width of the model's input embeddings (a prompt token's size)."""
    return model.get_input_embeddings().weight.shape[1]


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's attention cache, as PEFT provisions prefixes:
    grouped-query models by their key/value heads (``num_key_value_heads``, ``head_dim``)."""
    config = text_config(model)
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "num_layers", "n_layer") if hasattr(config, k)), None)
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k)), None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k)), None)
    if not all(isinstance(v, int) for v in (layers, heads, hidden)):
        raise ValueError(f"{type(model).__name__}: its config gives no layer count, head count or hidden size "
                         f"(prefix tuning sizes its keys/values from them)")
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:
        return layers, heads, hidden // heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def check_length(model: nn.Module, n: int, method: str) -> None:
    """ValueError if ``n`` virtual tokens leave no room for input in the model's context (or n < 1)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{method}: num_virtual_tokens must be a positive integer, got {n!r}")
    limit = context_length(text_config(model))
    if limit is not None and n >= limit:
        raise ValueError(f"{method}: {n} virtual tokens leave no room for input in the model's context of {limit}")


class VirtualTokens(nn.Module):
    """The virtual-token adapters of one model: an encoder per adapter, fed in per call (see module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # virtual tokens never fold into weights; present for the protocol
        self.enabled = True
        self._root = (model,)  # outside the module tree (no cycle); the hook lives on the root
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    # -- the adapter protocol ---------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.encoders.keys())

    def add(self, name: str, encoder: nn.Module) -> None:
        """Hold ``encoder`` as adapter ``name``."""
        if name in self.encoders:
            raise ValueError(f"adapter {name!r} already has virtual tokens on this model")
        self.encoders[name] = encoder

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        names = self.adapter_names() if name is None else [n for n in [name] if n in self.encoders]
        return [p for n in names for r, p in self.encoders[n].named_parameters() if role is None or r == role]

    def remove(self, name: str) -> None:
        del self.encoders[name]
        if name in self.active:
            self.active.remove(name)

    def restore(self) -> None:
        """Detach from the model (its hook removed); None: there is no original module to put back."""
        self._hook.remove()
        return None

    def merge(self, name: str) -> None:
        method = getattr(self.encoders[name], "method", "virtual-token") if name in self.encoders else "virtual-token"
        raise ValueError(f"adapter {name!r} ({method}) cannot be merged: its virtual tokens are an input of every "
                         f"call, not a change of the weights; keep it as an adapter (or remove_adapter it)")

    def unmerge(self, name: str) -> None:  # never merged
        pass

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.encoders[name].roles().items()}

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.encoders[name].load_roles(tensors)

    # -- what a call gets ----------------------------------------------------------------------------------
    def current(self) -> nn.Module | None:
        """The encoder of the active adapter (None when disabled or none is active)."""
        if not self.enabled or not self.active:
            return None
        if len(self.active) > 1:
            raise ValueError(f"virtual-token adapters {self.active} are active together; activate one at a time")
        return self.encoders[self.active[0]]

    def inputs(self, rows: list[str], dtype: torch.dtype, device) -> tuple[torch.Tensor, nn.Module]:
        """The virtual tokens of each row: (B, n, hidden) prompts or (2 * layers, B, heads, n, head_dim)
        prefix keys/values, and the first row's encoder (all rows' must agree in kind and n)."""
        encoders = [self.encoders[r] for r in rows]
        first = encoders[0]
        if any(e.kind != first.kind or e.num_virtual_tokens != first.num_virtual_tokens for e in encoders):
            raise ValueError("rows of one batch need virtual-token adapters of one kind and one num_virtual_tokens")
        tables = {}
        for name in dict.fromkeys(rows):  # each adapter's encoder runs once per call
            tables[name] = self.encoders[name]().to(device=device, dtype=dtype)
        table = torch.stack([tables[r] for r in rows])  # (B, n, width)
        if first.kind == "prompt":
            return table, first
        layers, heads, head_dim = first.kv_layout
        B, n = table.shape[:2]
        # PEFT's layout: (B, n, 2 * layers, heads, head_dim) -> (2 * layers, B, heads, n, head_dim)
        return table.view(B, n, 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4), first

    def _check_context(self, n: int, total: int) -> None:
        limit = context_length(getattr(self._root[0], "config", None))
        if limit is not None and total > limit:
            raise ValueError(f"virtual tokens: {n} virtual tokens + {total - n} input tokens = {total} positions, "
                             f"longer than the model's context of {limit}; shorten the input or use fewer virtual tokens")

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        encoder = self.current()
        if encoder is None:
            return None
        kwargs = dict(kwargs)
        if args and "input_ids" not in kwargs and "inputs_embeds" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        return args, self.feed(kwargs)

    def feed(self, kwargs: dict, rows: list[str] | None = None) -> dict:
        """A call's keyword inputs with the virtual tokens fed in (what the forward hook does), each row
        with adapter ``rows[i]`` (default: the active adapter for every row). A serving engine batching
        rows of different prompts calls this and passes the result to the model: the hook takes
        ``inputs_embeds``, an extended mask and a filled cache as prepared."""
        kwargs = dict(kwargs)
        encoder = self.current() if rows is None else self.encoders[rows[0]]
        n = encoder.num_virtual_tokens
        key = "past_key_values" if "past_key_values" in kwargs and self._cache_key != "past_key_values" else None
        if key:  # an older name for the cache
            kwargs[self._cache_key] = kwargs.pop(key)
        cache = kwargs.get(self._cache_key)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return kwargs
        B, T = x.shape[:2]
        weight = self._root[0].get_input_embeddings().weight
        rows = rows if rows is not None else [self.active[0]] * B
        if len(rows) != B:
            raise ValueError(f"virtual tokens: {len(rows)} row adapters for a batch of {B} rows")
        if encoder.kind == "prompt":
            kwargs.pop("position_ids", None)  # PEFT ignores position ids: positions count over prompt + input
            if past == 0 and ids is not None:
                prompts, _ = self.inputs(rows, weight.dtype, weight.device)
                tokens = self._root[0].get_input_embeddings()(ids)
                kwargs["inputs_embeds"] = torch.cat([prompts.to(tokens.dtype), tokens], dim=1)
                kwargs["input_ids"] = None
                for key, fill in (("labels", IGNORE_INDEX), ("token_type_ids", 0)):  # PEFT: no loss, segment 0
                    if kwargs.get(key) is not None:
                        kwargs[key] = _extend(kwargs[key], n, T, fill)
                seen = T  # the input the mask and labels must now cover, without the prompt
            else:  # prepared embeddings, or a decoding step after the prompt is in the cache
                seen = past - n + T if past else T - n
            self._check_context(n, seen + n)
        else:
            if past == 0:
                kv, _ = self.inputs(rows, weight.dtype, weight.device)
                kwargs[self._cache_key] = _fill_cache(cache, kv, self._root[0])
            seen = (past if past else n) - n + T
            mask = kwargs.get("attention_mask")
            prepared = mask is not None and mask.ndim == 2 and mask.shape[1] == seen + n
            if kwargs.get("position_ids") is not None and not prepared:  # positions after the prefix, as PEFT's
                kwargs["position_ids"] = kwargs["position_ids"] + n
            self._check_context(n, seen + n)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _extend(kwargs["attention_mask"], n, seen, 1)
        return kwargs

    def prepare_batch(self, batch: dict) -> dict:
        """A collated training batch as the active adapter needs it: one example a row (packed rows
        split), the attention mask (and causal-LM labels, for prompts) extended by the n virtual tokens.
        The tokens themselves are fed in by the forward hook."""
        encoder = self.current()
        if encoder is None:
            return batch
        if "position_ids" in batch:
            batch = unpack_rows(batch)
        n, T = encoder.num_virtual_tokens, batch["input_ids"].shape[1]
        out = dict(batch)
        if "attention_mask" in out:
            out["attention_mask"] = _extend(out["attention_mask"], n, T, 1)
        labels = out.get("labels")
        if encoder.kind == "prompt" and labels is not None and labels.ndim == 2 and labels.shape[1] == T:
            out["labels"] = _extend(labels, n, T, IGNORE_INDEX)
        return out


def _extend(t: torch.Tensor | None, n: int, length: int, fill: int) -> torch.Tensor | None:
    """``t`` (B, length) with n ``fill`` columns in front; unchanged if it already has length + n columns."""
    if t is None or t.ndim != 2 or t.shape[1] == length + n:
        return t
    if t.shape[1] != length:
        raise ValueError(f"virtual tokens: a (B, {t.shape[1]}) mask or labels for {length} input positions "
                         f"(expected {length}, or {length + n} with the {n} virtual tokens)")
    return torch.cat([torch.full((t.shape[0], n), fill, dtype=t.dtype, device=t.device), t], dim=1)


def _fill_cache(cache, kv: torch.Tensor, model: nn.Module):
    """``cache`` (an empty transformers Cache, or None for a new DynamicCache) holding the prefix of every
    layer: kv is (2 * layers, B, heads, n, head_dim), keys at even and values at odd indices (PEFT's order)."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0] // 2):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


def unpack_rows(batch: dict) -> dict:
    """A packed batch (rows of several examples, ``position_ids`` restarting at 0) as one example a row,
    right-padded: virtual tokens go in front of every example, which packed rows cannot give."""
    positions, mask = batch["position_ids"], batch.get("attention_mask")
    spans = []
    for i in range(positions.shape[0]):
        starts = torch.nonzero(positions[i] == 0).flatten().tolist() + [positions.shape[1]]
        for a, b in zip(starts, starts[1:]):
            if mask is None or bool(mask[i, a:b].any()):  # the padding after a row's examples is dropped
                spans.append((i, a, b))
    width = max(b - a for _, a, b in spans)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("token_type_ids", 0)):
        if key not in batch:
            continue
        src = batch[key]
        t = torch.full((len(spans), width), fill, dtype=src.dtype)
        for j, (i, a, b) in enumerate(spans):
            t[j, : b - a] = src[i, a:b]
        out[key] = t
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor([[b - a] for _, a, b in spans])).long()
    return out
