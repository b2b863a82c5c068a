"""kohya / LyCORIS LoRA files (what civitai and the A1111 / ComfyUI world share) <-> the neutral description.

One safetensors file holds every component of a Stable Diffusion pipeline: keys are
``<kohya module name>.<tensor>``, the module name ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL:
``lora_te1_`` / ``lora_te2_``) with the path's dots as underscores (``formats/kohya_names.py``). Per module:

| family | tensors | deltatune |
|---|---|---|
| LoRA / LoCon | ``lora_down.weight`` (r, in[, k, k]), ``lora_up.weight`` (out, r[, 1, 1]) | LoRA ``A``, ``B`` |
| LoCon Tucker | + ``lora_mid.weight`` (r, r, k, k), down and up 1x1 | LoRA, ``A = mid ×₂ down`` (exact) |
| DoRA | + ``dora_scale`` (out, 1[, 1, 1]), the norm per output row | LoRA ``use_dora``, ``magnitude`` |
| LoHa | ``hada_w1_a`` ... ``hada_w2_b`` (+ ``hada_t1``, ``hada_t2``) | LoHa, same names and shapes |
| LoKr | ``lokr_w1`` / ``lokr_w1_a,b``, ``lokr_w2`` / ``lokr_w2_a,b`` (+ ``lokr_t2``) | LoKr, same |

and ``alpha``, a scalar: the scale is alpha / rank (LyCORIS writes ``alpha * rank / r_factor`` for rsLoRA,
so the file's alpha / rank is the scale for it too); without ``alpha`` kohya takes alpha = rank (scale 1);
a LoKr module with both factors full has scale 1 whatever its alpha (LyCORIS' rule). The Tucker
``lora_mid`` folds into ``A`` because a 1x1, a k x k and a 1x1 convolution compose into one k x k
convolution (A[a, i] = Σ_b mid[a, b] down[b, i]); writing such an adapter back gives the folded form.
The file's metadata (``ss_*`` from sd-scripts, anything else) is carried through conversions, and
``sshs_model_hash`` / ``sshs_legacy_hash`` are recomputed for the tensors written (``formats/kohya_hash.py``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.adapters import DeltaLayer, geometry_for, method_for, select_targets
from deltatune.adapters.description import ModulePart
from deltatune.formats import kohya_names as names
from deltatune.methods.lokr import factorization

__all__ = ["KohyaSkipped", "read_file", "write_file", "group_modules", "module_roles", "config_for",
           "component_parts", "parts_for_model", "file_tensors", "save_for_model", "DELTATUNE_KEY"]

DELTATUNE_KEY = "deltatune_kohya"
"""Metadata key of what a PEFT directory converted from a kohya file keeps to write the same file back."""

_SUFFIXES = {
    "lora": {"lora_down.weight": "A", "lora_up.weight": "B", "lora_mid.weight": "mid", "dora_scale": "magnitude"},
    "loha": {f"hada_{r}": r for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    "lokr": {f"lokr_{r}": r for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_METHOD_OF = {suffix: method for method, table in _SUFFIXES.items() for suffix in table}
_ALPHA = "alpha"
# Key families of other algorithms, named in the error (LyCORIS' full / OFT / BOFT / IA3 / GLoRA; PEFT's own keys).
_UNSUPPORTED = {
    "diff": "LyCORIS full fine-tuning ('diff')", "diff_b": "LyCORIS full fine-tuning ('diff_b')",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "OFT", "rescale": "OFT / BOFT", "on_input": "IA3",
    "weight": "IA3 or a full weight", "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA",
    "b2.weight": "GLoRA", "lora_A.weight": "PEFT's key names (load the PEFT directory instead)",
    "lora_B.weight": "PEFT's key names (load the PEFT directory instead)",
    "bias_indices": "LyCORIS bias", "bias_values": "LyCORIS bias",
}


class KohyaSkipped(UserWarning):
    """What a kohya load left out or assumed: other components' modules, alphas taken as the rank."""


