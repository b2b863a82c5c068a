"""kohya's module names for Stable Diffusion models: ``lora_unet_<path>`` / ``lora_te_<path>`` with the
module path's dots as underscores, and SDXL's UNet under the SGM (original Stability) block names.

kohya's sd-scripts trains SD 1.x/2.x on diffusers' ``UNet2DConditionModel``, so those files carry its
paths flattened (``lora_unet_down_blocks_1_attentions_0_proj_in``). It trains SDXL on its own UNet whose
blocks are SGM's (``input_blocks.4.1``, ``middle_block.1``, ``output_blocks.2.2``, resnets with
``in_layers.2`` / ``out_layers.3`` / ``emb_layers.1`` / ``skip_connection``), so SDXL files name modules
that way (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). This file maps diffusers'
paths to SGM's from the block layout (a ``Layout``, read off a model or SDXL's), and splits a flattened
name back into a path with a vocabulary of the multi-word module names these models use (a model is not
always at hand: ``deltatune convert`` works on files alone).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["COMPONENTS", "Layout", "te_kohya_path", "te_model_path", "SDXL_LAYOUT", "layout_of", "flat", "unflatten", "to_sgm", "from_sgm",
           "is_sgm", "component_of", "component_for_model"]

COMPONENTS = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
"""A pipeline component -> the kohya name prefixes of its modules (SD 1.x/2.x: ``lora_te_``; SDXL: te1, te2)."""

# Module names made of several words (diffusers' UNet, SGM's UNet, transformers' CLIP); any other path
# component is one word or a number. The tests check every module path of tiny models round-trips.
_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "add_time_proj", "class_embedding", "encoder_hid_proj", "time_proj",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "conv_act", "activation_fn",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
)
_BY_LENGTH = sorted({tuple(w.split("_")) for w in _WORDS}, key=len, reverse=True)


def flat(path: str) -> str:
    """A module path as kohya writes it: dots as underscores."""
    return path.replace(".", "_")


def unflatten(name: str) -> str:
    """The module path a flattened name stands for (the longest known multi-word name wins)."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        for word in _BY_LENGTH:
            if tuple(tokens[i:i + len(word)]) == word:
                parts.append("_".join(word))
                i += len(word)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


_CLIP_INNER = ("embeddings", "encoder", "final_layer_norm")


def te_kohya_path(path: str) -> str:
    """A text encoder's module path as kohya names it: under ``text_model.`` (transformers 5's
    ``CLIPTextModel`` has no ``text_model`` wrapper; kohya's names keep it)."""
    return "text_model." + path if path.split(".")[0] in _CLIP_INNER else path


def te_model_path(path: str, wrapped: bool) -> str:
    """The inverse of ``te_kohya_path`` for a model whose paths have the ``text_model.`` wrapper or not."""
    return path if wrapped or not path.startswith("text_model.") else path[len("text_model."):]


def component_of(name: str) -> tuple[str, str] | None:
    """(component, prefix) of a kohya module name, or None for a name of no known component."""
    for component, prefixes in COMPONENTS.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                return component, prefix
    return None


def component_for_model(model: nn.Module) -> str:
    """The component a model is by its class: a UNet, CLIP's text model (te), or SDXL's second (with projection)."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet"
    if cls == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if cls.startswith("CLIPText"):
        return "text_encoder"
    raise ValueError(f"which component of a pipeline {cls} is cannot be told from its class: pass "
                     f"component= one of {sorted(COMPONENTS)}")


# -- SGM block names ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A UNet's block structure: per down / up block (resnets, has attentions, has a resampler)."""

    down: tuple[tuple[int, bool, bool], ...]
    up: tuple[tuple[int, bool, bool], ...]


SDXL_LAYOUT = Layout(down=((2, False, True), (2, True, True), (2, True, False)),
                     up=((3, True, True), (3, True, True), (3, False, False)))
"""SDXL's UNet (what SGM-named files are made for when no model is at hand)."""


def layout_of(unet: nn.Module) -> Layout:
    """The block ``Layout`` of a diffusers ``UNet2DConditionModel``."""
    def blocks(seq, sampler):
        return tuple((len(b.resnets), getattr(b, "attentions", None) is not None,
                      getattr(b, sampler, None) is not None) for b in seq)
    return Layout(down=blocks(unet.down_blocks, "downsamplers"), up=blocks(unet.up_blocks, "upsamplers"))


_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}


@functools.lru_cache(maxsize=8)
def _block_table(layout: Layout) -> dict[str, str]:
    """diffusers block prefix -> SGM block prefix, for every block of ``layout``."""
    table, index = {}, 1
    for b, (resnets, attn, sampler) in enumerate(layout.down):
        for j in range(resnets):
            table[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attn:
                table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if sampler:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    for b, (resnets, attn, sampler) in enumerate(layout.up):
        for j in range(resnets):
            table[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attn:
                table[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if sampler:  # after the last layer's resnet (and attention)
            table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attn else 1}.conv"
    table.update({f"mid_block.{k}": v for k, v in _MID.items()})
    return table


def to_sgm(path: str, layout: Layout) -> str | None:
    """The SGM path of diffusers module ``path`` in a UNet of ``layout``; None where SGM has no such module."""
    if path in _TOP:
        return _TOP[path]
    for prefix, sgm in _block_table(layout).items():
        if path == prefix:
            return sgm
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            if ".resnets." in "." + prefix + ".":
                rest = _RESNET.get(rest, rest)
            return f"{sgm}.{rest}"
    return None


def from_sgm(path: str, layout: Layout) -> str | None:
    """The diffusers path of SGM module ``path`` in a UNet of ``layout``; None if it names no known block."""
    for diffusers, sgm in {v: k for k, v in _TOP.items()}.items():
        if path == diffusers:
            return sgm
    best = None
    for prefix, sgm in _block_table(layout).items():
        if (path == sgm or path.startswith(sgm + ".")) and (best is None or len(sgm) > len(best[1])):
            best = (prefix, sgm)
    if best is None:
        return None
    prefix, sgm = best
    rest = path[len(sgm) + 1:]
    if not rest:
        return prefix
    if ".resnets." in "." + prefix + ".":
        rest = {v: k for k, v in _RESNET.items()}.get(rest, rest)
    return f"{prefix}.{rest}"


_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)(\.|$)")


def is_sgm(path: str) -> bool:
    """Whether a UNet module path is in SGM's naming (``input_blocks...``) rather than diffusers'."""
    return bool(_SGM.match(path))
