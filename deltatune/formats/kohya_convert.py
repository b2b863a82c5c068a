"""Whole-file conversion between a kohya / LyCORIS file and PEFT adapter directories, without a model.

kohya -> PEFT writes one PEFT directory per pipeline component found (``OUT/unet``, ``OUT/text_encoder``,
``OUT/text_encoder_2``: ``adapter_config.json`` + ``adapter_model.safetensors``, the tensors in the file's
own dtype), which ``PeftModel.from_pretrained(unet, OUT/unet)`` and ``deltatune.load_adapter`` read.
Module paths come from the kohya names alone (``formats/kohya_names.py``; SGM names as SDXL's UNet).
The safetensors metadata of each directory keeps the kohya file's metadata (``ss_*`` ...) and, under
``deltatune_kohya``, what the PEFT files cannot say but the kohya file said (prefix, naming, alpha dtype,
modules without alpha, alphas that had no effect): PEFT -> kohya uses it to write the same tensors back.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from deltatune.adapters.description import ModulePart
from deltatune.adapters.targeting import pattern_value
from deltatune.formats import kohya, peft
from deltatune.formats import kohya_names as names
from deltatune.formats.atomic import atomic_write

__all__ = ["kohya_to_peft", "peft_to_kohya", "convert"]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _clip_wrapped(component: str) -> bool:
    """Whether the installed transformers' CLIP text model of ``component`` keeps its modules under
    ``text_model.`` (transformers 5's ``CLIPTextModel`` does not; the one with projection does)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError:
        return True
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                                   num_attention_heads=1, max_position_embeddings=4, projection_dim=4))
    return hasattr(model, "text_model")


def _path_of(rest: str, sgm: bool, component: str = "unet", wrapped: bool = True) -> str:
    path = names.unflatten(rest)
    if component != "unet":
        return names.te_model_path(path, wrapped)
    if sgm:
        mapped = names.from_sgm(path, names.SDXL_LAYOUT)
        if mapped is None:
            raise ValueError(f"SGM module {path!r} is not a module of SDXL's UNet")
        return mapped
    return path