# -- the file --------------------------------------------------------------------------------------------
def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a kohya safetensors file; pickle files are refused, never opened."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: pickle files are never loaded (they can run code); use the .safetensors file")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, metadata


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    """Write a kohya file atomically with ``metadata`` (the sshs hashes recomputed); returns the path."""
    from safetensors.torch import save_file

    from deltatune.formats.atomic import atomic_write
    from deltatune.formats.kohya_hash import with_hashes

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = with_hashes(tensors, {str(k): str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None))
    return path


def group_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{kohya module name: {suffix: tensor}}``; keys of no known family raise, naming them."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    bad: dict[str, list[str]] = {}
    for key, value in tensors.items():
        name, dot, suffix = key.partition(".")
        if dot and (suffix in _METHOD_OF or suffix == _ALPHA):
            modules.setdefault(name, {})[suffix] = value
        else:
            bad.setdefault(_UNSUPPORTED.get(suffix, "no kohya / LyCORIS tensor name"), []).append(key)
    if bad:
        what = "; ".join(f"{why}: {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)} keys)"
                         for why, keys in bad.items())
        raise ValueError(f"{source}: keys this reader does not know, so nothing was loaded: {what}. "
                         f"It reads LoRA / LoCon (lora_down, lora_up, lora_mid, dora_scale), LoHa (hada_*), "
                         f"LoKr (lokr_*) and alpha")
    return modules


# -- one module: file tensors -> roles ------------------------------------------------------------------
def module_roles(name: str, parts: dict[str, torch.Tensor], source: str) -> tuple[str, dict, int, float | None]:
    """(method, {role: tensor}, rank, alpha or None) of one kohya module; incomplete modules raise."""
    methods = {_METHOD_OF[s] for s in parts if s != _ALPHA}
    if len(methods) != 1:
        what = "only an alpha" if not methods else f"tensors of {sorted(methods)} at once"
        raise ValueError(f"{source}: module {name!r} has {what}")
    method = methods.pop()
    roles = {_SUFFIXES[method][s]: t for s, t in parts.items() if s != _ALPHA}
    alpha = float(parts[_ALPHA].float().item()) if _ALPHA in parts else None

    def need(*wanted):
        missing = [s for s, r in _SUFFIXES[method].items() if r in wanted and r not in roles]
        if missing:
            raise ValueError(f"{source}: module {name!r} has no {missing} (a {method} module needs them)")

    if method == "lora":
        need("A", "B")
        if "mid" in roles:  # Tucker: fold the core into A (exact: see the module docstring)
            down, mid = roles["A"], roles.pop("mid")
            exact = torch.promote_types(down.dtype, torch.float32)
            roles["A"] = torch.einsum("abhw,bi->aihw", mid.to(exact), down.to(exact).flatten(1))
        rank = roles["A"].shape[0]
        if "magnitude" in roles:
            m, out = roles["magnitude"], roles["B"].shape[0]
            if m.shape[0] != out or m.numel() != out:
                raise ValueError(f"{source}: module {name!r}: dora_scale has shape {tuple(m.shape)}; deltatune's DoRA "
                                 f"takes the norm per output row ({out}, 1...) (LyCORIS wd_on_out=True), not per input")
            roles["magnitude"] = m.reshape(-1) if roles["B"].dim() == 2 else m.reshape(1, out, *m.shape[2:])
        return method, roles, rank, alpha
    if "magnitude" in roles:
        raise ValueError(f"{source}: module {name!r}: dora_scale on a {method} module (LyCORIS' weight decomposition) "
                         f"is supported for LoRA only")
    if method == "loha":
        need("w1_a", "w1_b", "w2_a", "w2_b", *(("t1", "t2") if "t1" in roles or "t2" in roles else ()))
        rank = roles["t1"].shape[0] if "t1" in roles else roles["w1_b"].shape[0]
        return method, roles, rank, alpha
    if not (("w1" in roles) ^ ("w1_a" in roles and "w1_b" in roles)) or not (
            ("w2" in roles) ^ ("w2_a" in roles and "w2_b" in roles)):
        raise ValueError(f"{source}: module {name!r} needs lokr_w1 or lokr_w1_a + lokr_w1_b, and lokr_w2 or "
                         f"lokr_w2_a + lokr_w2_b; it has {sorted('lokr_' + r for r in roles)}")
    if "w1_a" in roles:
        rank = roles["w1_a"].shape[1]
    elif "t2" in roles:
        rank = roles["t2"].shape[0]
    elif "w2_a" in roles:
        rank = roles["w2_a"].shape[1]
    else:  # both factors full: LyCORIS' scale is 1; any rank >= max(k, n) / 2 keeps both full here
        rank, alpha = max(roles["w2"].shape[:2]), float(max(roles["w2"].shape[:2]))
    return method, roles, rank, alpha


