"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021 AdapterFusion,
arXiv:2005.00247; the parallel form of He et al. 2022, arXiv:2110.04366).

A bottleneck ``a(v) = scale * up(act(down(v)))`` (down: d -> d / reduction_factor, up back; Sec. 2.1 of
Houlsby et al.) is inserted in every transformer layer:

* ``houlsby``: after the attention output and after the feed-forward output, before the residual add
  and the layer norm: ``h + a(h)``;
* ``pfeiffer``: after the feed-forward block only; in a post-norm block (BERT) as AdapterHub's
  ``seq_bn`` does it, on the block's layer-normed output: ``LN(h + a(LN(h + x)) + x)``;
* ``parallel``: beside the feed-forward block, reading its input: ``h + a(x)``.

Where they go is found from the model's structure (``find_sites``): BERT-style post-norm sublayer
outputs (``BertSelfOutput``/``BertOutput``: the whole block is wrapped, ``methods/bottleneck_block.py``,
so the adapter sits after the dropout exactly where AdapterHub puts it) and pre-norm decoder layers
(Llama/Qwen2/Mistral ``self_attn.o_proj`` / ``mlp.down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``:
a ``BottleneckDelta`` on that projection's output; ``parallel`` wraps the ``mlp``). ``targets`` can name
the modules instead; on a single linear layer the delta is ``y + a(y)`` (``parallel``: ``y + a(x)``).

Trainable layer norms (``train_layer_norms``): a post-norm block's LayerNorm gets the adapter's own copy
inside the block (``Bottleneck.norm_weight`` / ``norm_bias``); a pre-norm decoder layer's norms
(``input_layernorm`` / ``post_attention_layernorm``, GPT-2's ``ln_1`` / ``ln_2``) are modules of their own
and get a ``NormCopy`` each (``methods/bottleneck_norm.py``).

A bottleneck is non-linear: merging is refused with a clear error, and the fused path runs it plainly.
Files: deltatune's own format (``formats/native.py``); AdapterHub's safetensors files load through
``formats/adapterhub.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from deltatune.adapters.geometry import Geometry, register_geometry
from deltatune.adapters.method import register_method
from deltatune.adapters.targeting import matches_name
from deltatune.methods.bottleneck_block import (
    ACTIVATIONS, BLOCK, BlockBottleneck, Bottleneck, BottleneckBlock, block_width, is_post_norm_output,
)
from deltatune.methods.bottleneck_norm import NORM, NormCopy, is_layer_norm

__all__ = ["BottleneckConfig", "BottleneckDelta", "BottleneckMethod", "BOTTLENECK", "find_sites", "PLACEMENTS"]

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
_INITS = ("mam_adapter", "bert", "houlsby")
# (attention module, its output projection, feed-forward module, its output projection) of pre-norm decoders
_DECODER_PARTS = (("self_attn", "o_proj", "mlp", "down_proj"), ("attn", "c_proj", "mlp", "c_proj"))


@dataclass
class BottleneckConfig:
    """Settings of one bottleneck adapter (AdapterHub's ``double_seq_bn`` / ``seq_bn`` / ``par_bn``)."""

    method: ClassVar[str] = "bottleneck"

    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    """Where the bottlenecks go: "houlsby" after attention and feed-forward, "pfeiffer" after the feed-forward only, "parallel" beside the feed-forward."""
    reduction_factor: float = 16.0
    """Bottleneck size = hidden size // reduction_factor (at least 1)."""
    activation: Literal["relu", "gelu", "swish", "silu", "tanh"] = "relu"
    """Non-linearity between the down and up projections ("swish" is SiLU)."""
    scaling: float = 1.0
    """Factor on the bottleneck's output (He et al. 2022 use 4.0 for parallel adapters)."""
    dropout: float = 0.0
    """Dropout on the bottleneck's output while training."""
    init: Literal["mam_adapter", "bert", "houlsby"] = "mam_adapter"
    """"mam_adapter": down Kaiming-uniform, up zero (exactly the base model at init); "bert": both N(0, 0.02) (AdapterHub's default); "houlsby": both N(0, 1e-2) truncated."""
    train_layer_norms: bool = False
    """The adapter trains its own copies of the layer norms (Houlsby et al. Sec. 2.1): an adapted post-norm block's (BERT) LayerNorm; every norm of a pre-norm decoder layer holding an adapted module (Llama/Qwen2/Mistral input_layernorm, post_attention_layernorm; GPT-2 ln_1, ln_2). The base norms stay as they are."""
    targets: list[str] | str = "auto"
    """Modules to adapt (suffixes or a full-name regex); "auto": found from the model's structure by placement."""
    exclude: list[str] | str | None = None
    """Modules never adapted: suffixes or a full-name regex."""
    modules_to_save: list[str] | None = None
    """Module-name suffixes to train in full, as copies per adapter (e.g. a classification head)."""
    dtype: str | None = "float32"
    """Adapter dtype ("float32", "bfloat16", "float16"), or None for the base weight's dtype."""

    def __post_init__(self):
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"BottleneckConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in _INITS:
            raise ValueError(f"BottleneckConfig.init must be one of {_INITS}, got {self.init!r}")
        if not self.reduction_factor > 0:
            raise ValueError(f"BottleneckConfig.reduction_factor must be > 0, got {self.reduction_factor!r}")

    def replace(self, **changes) -> "BottleneckConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def find_targets(self, model: nn.Module) -> list[str] | str:
        """The target spec the core selects with: ``targets``, or for "auto" the sites ``find_sites`` finds
        for ``placement`` (ValueError naming what was looked for where there are none)."""
        sites = find_sites(model, required=self.targets == "auto")  # also makes the blocks it finds wrappable
        if self.targets != "auto":
            if not self.train_layer_norms:
                return self.targets
            paths = [n for n, _ in model.named_modules() if n and matches_name(n, self.targets)]
        elif self.placement == "houlsby":
            paths = [p for kind, p in sites if kind in ("post_norm_attention", "post_norm_ffn", "attention_out", "ffn_out")]
        elif self.placement == "pfeiffer":
            paths = [p for kind, p in sites if kind in ("post_norm_ffn", "ffn_out")]
        else:
            paths = [p for kind, p in sites if kind in ("post_norm_ffn", "mlp")]
        if self.train_layer_norms:  # the norms of the decoder layers that hold an adapted module
            norms = [p for kind, p in sites if kind == "norm"
                     and any(t.startswith(p.rpartition(".")[0] + ".") for t in paths) and p not in paths]
            paths = paths + norms
        return paths


def _plain_children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def find_sites(model: nn.Module, required: bool = True) -> list[tuple[str, str]]:
    """``(kind, module path)`` of every place for a bottleneck in ``model``, in module order.

    Kinds: "post_norm_attention" / "post_norm_ffn" (a BERT-style sublayer output, see
    ``is_post_norm_output``; attention when its parent also holds the attention itself as ``self``),
    "attention_out" / "ffn_out" (a pre-norm decoder layer's attention and MLP output projections),
    "mlp" (that layer's MLP) and "norm" (each of that layer's own layer norms, ``is_layer_norm``). The
    blocks found are registered as block geometry (``BLOCK``), the norms as ``NORM``, so the core can
    wrap them. With ``required``, raises ValueError naming what was looked for when there is no site.
    """
    sites, skip = [], []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        for inner in ("deltas", "copies", "bottlenecks"):  # adapters' own modules are no sites
            if isinstance(getattr(module, inner, None), nn.ModuleDict):
                skip.append(f"{path}.{inner}." if path else f"{inner}.")
        if path and is_post_norm_output(module):
            parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
            kind = "post_norm_attention" if "self" in _plain_children(parent) else "post_norm_ffn"
            register_geometry(type(getattr(module, "_base", (module,))[0]), BLOCK)
            sites.append((kind, path))
            continue
        children = _plain_children(module)
        for attn, attn_out, ffn, ffn_out in _DECODER_PARTS:
            a, f = children.get(attn), children.get(ffn)
            if a is None or f is None or not hasattr(a, attn_out) or not hasattr(f, ffn_out):
                continue
            sites += [("attention_out", f"{path}.{attn}.{attn_out}"), ("ffn_out", f"{path}.{ffn}.{ffn_out}"),
                      ("mlp", f"{path}.{ffn}")]
            register_geometry(type(getattr(f, "_base", (f,))[0]), BLOCK)
            for name, child in children.items():
                if is_layer_norm(child):
                    register_geometry(type(getattr(child, "base_module", child)), NORM)
                    sites.append(("norm", f"{path}.{name}" if path else name))
            break
    if not sites and required:
        raise ValueError(
            f"no place for a bottleneck adapter in {type(model).__name__}: found no post-norm sublayer output "
            f"(children 'dense', 'dropout', 'LayerNorm' and forward(hidden_states, input_tensor), as BERT's) and no "
            f"decoder layer with self_attn.o_proj and mlp.down_proj (or attn.c_proj and mlp.c_proj); name the "
            f"modules with targets=[...]")
    return sites


class BottleneckDelta(nn.Module):
    """A bottleneck on one layer's output (the ``DeltaLayer`` delta): ``y + a(y)``, or ``y + a(x)`` (parallel)."""

    method = "bottleneck"
    changes_base = False

    def __init__(self, bottleneck: Bottleneck, parallel: bool):
        super().__init__()
        self.bottleneck = bottleneck
        self.parallel = parallel

    def roles(self) -> dict[str, nn.Parameter]:
        return self.bottleneck.roles()

    def settings(self) -> dict:
        return {"size": self.bottleneck.size, "parallel": self.parallel}

    def signature(self) -> tuple:
        return (self.parallel, self.bottleneck.activation, self.bottleneck.scale)

    def attach(self, layer: nn.Module) -> None:
        pass

    def detach(self, layer: nn.Module) -> None:
        pass

    def low_rank(self, training: bool):
        return None  # non-linear: the plain forward runs

    def apply(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, active: bool) -> torch.Tensor:
        if not active:
            return y
        return y + self.bottleneck(x if self.parallel else y)  # (..., out)

    def merge_delta(self, layer: nn.Module) -> torch.Tensor:
        raise ValueError("a bottleneck adapter's output is not linear in the base weights, so it cannot be "
                         "merged into them (keep it unmerged)")

    unmerge_delta = merge_delta


def _size(width: int, cfg: BottleneckConfig) -> int:
    return max(1, int(width // cfg.reduction_factor))  # AdapterHub: int(hidden_size // reduction_factor), at least 1


class BottleneckMethod:
    """Bottleneck adapters as a strategy object for the core (``deltatune.adapters.Method``)."""

    name = "bottleneck"
    config = BottleneckConfig
    mergeable = False

    def supports(self, geometry: Geometry) -> bool:
        return geometry.family in ("linear", "block", "norm")

    def _dims(self, geometry: Geometry, base: nn.Module, cfg: BottleneckConfig) -> tuple[int, int, int, bool]:
        """(d_in, size, d_out, post-norm block?) of the bottleneck at ``base``."""
        if geometry.family == "block":
            width = block_width(base)
            return width, _size(width, cfg), width, is_post_norm_output(base)
        fan_in, fan_out = geometry.features(base)
        return (fan_in if cfg.placement == "parallel" else fan_out), _size(fan_out, cfg), fan_out, False

    def shapes(self, geometry: Geometry, base: nn.Module, cfg: BottleneckConfig, path: str) -> dict[str, tuple[int, ...]]:
        if geometry.family == "norm":  # a pre-norm decoder's own norm: the adapter's copy of its parameters
            return {name: tuple(p.shape) for name, p in base.named_parameters(recurse=False)}
        d_in, size, d_out, post_norm = self._dims(geometry, base, cfg)
        shapes = {"down_weight": (size, d_in), "down_bias": (size,), "up_weight": (d_out, size), "up_bias": (d_out,)}
        if cfg.train_layer_norms and post_norm:
            shapes.update(norm_weight=(d_out,), norm_bias=(d_out,))
        return shapes

    def settings(self, cfg: BottleneckConfig, path: str) -> dict:
        return {}

    def make_delta(self, layer: nn.Module, cfg: BottleneckConfig, path: str, dtype: torch.dtype | None):
        geometry = layer.geometry
        base = layer.base_module if not isinstance(layer, BottleneckBlock) else layer
        weight = next(iter(layer.parameters()), None)  # the block's (or layer's) first tensor: device, dtype
        device = weight.device if weight is not None else None
        if dtype is None:
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        if geometry.family == "norm":
            return NormCopy(base, device=device, dtype=dtype)
        d_in, size, d_out, post_norm = self._dims(geometry, base, cfg)
        norm = layer.LayerNorm if cfg.train_layer_norms and post_norm else None
        bottleneck = Bottleneck(d_in, size, d_out, cfg.activation, cfg.scaling, cfg.dropout, cfg.init,
                                norm=getattr(norm, "base_module", norm), device=device, dtype=dtype)
        if isinstance(layer, BottleneckBlock):
            return BlockBottleneck(bottleneck, cfg.placement)
        return BottleneckDelta(bottleneck, cfg.placement == "parallel")


BOTTLENECK = register_method(BottleneckMethod())
