"""The adapter core: the protocol, layer geometry, the method-agnostic wrapper layer and the verbs.

It knows no particular method (those live in ``deltatune.methods``) and no file format (those live in
``deltatune.formats``). Arrows run downward: surgery -> layer / full copies -> geometry.
"""

from deltatune.adapters.full_copies import FullCopies
from deltatune.adapters.geometry import GEOMETRIES, Geometry, geometry_for, register_geometry
from deltatune.adapters.layer import DeltaLayer
from deltatune.adapters.method import Method, ModelMethod, method_for, method_named, method_names, register_method
from deltatune.adapters.description import FULL, ModulePart, describe_adapter, load_description
from deltatune.adapters.protocol import AdapterModule, adapter_modules, batch_preparers, prepare_batch
from deltatune.adapters.routing import Routing, routed
from deltatune.adapters.surgery import (
    AdapterRecord, adapter_params, adapter_record, add_adapter, delta_layers, disabled, list_adapters, merge,
    remove_adapter, set_active, unmerge,
)
from deltatune.adapters.virtual_tokens import VirtualTokens, virtual_tokens
from deltatune.adapters.targeting import matches_name, output_head, pattern_value, select_targets, set_module

__all__ = [
    "AdapterModule", "adapter_modules", "batch_preparers", "prepare_batch", "ModulePart", "describe_adapter", "load_description", "FULL", "Geometry", "GEOMETRIES", "geometry_for",
    "register_geometry", "DeltaLayer", "FullCopies", "Method", "ModelMethod", "VirtualTokens", "virtual_tokens", "register_method", "method_named", "method_for",
    "method_names", "Routing", "routed", "AdapterRecord", "adapter_record", "add_adapter", "remove_adapter",
    "set_active", "disabled", "merge", "unmerge", "adapter_params", "list_adapters", "delta_layers",
    "matches_name", "pattern_value", "output_head", "select_targets", "set_module",
]
