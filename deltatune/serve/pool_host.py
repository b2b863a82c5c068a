"""The host side of an adapter pool: reading and checking a LoRA directory (``read_adapter``: the rules of
``AdapterPool.register``), and its factors packed into one flat host buffer, checked in one pass.

``HostArena.allocate(numel)`` hands out a flat run of a large block: with ``pin`` (a pool on a GPU) the
blocks are page-locked, so a reload into a device slot is an asynchronous copy. Pinning each of an
adapter's factors apart (7 projections x layers x 2: 224 tensors of a 1B Llama) costs one driver call
each, and torch's caching host allocator rounds every request up to a power of two; one block of
``block_bytes`` (a power of two, or the next one above a larger adapter) holds many adapters instead. A
block is freed once no adapter in it is registered and the arena has moved on to another (the adapters
hold views of it); the space of an adapter unregistered before then is not reused.

``all_finite(flat)`` checks a packed buffer in one pass over its bits: a float is infinite or NaN exactly
when its exponent bits are all set, i.e. when its bits with the sign cleared reach those of +inf. On a CPU
this is ~10x faster than the float32 sum it replaces (a bf16 sum converts every element, and 224 small
reductions an adapter cost ~3 s for a 1B adapter on the 2-core test machine against ~0.2 s for one pass).
Imports torch only (numpy, where torch has it, for the bit test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.adapters import DeltaLayer, geometry_for, select_targets
from deltatune.formats import peft
from deltatune.formats.files import CONFIG_NAME, AdapterFileError, read_adapter_files
from deltatune.methods.dora import row_norms_sq, update_norm
from deltatune.methods.lora import LORA, LoraConfig

__all__ = ["Adapter", "Factors", "HostArena", "all_finite", "dora_output_scale", "read_adapter"]

BLOCK_BYTES = 1 << 30
"""Bytes of one host block (a power of two: the pinned allocator's rounding loses nothing)."""

_BITS = {  # dtype -> (integer view, mask clearing the sign, bits of +inf)
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
_CHUNK = 1 << 22  # elements checked at a time (a scratch buffer of at most 32 MB)


@dataclass(frozen=True)
class Factors:
    """One adapter on one layer, on the host: A (r, in), B (out, r), its scale, and for DoRA its output scale
    ``f = m / ||W + s·BA||_c`` (out,) over this model's base weight W (None for LoRA)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    out_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    layers: dict[str, Factors]  # by module path
    flat: torch.Tensor | None = None  # the one host buffer every factor is a view of

    def nbytes(self) -> int:
        return sum(f.A.nbytes + f.B.nbytes + (f.out_scale.nbytes if f.out_scale is not None else 0)
                   for f in self.layers.values())

    @property
    def dora(self) -> bool:
        """Whether any layer scales its output (DoRA)."""
        return any(f.out_scale is not None for f in self.layers.values())


class HostArena:
    """Flat host buffers for adapters, cut from blocks of ``block_bytes`` (page-locked with ``pin``)."""

    def __init__(self, dtype: torch.dtype, pin: bool, block_bytes: int = BLOCK_BYTES):
        self.dtype, self.pin = dtype, pin
        self.block_elems = max(1, block_bytes // torch.empty((), dtype=dtype).element_size())
        self._block: torch.Tensor | None = None
        self._used = 0
        self.blocks_made = 0

    def allocate(self, numel: int) -> torch.Tensor:
        """A flat (numel,) tensor of ``dtype`` on the host, uninitialised."""
        if self._block is None or self._used + numel > self._block.numel():
            size = max(self.block_elems, 1 << max(0, numel - 1).bit_length())
            self._block = torch.empty(size, dtype=self.dtype, pin_memory=self.pin)
            self._used = 0
            self.blocks_made += 1
        out = self._block[self._used:self._used + numel]
        self._used += numel
        return out

    def give_back(self, flat: torch.Tensor) -> None:
        """Return ``flat`` if it is the last run handed out (an adapter refused after packing)."""
        if self._block is not None and flat.numel() and flat.data_ptr() + flat.nbytes == \
                self._block.data_ptr() + self._used * self._block.element_size():
            self._used -= flat.numel()


def all_finite(flat: torch.Tensor) -> bool:
    """Whether every element of the host tensor ``flat`` is finite (no NaN, no infinity)."""
    spec = _BITS.get(flat.dtype)
    if spec is None or flat.device.type != "cpu":
        return bool(torch.isfinite(flat).all())
    view, mask, inf = spec
    bits = flat.reshape(-1).view(view)
    try:
        import numpy as np
    except ImportError:  # torch's integer ops: slower than numpy's, still one pass
        return not any(bool(((bits[i:i + _CHUNK] & mask) >= inf).any()) for i in range(0, bits.numel(), _CHUNK))
    a = bits.numpy()
    scratch = np.empty(min(a.size, _CHUNK), dtype=a.dtype)
    for i in range(0, a.size, _CHUNK):
        part = a[i:i + _CHUNK]
        masked = np.bitwise_and(part, mask, out=scratch[:part.size])
        if masked.size and masked.max() >= inf:
            return False
    return True


def _expected(model: nn.Module, cfg: LoraConfig, config_path: Path) -> dict[str, tuple[str, str, tuple]]:
    """{file key: (module path, role, shape)} of the tensors ``cfg`` calls for on ``model``."""
    try:
        targets = select_targets(model, cfg, LORA.supports)
    except ValueError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    expected = {}
    for target in targets:
        module = model.get_submodule(target)
        geometry = geometry_for(module)
        if geometry.family != "linear":
            raise AdapterFileError(f"{config_path}: target {target!r} is a {geometry.name} layer; the pool serves "
                                   f"LoRA on linear layers only")
        base = module.base_module if isinstance(module, DeltaLayer) else module
        shapes = LORA.shapes(geometry, base, cfg, target)
        for role, shape in shapes.items():
            expected[peft.file_key(target, "lora", geometry.name, role)] = (target, role, tuple(shape))
    return expected


@torch.no_grad()
def dora_output_scale(module: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
                      norms: dict | None = None, key: str = "") -> torch.Tensor:
    """DoRA's output scale ``f = m / ||W + s·BA||_c`` (out,) float32 on the host, for the linear layer ``module``
    (plain, wrapped or 4-bit: its base weight W dense, ``Geometry.base_weight``), computed on W's device without
    the (out, in) matrix (``methods.dora.update_norm``). ``norms``: a cache of ``||W_i||²`` by ``key`` (the
    layer's path; the pool's base weights do not change while it serves)."""
    W = geometry_for(module).base_weight(module)
    device, exact = W.device, torch.float32
    A, B = A.to(device, exact), B.to(device, exact)
    if W.is_cuda and W.dtype in (torch.bfloat16, torch.float16):  # fp32 out: W Aᵀ unrounded, W not copied
        wa = torch.mm(A.to(W.dtype), W.T, out_dtype=exact).T
    else:
        wa = (A @ W.to(exact).T).T  # (out, r)
    wsq = norms.get(key) if norms is not None else None
    if wsq is None:
        wsq = row_norms_sq(W, exact)
        if norms is not None:
            norms[key] = wsq
    return (magnitude.to(device, exact).reshape(-1) / update_norm(wa, wsq, A, B, scale)).cpu()


def read_adapter(model: nn.Module, name: str, root: Path, dtype: torch.dtype, arena: HostArena,
                 plans: dict | None = None, norms: dict | None = None) -> Adapter:
    """The checked host copy of the LoRA adapter directory ``root`` for ``model``, packed in ``arena`` in ``dtype``
    (``AdapterPool.register``'s rules; AdapterFileError names the file and key of what is wrong). ``plans``: a
    dict caching the keys and shapes each config calls for (resolving targets on a 1B Llama is ~10 ms). DoRA
    (``use_dora``): each layer's magnitude m is held as its output scale ``f = m / ||W + s·BA||_c`` over this
    model's weights (``dora_output_scale``; ``norms`` caches ``||W_i||²`` by layer)."""
    cfg, tensors, weights_path = read_adapter_files(root)
    config_path = root / CONFIG_NAME
    if not isinstance(cfg, LoraConfig):
        raise AdapterFileError(f"{config_path}: the adapter pool serves LoRA adapters; this is a "
                               f"{type(cfg).method} adapter (load it into the model with load_adapter instead)")
    if cfg.modules_to_save:
        raise AdapterFileError(f"{config_path}: modules_to_save {cfg.modules_to_save} are full module copies, "
                               f"which the pool does not hold (load_adapter + routed serves them)")
    plan = repr(cfg)  # every field of the config: the same config selects the same keys and shapes on this model
    expected = plans.get(plan) if plans is not None else None
    if expected is None:
        expected = _expected(model, cfg, config_path)
        if plans is not None:
            plans[plan] = expected
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterFileError(f"{weights_path}: key {extra[0]!r} is not a LoRA tensor of a module the config's "
                               f"target_modules select on {type(model).__name__}"
                               + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFileError(f"{weights_path}: no tensor for key {missing[0]!r}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                               + " that the config's target_modules call for")
    parts: dict[str, dict[str, str]] = {}  # target -> role -> file key
    for key, (target, role, shape) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            rank, alpha = LORA.rank_alpha(cfg, target)
            raise AdapterFileError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}, but module "
                                   f"{target!r} with rank {rank} needs {shape}")
        if not value.is_floating_point():
            raise AdapterFileError(f"{weights_path}: key {key!r} holds non-finite or non-float values")
        parts.setdefault(target, {})[role] = key
    # one flat host buffer (pinned on a GPU) in the pool's dtype, checked in one pass (serve.pool_host)
    flat = arena.allocate(sum(tensors[key].numel() for key in expected))
    views, at = {}, 0
    for key, (target, role, shape) in expected.items():
        n = tensors[key].numel()
        views[key] = flat[at:at + n].view(shape)
        views[key].copy_(tensors[key])
        at += n
    if not all_finite(flat):  # the first bad key named; in the pool's dtype, a value it cannot hold is refused
        arena.give_back(flat)
        bad = next(key for key in expected if not all_finite(views[key]))
        raise AdapterFileError(f"{weights_path}: key {bad!r} holds non-finite or non-float values"
                               + (f" (in {dtype})" if tensors[bad].dtype != dtype else ""))
    layers = {}
    for target, roles in parts.items():
        rank, alpha = LORA.rank_alpha(cfg, target)
        scale = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
        out_scale = None
        if "magnitude" in roles:  # DoRA: m replaced by f in the packed copy, from the file's own precision
            key = roles["magnitude"]
            f = dora_output_scale(model.get_submodule(target), tensors[roles["A"]], tensors[roles["B"]], scale,
                                  tensors[key], norms, target)
            out_scale = views[key]
            out_scale.copy_(f)
            if not all_finite(out_scale):
                arena.give_back(flat)
                raise AdapterFileError(f"{weights_path}: key {key!r}: DoRA's output scale m / ||W + s·BA|| is not "
                                       f"finite on module {target!r} (a zero norm, or beyond {dtype})")
        layers[target] = Factors(views[roles["A"]], views[roles["B"]], scale, out_scale)
    return Adapter(name, str(root), layers, flat)