def _lokr_factors(roles: dict) -> set[int]:
    """The ``decompose_factor`` values under which deltatune's LoKr splits this module as the file does."""
    l, m = roles["w1"].shape if "w1" in roles else (roles["w1_a"].shape[0], roles["w1_b"].shape[1])
    if "w2" in roles:
        k, n = roles["w2"].shape[:2]
    elif "t2" in roles:
        k, n = roles["w2_a"].shape[1], roles["w2_b"].shape[1]
    else:  # w2_b is (r, n * prod(kernel)); the kernel is not in the file: try the usual ones
        k, flat_n = roles["w2_a"].shape[0], roles["w2_b"].shape[1]
        ok = set()
        for kernel in (1, 9, 25, 49, 4):
            if flat_n % kernel == 0:
                ok |= _split_factors(l, m, k, flat_n // kernel)
        return ok
    return _split_factors(l, m, k, n)


def _split_factors(l: int, m: int, k: int, n: int) -> set[int]:
    """The factors f for which ``factorization`` splits out = l·k as (l, k) and in = m·n as (m, n)."""
    return {f for f in (-1, max(l, m), max(k, n), min(max(l, m), max(k, n)), l, m)
            if factorization(l * k, f) == (l, k) and factorization(m * n, f) == (m, n)}


def config_for(method: str, modules: dict[str, tuple[dict, int, float]], source: str):
    """The method's config for ``{module path: (roles, rank, alpha)}``: the most common rank and alpha, the
    others as per-path patterns, the targets exactly these paths."""
    paths = list(modules)
    ranks = Counter(r for _, r, _ in modules.values())
    alphas = Counter(a for _, _, a in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    common = dict(r=r, alpha=alpha, targets=paths,
                  rank_pattern={p: k for p, (_, k, _) in modules.items() if k != r},
                  alpha_pattern={p: a for p, (_, _, a) in modules.items() if a != alpha})
    if method == "lora":
        from deltatune.methods.lora import LoraConfig

        dora = {p for p, (roles, _, _) in modules.items() if "magnitude" in roles}
        if dora and len(dora) != len(paths):
            raise ValueError(f"{source}: dora_scale on {len(dora)} of {len(paths)} modules; deltatune's DoRA is per "
                             f"adapter (all modules or none)")
        return LoraConfig(**common, use_dora=bool(dora))
    if method == "loha":
        from deltatune.methods.loha import LoHaConfig

        return LoHaConfig(**common, use_effective_conv2d=any("t1" in roles for roles, _, _ in modules.values()))
    from deltatune.methods.lokr import LoKrConfig

    factors = None
    for path, (roles, _, _) in modules.items():
        ok = _lokr_factors(roles)
        factors = ok if factors is None else factors & ok
    if not factors:
        raise ValueError(f"{source}: the LoKr modules are not split as deltatune's LoKr splits them with one "
                         f"decompose_factor (LyCORIS' unbalanced_factorization, or factors differing per module)")
    return LoKrConfig(**common, decompose_factor=-1 if -1 in factors else min(factors),
                      decompose_both=any("w1_a" in roles for roles, _, _ in modules.values()),
                      use_effective_conv2d=any("t2" in roles for roles, _, _ in modules.values()))


# -- a component of a file ----------------------------------------------------------------------------------
def component_parts(modules: dict[str, dict[str, torch.Tensor]], component: str, source: str):
    """Split ``group_modules``' output: ({kohya name: parts} of ``component``, {other component: count}, prefix)."""
    mine, others, unknown, prefixes = {}, Counter(), [], set()
    for name, parts in modules.items():
        hit = names.component_of(name)
        if hit is None:
            unknown.append(name)
        elif hit[0] == component:
            mine[name] = parts
            prefixes.add(hit[1])
        else:
            others[hit[0]] += 1
    if unknown:
        raise ValueError(f"{source}: modules of no Stable Diffusion component {unknown[:3]}"
                         f"{' ...' if len(unknown) > 3 else ''} ({len(unknown)}); kohya names start with "
                         f"{[p for ps in names.COMPONENTS.values() for p in ps]}")
    if not mine:
        raise ValueError(f"{source}: no modules of component {component!r} "
                         f"(the file has {dict(others) or 'none of any'})")
    if len(prefixes) > 1:
        raise ValueError(f"{source}: component {component!r} under two prefixes {sorted(prefixes)}")
    return mine, dict(others), prefixes.pop()


def _model_names(model: nn.Module, component: str) -> dict[str, str]:
    """{kohya module name without prefix: module path} for every module of ``model`` (and SGM's names for a UNet)."""
    table, skip = {}, []
    layout = names.layout_of(model) if component == "unet" and hasattr(model, "down_blocks") else None
    for path, module in model.named_modules():
        if not path or any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, DeltaLayer):
            skip.append(path + ".deltas")
        table[names.flat(path)] = path
        if component != "unet":
            table[names.flat(names.te_kohya_path(path))] = path
        if layout is not None:
            sgm = names.to_sgm(path, layout)
            if sgm is not None:
                table[names.flat(sgm)] = path
    return table


def _squeezed(shape) -> tuple[int, ...]:
    """A shape without its trailing 1s past the second dimension ((r, in, 1, 1) -> (r, in))."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _looks_sdxl(kohya_names: list[str], modules: dict) -> bool:
    return any(n.startswith(("lora_te1_", "lora_te2_")) for n in modules) or any(
        names.is_sgm(names.unflatten(n.removeprefix("lora_unet_"))) for n in kohya_names)


def parts_for_model(model: nn.Module, path: str | os.PathLike, component: str | None = None):
    """Read a kohya file's ``component`` for ``model``: (config, {module path: {role: tensor}}, metadata).

    Every module of the component must name a module of ``model`` with the shapes its method gives there
    (checked before anything is returned); modules of other components are counted and reported with a
    ``KohyaSkipped`` warning, as are modules without an alpha (taken as their rank, as kohya does).
    """
    source = str(path)
    component = component or names.component_for_model(model)
    if component not in names.COMPONENTS:
        raise ValueError(f"component {component!r}: expected one of {sorted(names.COMPONENTS)}")
    tensors, metadata = read_file(path)
    modules = group_modules(tensors, source)
    mine, others, prefix = component_parts(modules, component, source)
    table = _model_names(model, component)
    sdxl_hint = ""
    model_sdxl = getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"
    if component == "unet" and not model_sdxl and _looks_sdxl(list(mine), modules):
        sdxl_hint = (" The file is made for SDXL (SGM block names or lora_te1_/lora_te2_ keys) and this UNet is "
                     "not an SDXL UNet (it has no text_time added embedding).")
    unresolved = [n for n in mine if n[len(prefix):] not in table]
    if unresolved:
        raise ValueError(f"{source}: {len(unresolved)} of {len(mine)} {component} modules name no module of this "
                         f"{type(model).__name__}: {unresolved[:3]}{' ...' if len(unresolved) > 3 else ''}; "
                         f"nothing was loaded.{sdxl_hint}")
    by_method: dict[str, dict] = {}
    key_of, no_alpha = {}, []
    for name, parts in mine.items():
        method, roles, rank, alpha = module_roles(name, parts, source)
        module_path = table[name[len(prefix):]]
        if module_path in key_of:
            raise ValueError(f"{source}: modules {key_of[module_path]!r} and {name!r} both name {module_path!r}")
        key_of[module_path] = name
        if alpha is None:
            no_alpha.append(name)
            alpha = float(rank)
        by_method.setdefault(method, {})[module_path] = (roles, rank, alpha)
    if len(by_method) > 1:
        raise ValueError(f"{source}: component {component!r} mixes methods "
                         f"{ {m: len(v) for m, v in by_method.items()} }; load it as one adapter per method")
    method_name, found = by_method.popitem()
    cfg = config_for(method_name, found, source)
    method = method_for(cfg)
    for module_path, (roles, _, _) in found.items():
        module = model.get_submodule(module_path)
        base = module.base_module if isinstance(module, DeltaLayer) else module
        geometry = geometry_for(base)
        if geometry is None or not method.supports(geometry):
            raise ValueError(f"{source}: module {key_of[module_path]!r}: {method_name} cannot wrap "
                             f"{type(base).__name__} {module_path!r}")
        try:
            shapes = method.shapes(geometry, base, cfg, module_path)
        except ValueError as e:
            raise ValueError(f"{source}: module {key_of[module_path]!r}: {e}") from None
        for role, t in list(roles.items()):  # a 1x1 convolution's factors on a linear layer, or back (SD 2's proj_in)
            want = tuple(shapes.get(role, ()))
            if want and tuple(t.shape) != want and _squeezed(t.shape) == _squeezed(want):
                roles[role] = t.reshape(want)
        got = {r: tuple(t.shape) for r, t in roles.items()}
        if got != {r: tuple(s) for r, s in shapes.items()}:
            raise ValueError(f"{source}: module {key_of[module_path]!r} has tensors {got}, but {method_name} on "
                             f"{type(base).__name__} {module_path!r} "
                             f"(weight {tuple(base.weight.shape)}) needs {dict(shapes)}; nothing was loaded.{sdxl_hint}")
    selected = select_targets(model, cfg, method.supports)
    if set(selected) != set(found):  # a suffix also names another module: be exact
        import re

        cfg = cfg.replace(targets="|".join(re.escape(p) for p in found))
    skipped = []
    if others:
        skipped.append(f"{sum(others.values())} modules of other components ignored "
                       f"({', '.join(f'{c}: {n}' for c, n in sorted(others.items()))})")
    if no_alpha:
        skipped.append(f"{len(no_alpha)} modules without alpha take alpha = rank (scale 1, kohya's rule): "
                       f"{no_alpha[:3]}{' ...' if len(no_alpha) > 3 else ''}")
    if skipped:
        warnings.warn(f"{source} ({component}): " + "; ".join(skipped), KohyaSkipped, stacklevel=3)
    return cfg, {p: roles for p, (roles, _, _) in found.items()}, metadata


# -- writing -------------------------------------------------------------------------------------------------
def module_tensors(part: ModulePart, dtype: torch.dtype | None = None,
                   alpha_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one module's part (its roles in kohya's names, and alpha)."""
    table = {role: suffix for suffix, role in _SUFFIXES[part.method].items()}
    out = {}
    for role, t in part.tensors.items():
        if role not in table:
            raise ValueError(f"a {part.method} tensor {role!r} has no kohya name")
        t = t.detach()
        if role == "magnitude":  # PEFT's (out,) or (1, out, 1, 1) -> LyCORIS' (out, 1[, 1, 1])
            t = t.reshape(-1, *([1] * (part.tensors["B"].dim() - 1)))
        out[table[role]] = t if dtype is None else t.to(dtype)
    first = next(iter(out.values()))
    out[_ALPHA] = torch.tensor(float(part.settings["alpha"]), dtype=alpha_dtype or first.dtype)
    return out


def file_tensors(parts: dict[str, ModulePart], prefix: str, kohya_name, dtype: torch.dtype | None = None,
                 alpha_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of an adapter's parts under ``prefix``; ``kohya_name(path)`` gives a path's name."""
    tensors = {}
    for path, part in parts.items():
        if part.method not in _SUFFIXES:
            raise ValueError(f"module {path!r}: kohya files carry LoRA, LoHa and LoKr, not {part.method!r}")
        name = prefix + kohya_name(path)
        for suffix, t in module_tensors(part, dtype, alpha_dtype).items():
            tensors[f"{name}.{suffix}"] = t
    return tensors


def model_namer(model: nn.Module, component: str, naming: str | None = None):
    """``path -> kohya name`` (without prefix) for ``model``: SGM names for an SDXL UNet (what kohya writes for
    SDXL) unless ``naming="diffusers"``, the flattened path otherwise."""
    sdxl = getattr(getattr(model, "config", None), "addition_embed_type", None) == "text_time"
    if component == "unet" and (naming == "sgm" or (naming is None and sdxl)):
        layout = names.layout_of(model)

        def sgm(path):
            mapped = names.to_sgm(path, layout)
            if mapped is None:
                raise ValueError(f"module {path!r} has no SGM name")
            return names.flat(mapped)
        return sgm
    if component != "unet":
        return lambda path: names.flat(names.te_kohya_path(path))
    return names.flat


def prefix_for(component: str, sdxl: bool) -> str:
    """The kohya prefix of ``component`` (SDXL's text encoders are te1 / te2)."""
    if component == "text_encoder":
        return "lora_te1_" if sdxl else "lora_te_"
    return names.COMPONENTS[component][0]


def dumps_note(note: dict) -> str:
    """The ``DELTATUNE_KEY`` metadata value."""
    return json.dumps(note, sort_keys=True)



def save_for_model(model: nn.Module, path: str | os.PathLike, name: str, component: str | None = None,
                   metadata: dict[str, str] | None = None, naming: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` (a pipeline's ``component``) into the kohya file ``path``.

    An existing kohya file keeps its other components' modules and its metadata (``metadata`` is added
    over it), so a UNet and its text encoders can go into one file one after the other; this component's
    modules are replaced. SDXL's UNet is written under SGM's block names (``naming="diffusers"`` keeps
    diffusers' paths). Returns the path.
    """
    from deltatune.adapters import adapter_record, describe_adapter

    configs = adapter_record(model).configs
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} on this model (have {sorted(configs)})")
    cfg = configs[name]
    component = component or names.component_for_model(model)
    parts = describe_adapter(model, name)
    if getattr(cfg, "use_rslora", False):  # kohya's scale is alpha / r: write the alpha that gives rsLoRA's scale
        parts = {p: ModulePart(part.method, part.geometry, part.tensors,
                               {**part.settings, "alpha": part.settings["alpha"] * math.sqrt(part.settings["rank"])})
                 for p, part in parts.items()}
    existing, kept_meta = {}, {}
    if Path(path).is_file():
        existing, kept_meta = read_file(path)
    others = {k: v for k, v in existing.items()
              if (names.component_of(k.partition(".")[0]) or ("",))[0] != component}
    sdxl = component == "text_encoder_2" or any(k.startswith(("lora_te1_", "lora_te2_")) for k in others) or any(
        names.is_sgm(names.unflatten(k.partition(".")[0].removeprefix("lora_unet_")))
        for k in others if k.startswith("lora_unet_"))
    if component == "text_encoder_2":  # SD 1.x's lora_te_ becomes SDXL's lora_te1_
        others = {("lora_te1_" + k.removeprefix("lora_te_")) if k.startswith("lora_te_") else k: v
                  for k, v in others.items()}
    tensors = file_tensors(parts, prefix_for(component, sdxl), model_namer(model, component, naming))
    return write_file(path, {**others, **tensors}, {**kept_meta, **(metadata or {})})