def kohya_to_peft(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Convert kohya file ``src`` into PEFT directories ``dst/<component>``; returns them."""
    from safetensors.torch import save_file

    source = str(src)
    tensors, metadata = kohya.read_file(src)
    modules = kohya.group_modules(tensors, source)
    present = [c for c in names.COMPONENTS if any((names.component_of(n) or ("",))[0] == c for n in modules)]
    if not present:
        kohya.component_parts(modules, "unet", source)  # raises, naming what the file has
    written = []
    for component in present:
        mine, _, prefix = kohya.component_parts(modules, component, source)
        sgm = component == "unet" and any(names.is_sgm(names.unflatten(n[len(prefix):])) for n in mine)
        found, parts, note = {}, {}, {"component": component, "prefix": prefix, "naming": "sgm" if sgm else "diffusers",
                                      "no_alpha": [], "alphas": {}}
        wrapped = component == "unet" or _clip_wrapped(component)
        alpha_dtypes = {str(p[kohya._ALPHA].dtype) for p in mine.values() if kohya._ALPHA in p}
        if len(alpha_dtypes) == 1:
            note["alpha_dtype"] = alpha_dtypes.pop()
        for name, raw in mine.items():
            try:
                path = _path_of(name[len(prefix):], sgm, component, wrapped)
            except ValueError as e:
                raise ValueError(f"{source}: module {name!r}: {e}") from None
            method, roles, rank, alpha = kohya.module_roles(name, raw, source)
            dtype = next(t.dtype for s, t in raw.items() if s != kohya._ALPHA)
            roles = {r: t.to(dtype) for r, t in roles.items()}  # a folded Tucker A back in the file's dtype
            if alpha is None:
                note["no_alpha"].append(path)
                alpha = float(rank)
            elif kohya._ALPHA in raw and float(raw[kohya._ALPHA].float().item()) != alpha:
                note["alphas"][path] = float(raw[kohya._ALPHA].float().item())  # no effect (LoKr, both full)
            found[path] = (roles, rank, alpha)
            geometry = "conv" if method == "lora" and roles["A"].dim() > 2 else "linear"
            parts[path] = ModulePart(method, geometry, roles, {"rank": rank, "alpha": alpha})
        methods = {p.method for p in parts.values()}
        if len(methods) > 1:
            raise ValueError(f"{source}: component {component!r} mixes methods {sorted(methods)}; a PEFT adapter "
                             f"holds one")
        cfg = kohya.config_for(methods.pop(), found, source)
        if note["no_alpha"]:
            warnings.warn(f"{source} ({component}): {len(note['no_alpha'])} modules without alpha take alpha = rank "
                          f"(kohya's rule)", kohya.KohyaSkipped, stacklevel=2)
        config = peft.to_peft_config(cfg, parts, sorted(parts))
        state = {peft.file_key(p, part.method, part.geometry, role): t.contiguous()
                 for p, part in parts.items() for role, t in part.tensors.items()}
        meta = {**metadata, kohya.DELTATUNE_KEY: kohya.dumps_note(note)}
        if "format" not in metadata:
            meta["format"] = "pt"
            note["added_format"] = True
            meta[kohya.DELTATUNE_KEY] = kohya.dumps_note(note)
        out = Path(dst) / component
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(state, tmp, metadata=meta))
        text = json.dumps(config, indent=2, sort_keys=True)
        atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(text))
        written.append(out)
    return written


def _peft_dirs(src: Path, component: str | None) -> dict[str, Path]:
    if (src / "adapter_config.json").is_file():
        return {component or "": src}
    dirs = {c: src / c for c in names.COMPONENTS if (src / c / "adapter_config.json").is_file()}
    if not dirs:
        raise ValueError(f"{src}: neither a PEFT adapter directory nor one holding "
                         f"{'/, '.join(names.COMPONENTS)}/ adapter directories")
    return dirs


def peft_to_kohya(src: str | os.PathLike, dst: str | os.PathLike, component: str | None = None) -> Path:
    """Convert PEFT directories (``src/<component>``, or ``src`` itself as ``component``) into kohya file ``dst``."""
    from safetensors import safe_open

    from deltatune.formats.files import read_adapter_files

    dirs = _peft_dirs(Path(src), component)
    loaded = {}
    for comp, folder in dirs.items():
        cfg, tensors, weights = read_adapter_files(folder)
        with safe_open(str(weights), "pt") as f:
            meta = dict(f.metadata() or {})
        note = json.loads(meta.get(kohya.DELTATUNE_KEY, "{}"))
        comp = comp or note.get("component") or "unet"
        if comp not in names.COMPONENTS:
            raise ValueError(f"{folder}: component {comp!r}: expected one of {sorted(names.COMPONENTS)}")
        loaded[comp] = (cfg, tensors, meta, note, weights)
    sdxl = "text_encoder_2" in loaded or any(n.get("naming") == "sgm" or n.get("prefix") in ("lora_te1_", "lora_te2_")
                                              for _, _, _, n, _ in loaded.values())
    out_tensors, out_meta = {}, {}
    for comp, (cfg, tensors, meta, note, weights) in loaded.items():
        method = type(cfg).method
        if method not in ("lora", "loha", "lokr"):
            raise ValueError(f"{weights}: a {method} adapter has no kohya form (LoRA, LoHa, LoKr)")
        by_path: dict[str, dict] = {}
        for key, t in tensors.items():
            split = peft.split_key(key)
            if split is None or split[1] is None:
                raise ValueError(f"{weights}: key {key!r} is no {method} tensor (full copies have no kohya form)")
            by_path.setdefault(split[0], {})[split[1]] = t
        parts = {}
        for path, roles in by_path.items():
            rank = int(pattern_value(path, cfg.rank_pattern, cfg.r))
            alpha = float(pattern_value(path, cfg.alpha_pattern, cfg.alpha))
            if getattr(cfg, "use_rslora", False):
                alpha = alpha * rank ** 0.5  # kohya's scale is alpha / r
            geometry = "conv" if method == "lora" and roles["A"].dim() > 2 else "linear"
            parts[path] = ModulePart(method, geometry, roles, {"rank": rank, "alpha": note.get("alphas", {}).get(path, alpha)})
        prefix = note.get("prefix") or kohya.prefix_for(comp, sdxl)
        sgm = comp == "unet" and (note.get("naming") == "sgm" if note else sdxl)

        def kohya_name(path, sgm=sgm, comp=comp):
            if comp != "unet":
                return names.flat(names.te_kohya_path(path))
            if not sgm:
                return names.flat(path)
            mapped = names.to_sgm(path, names.SDXL_LAYOUT)
            if mapped is None:
                raise ValueError(f"{weights}: module {path!r} has no SGM name in SDXL's UNet")
            return names.flat(mapped)

        alpha_dtype = _DTYPES.get(note.get("alpha_dtype", ""))
        part_tensors = kohya.file_tensors(parts, prefix, kohya_name, alpha_dtype=alpha_dtype)
        for path in note.get("no_alpha", []):
            part_tensors.pop(f"{prefix}{kohya_name(path)}.{kohya._ALPHA}", None)
        out_tensors.update(part_tensors)
        kept = {k: v for k, v in meta.items() if k != kohya.DELTATUNE_KEY and not (k == "format" and note.get("added_format"))}
        if not note:
            kept.pop("format", None)
        out_meta.update(kept)
    return kohya.write_file(dst, out_tensors, out_meta)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, component: str | None = None):
    """``deltatune convert``: ``to="peft"`` (a kohya file into PEFT directories) or ``to="kohya"`` (the reverse)."""
    if to == "peft":
        if Path(src).is_dir():
            raise ValueError(f"{src}: a directory; --to peft converts a kohya .safetensors file")
        return kohya_to_peft(src, dst)
    if to == "kohya":
        if not Path(src).is_dir():
            raise ValueError(f"{src}: not a directory; --to kohya converts PEFT adapter directories")
        return peft_to_kohya(src, dst, component)
    raise ValueError(f"--to {to!r}: expected 'peft' or 'kohya'")

