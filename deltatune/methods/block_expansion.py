"""Block expansion (LLaMA-Pro, Wu et al. 2024, arXiv:2401.02415 §2.2): new decoder blocks inserted between
the base's, each a copy of the block before it with its attention output (``o_proj``) and MLP output
(``down_proj``) zeroed, so the block adds nothing to the residual stream and the model's outputs are
unchanged at init. Only the new blocks train; the base's blocks stay frozen, which is what keeps the
base's knowledge (the paper's point: less forgetting than fine-tuning the base's own weights).

``positions="even"`` spreads N blocks over L layers as the paper's groups do: one after the last layer
of each group of L/N (after layer ``floor((g + 1) L / N) - 1`` for group g, also when N does not divide
L); a list gives the base layers to follow, each new block being a copy of the one it follows.

``train="full"`` trains the new blocks' weights. ``train="lora"`` keeps the copies frozen and trains
LoRA (B = 0 at init) on their linears: o_proj's and down_proj's stored weights are zero, so each new
block's contribution to the residual stream is the low-rank ``s * B A`` of those two (rank <= r), and
q/k/v/gate/up's LoRA get a gradient only once o_proj's / down_proj's B has left 0 (after the first step:
the same lag plain LoRA's A has). Trained in full, the zero projections would hold most of a block's
parameters; the low rank is the price of the smaller adapter file (and of merging like any LoRA).

The model stays a plain transformers model throughout: the decoder's ``nn.ModuleList`` becomes an
``ExpandedLayers`` (a ModuleList subclass and the adapter's module) holding base and new blocks in
order, each attention's ``layer_idx`` (its KV-cache slot), ``config.num_hidden_layers`` and
``config.layer_types`` (Qwen2's per-layer sliding windows) renumbered to the expanded depth, so
``generate`` with a cache, the fast path and a merged export (``deltatune merge``: a model directory of
L + N layers) see an ordinary deeper model. When the adapter is off (``disabled()``, another adapter
active) each new block passes its input through (a forward hook, present only then). ``remove_adapter``
puts the base's list, indices and config back.

Files (deltatune's own format): the config (num_blocks, positions, train, LoRA settings) and, for
"full", the new blocks' tensors as ``<layers path>/<expanded index>.<key>`` (``model.layers/2.mlp.
down_proj.weight``: the merged model's own keys); for "lora", the LoRA tensors of the new blocks'
linears (``model.layers.2.self_attn.q_proj/A``). Loading re-creates the copies from the base and checks
every key and shape first. One block expansion per model, added before other adapters.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from deltatune.adapters.geometry import geometry_for
from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.method import register_method
from deltatune.adapters.protocol import AdapterModule, adapter_modules
from deltatune.adapters.surgery import adapter_record
from deltatune.adapters.targeting import has_module, select_targets, set_module
from deltatune.adapters.virtual_tokens import text_config
from deltatune.methods.lora import LORA, LoraConfig

__all__ = ["BlockExpansionConfig", "ExpandedLayers", "BLOCK_EXPANSION", "even_positions", "decoder_layers"]

ZEROED = ("self_attn.o_proj", "mlp.down_proj")
"""The projections that write into the residual stream: zero in a new block (LLaMA-Pro's identity init)."""


@dataclass
class BlockExpansionConfig:
    """Settings of one block expansion (LLaMA-Pro)."""

    method: ClassVar[str] = "block_expansion"

    num_blocks: int | None = None
    """How many decoder blocks to insert (with a list of positions: its length)."""
    positions: str | list[int] = "even"
    """"even": one new block after every L/N base layers; or the base layers (0-based) each new block follows."""
    train: Literal["full", "lora"] = "full"
    """"full": the new blocks train in full; "lora": they stay frozen copies and LoRA on their linears trains."""
    r: int = 8
    """train="lora": LoRA rank on the new blocks' linears."""
    alpha: float = 16.0
    """train="lora": LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """train="lora": dropout on LoRA's input."""
    targets: list[str] | str = "all-linear"
    """train="lora": the new blocks' linears that get LoRA: name suffixes, a regex on the name inside the block, or "all-linear"."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. the output head)."""

    def __post_init__(self):
        if isinstance(self.positions, tuple):
            self.positions = list(self.positions)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.positions, list):
            if not self.positions or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in self.positions):
                raise ValueError(f"BlockExpansionConfig: positions must be \"even\" or a non-empty list of base "
                                 f"layer indices (>= 0), got {self.positions!r}")
            if len(set(self.positions)) != len(self.positions):
                raise ValueError(f"BlockExpansionConfig: positions {self.positions} repeat a layer")
            self.positions = sorted(self.positions)
            if self.num_blocks is None:
                self.num_blocks = len(self.positions)
            if self.num_blocks != len(self.positions):
                raise ValueError(f"BlockExpansionConfig: num_blocks={self.num_blocks} but {len(self.positions)} "
                                 f"positions {self.positions}")
        elif self.positions != "even":
            raise ValueError(f"BlockExpansionConfig: positions must be \"even\" or a list of layer indices, "
                             f"got {self.positions!r}")
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(f"BlockExpansionConfig: num_blocks must be a positive integer (how many blocks to "
                             f"insert; --num-blocks N), got {self.num_blocks!r}")
        if self.train not in ("full", "lora"):
            raise ValueError(f"BlockExpansionConfig: train must be \"full\" or \"lora\", got {self.train!r}")
        if self.train == "lora":
            self.lora()  # LoraConfig checks r and dropout

    def lora(self) -> LoraConfig:
        """The LoRA settings of the new blocks' linears (train="lora")."""
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def replace(self, **changes) -> "BlockExpansionConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def even_positions(layers: int, blocks: int) -> list[int]:
    """The base layers new blocks follow for "even": the last layer of each of ``blocks`` groups of
    ``layers / blocks`` (LLaMA-Pro's grouping; group sizes differ by at most one when it does not divide)."""
    return [(g + 1) * layers // blocks - 1 for g in range(blocks)]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the model's decoder blocks: the one ``nn.ModuleList`` of Llama-style blocks
    (``self_attn.o_proj`` and ``mlp.down_proj``). ValueError if there is none or more than one."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(has_module(b, p) for b in m for p in ZEROED)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[n for n, _ in found]})"
        raise ValueError(f"block_expansion: {type(model).__name__} has {what} list of decoder blocks with "
                         f"self_attn.o_proj and mlp.down_proj (Llama, Qwen2, Mistral-style); it needs exactly one")
    return found[0]


def _text_config(model: nn.Module):
    return text_config(model, "block_expansion needs")


def _plan(model: nn.Module, cfg: BlockExpansionConfig) -> tuple[str, nn.ModuleList, list[int]]:
    """(layers path, layers, the base layer each new block follows), checked: ValueError before any change."""
    path, layers = decoder_layers(model)
    if isinstance(layers, ExpandedLayers):
        raise ValueError(f"block_expansion: {path} already holds new blocks (adapter {layers.adapter!r}); one block "
                         f"expansion per model (remove_adapter it first)")
    count = len(layers)
    config = _text_config(model)
    if getattr(config, "num_hidden_layers", count) != count:
        raise ValueError(f"block_expansion: config.num_hidden_layers is {config.num_hidden_layers} but {path} holds "
                         f"{count} blocks")
    if cfg.positions == "even":
        if cfg.num_blocks > count:
            raise ValueError(f"block_expansion: positions=\"even\" spreads at most one block per layer; "
                             f"num_blocks={cfg.num_blocks} > {count} layers (give a list of positions)")
        after = even_positions(count, cfg.num_blocks)
    else:
        after = list(cfg.positions)
        if after[-1] >= count:
            raise ValueError(f"block_expansion: position {after[-1]} is past the last of the {count} layers of {path}")
    for i in after:
        block = layers[i]
        nested = [n for n, m in block.named_modules() if isinstance(m, AdapterModule)]
        if nested:
            raise ValueError(f"block_expansion: layer {i} already carries adapters at {nested[:3]}; add the block "
                             f"expansion before other adapters (its copies must be of the base's own weights)")
        tensors = [*block.named_parameters(), *block.named_buffers()]
        odd = [n for n, t in tensors if not t.is_floating_point()]
        odd += [p for p in ZEROED if not isinstance(getattr(block.get_submodule(p), "weight", None), nn.Parameter)]
        if odd:
            raise ValueError(f"block_expansion: layer {i} has non-float or no plain weights at {odd[:3]} (a quantized base); "
                             f"new blocks are copies of the base's float weights: use a float base (no --quant)")
        if cfg.train == "lora":
            _lora_targets(block, cfg)  # ValueError if the targets match no linear of the block
    return path, layers, after


def _lora_targets(block: nn.Module, cfg: BlockExpansionConfig) -> list[str]:
    """Names (inside a new block) of the linears that get LoRA under ``cfg``."""
    return select_targets(block, cfg.lora(), LORA.supports)


def _new_block(source: nn.Module) -> nn.Module:
    """A copy of ``source`` whose residual-stream writers (o_proj, down_proj and their biases) are zero."""
    block = copy.deepcopy(source)
    with torch.no_grad():
        for path in ZEROED:
            for p in block.get_submodule(path).parameters(recurse=False):
                p.zero_()
    return block


def _pass_through(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook of a switched-off new block: its output is its input (the block is skipped)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class ExpandedLayers(nn.ModuleList):
    """The decoder's block list with new blocks inserted: an ``nn.ModuleList`` (what the model's forward
    iterates) and the adapter module of one block expansion (``AdapterModule``)."""

    nests_adapters = True  # LoRA deltas of train="lora" (and other adapters) inside stay visible
    holds_model_weights = True  # describe()'s roles are state-dict keys of the expanded model under its path

    def __init__(self, base: nn.ModuleList, after: list[int], name: str, train: str, config):
        blocks, new = [], []
        for i, block in enumerate(base):
            blocks.append(block)
            new.append(False)
            if i in after:
                blocks.append(_new_block(block))
                new.append(True)
        super().__init__(blocks)
        self.adapter: str | None = name
        self.train_full = train == "full"
        self.is_new = new  # by expanded index
        self._config = config  # the model's (text) config: num_hidden_layers, layer_types
        self._base_config = {k: copy.copy(getattr(config, k)) for k in ("num_hidden_layers", "layer_types")
                             if hasattr(config, k)}
        types = getattr(config, "layer_types", None)
        self._types = None if types is None else [types[i] for i in self._sources()]
        self._active: list[str] = []
        self._enabled = True
        self._hooks: dict[int, object] = {}
        self.merged: list[str] = []  # new blocks are already the model's own weights: nothing to fold
        self._renumber(list(self), len(self), self._types)

    def _sources(self) -> list[int]:
        """The base layer of each expanded index: its own, or for a new block the layer it copies."""
        out, i = [], -1
        for new in self.is_new:
            i += 0 if new else 1
            out.append(i)
        return out

    def _renumber(self, blocks: list[nn.Module], count: int, types) -> None:
        """Cache slots (attention ``layer_idx``) in list order, and the config's depth and layer types."""
        for k, block in enumerate(blocks):
            for m in (block, getattr(block, "self_attn", None)):
                if m is not None and hasattr(m, "layer_idx"):
                    m.layer_idx = k
        self._config.num_hidden_layers = count
        if types is not None:
            self._config.layer_types = list(types)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # the decoder's `self.layers[: num_hidden_layers]`: a plain list
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def new_blocks(self) -> dict[int, nn.Module]:
        """The new blocks by expanded index."""
        return {k: b for k, b in enumerate(self) if self.is_new[k]}

    # -- on / off -----------------------------------------------------------------------------------------
    @property
    def active(self) -> list[str]:
        return self._active

    @active.setter
    def active(self, names: list[str]) -> None:
        self._active = list(names)
        self._sync()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._sync()

    def _sync(self) -> None:
        """Pass-through hooks on the new blocks exactly while the adapter is off (none while it runs, so
        the fast path sees plain blocks)."""
        on = self._enabled and self.adapter in self._active
        for k, block in self.new_blocks().items():
            if on and k in self._hooks:
                self._hooks.pop(k).remove()
            elif not on and k not in self._hooks:
                self._hooks[k] = block.register_forward_hook(_pass_through, with_kwargs=True)

    # -- the adapter protocol -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [self.adapter] if self.adapter is not None else []

    def _own(self) -> dict[str, torch.Tensor]:
        """The new blocks' own tensors (not other adapters' inside them) by "<expanded index>.<key>"."""
        out = {}
        for k, block in self.new_blocks().items():
            inner = {id(p) for _, m in adapter_modules(block) for p in m.adapter_parameters()}
            for key, t in block.state_dict(keep_vars=True).items():
                if id(t) not in inner:
                    out[f"{k}.{key}"] = t
        return out

    def adapter_parameters(self, name: str | None = None, role: str | None = None) -> list[nn.Parameter]:
        if not self.train_full or (name is not None and name != self.adapter) or self.adapter is None:
            return []  # train="lora": the copies are frozen; the LoRA deltas inside report their own
        return [t for key, t in self._own().items() if isinstance(t, nn.Parameter) and (role is None or key == role)]

    def remove(self, name: str) -> None:
        if name == self.adapter:
            self.adapter = None

    def restore(self) -> nn.ModuleList:
        """The base's own list, its blocks renumbered and the config's depth and layer types as they were."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        base = [b for k, b in enumerate(self) if not self.is_new[k]]
        self._renumber(base, len(base), None)
        for key, value in self._base_config.items():
            setattr(self._config, key, value)
        return nn.ModuleList(base)

    def merge(self, name: str) -> None:  # the new blocks are the model's weights already
        pass

    def unmerge(self, name: str) -> None:
        pass

    def describe(self, name: str) -> dict[str, torch.Tensor]:
        if not self.train_full:
            return {}  # train="lora": the copies are the base's (re-made on load); LoRA deltas describe themselves
        return {k: t.detach() for k, t in self._own().items()}

    def load_roles(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        own = self._own()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise ValueError(f"block_expansion: no tensor {unknown[:3]} among the new blocks")
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)


class BlockExpansionMethod:
    """Block expansion as a model-level method (``deltatune.adapters.ModelMethod``)."""

    name = "block_expansion"
    config = BlockExpansionConfig

    def add_to(self, model: nn.Module, cfg: BlockExpansionConfig, name: str) -> None:
        path, layers, after = _plan(model, cfg)
        record = adapter_record(model, create=True)
        if record.requires_grad is None:  # under the base's own names, before they shift (remove_adapter restores)
            record.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        expanded = ExpandedLayers(layers, after, name, cfg.train, _text_config(model))
        if cfg.train == "lora":
            lora = cfg.lora()
            for k, block in expanded.new_blocks().items():
                for target in _lora_targets(block, cfg):
                    layer = DeltaLayer(block.get_submodule(target), geometry_for(block.get_submodule(target)))
                    set_module(block, target, layer)
                    layer.add(name, LORA.make_delta(layer, lora, f"{path}.{k}.{target}", torch.float32))
        set_module(model, path, expanded)

    def model_shapes(self, model: nn.Module, cfg: BlockExpansionConfig) -> dict[str, dict[str, tuple[int, ...]]]:
        """{module path: {role: shape}} of the adapter's tensors on ``model`` (a base without new blocks)."""
        path, layers, after = _plan(model, cfg)
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for n, i in enumerate(after):
            k = i + 1 + n  # expanded index of the copy of layer i
            if cfg.train == "full":
                own = shapes.setdefault(path, {})
                for key, t in layers[i].state_dict().items():
                    own[f"{k}.{key}"] = tuple(t.shape)
                continue
            for target in _lora_targets(layers[i], cfg):
                module = layers[i].get_submodule(target)
                shapes[f"{path}.{k}.{target}"] = LORA.shapes(geometry_for(module), module, cfg.lora(),
                                                             f"{path}.{k}.{target}")
        return shapes


BLOCK_EXPANSION = register_method(BlockExpansionMethod())
