"""Bottleneck adapters against AdapterHub's ``adapters`` library: the same weights, the same outputs.

``adapters`` 1.3 pins transformers 4.x, so it never enters this environment: the test makes its own
virtual environment (a clean one, not seeing our transformers 5) under ~/.cache/deltatune-test-venvs
(reused when present; about two minutes to make here, mostly torch's CPU wheel), runs a script there
that builds a tiny random BERT with Houlsby (double_seq_bn), Pfeiffer (seq_bn) and parallel (par_bn)
adapters, saves the base weights and each adapter with safetensors plus the outputs on fixed inputs;
then here the base weights go into our transformers-5 ``BertModel``, each adapter directory loads with
``dt.load_adapter`` (``formats/adapterhub.py``) and the outputs must agree to 1e-5. The other way round,
adapters we write with ``dt.save_adapter(..., format="adapterhub")`` load with the library's
``load_adapter`` there (a second script) with outputs equal to ours, also to 1e-5.

Skipped with the reason where the environment cannot be made (no network). DELTATUNE_TEST_VENVS moves
the cache; DELTATUNE_ADAPTERHUB_VENV=0 skips instead of making it.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers

import deltatune as dt

pytestmark = pytest.mark.slow

TORCH = "torch==2.13.0"
ADAPTERS = "adapters==1.3.0"
BERT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# name: (AdapterHub config expression, our placement)
ADAPTERS_MADE = {
    "houlsby": ('"double_seq_bn"', "houlsby"),
    "pfeiffer": ('"seq_bn"', "pfeiffer"),
    "parallel": ('"par_bn"', "parallel"),
    "pfeiffer_gelu": ('adapters.SeqBnConfig(non_linearity="gelu", reduction_factor=8, scaling=2.0)', "pfeiffer"),
    "houlsby_relu": ('adapters.DoubleSeqBnConfig(non_linearity="relu", reduction_factor=4, scaling=0.5)', "houlsby"),
}

SCRIPT = """
import json, sys, torch, transformers, adapters
from safetensors.torch import save_file
out = sys.argv[1]
torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig(**{bert})).eval()
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, out + "/base.safetensors")
adapters.init(model)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, {vocab}, (3, 11), generator=g)
mask = torch.ones_like(ids); mask[1, 7:] = 0; mask[2, 4:] = 0
tensors = {{"input_ids": ids, "attention_mask": mask}}
with torch.no_grad():
    tensors["base"] = model(input_ids=ids, attention_mask=mask).last_hidden_state
for name, config in {made}.items():
    model.add_adapter(name, config=eval(config))
    with torch.no_grad():  # weights well away from the init, so the adapter changes the output
        for key, p in model.named_parameters():
            if ".adapters." + name + "." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.set_active_adapters(name)
    with torch.no_grad():
        tensors[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.save_adapter(out + "/" + name, name, use_safetensors=True)
    model.set_active_adapters(None)
save_file({{k: v.contiguous() for k, v in tensors.items()}}, out + "/outputs.safetensors")
print(adapters.__version__, transformers.__version__)
"""


# name: our config (written with format="adapterhub", loaded by the library)
WRITTEN = {
    "houlsby": dict(placement="houlsby", activation="swish", reduction_factor=4, scaling=0.5),
    "pfeiffer": dict(placement="pfeiffer", activation="gelu", reduction_factor=8, scaling=2.0, init="houlsby"),
    "parallel": dict(placement="parallel", activation="relu", reduction_factor=2.5, scaling=4.0),
}

LOAD_SCRIPT = """
import sys, torch, transformers, adapters
from safetensors.torch import load_file, save_file
out, names = sys.argv[1], sys.argv[2:]
model = transformers.BertModel(transformers.BertConfig(**{bert})).eval()
model.load_state_dict(load_file(out + "/base.safetensors"), strict=True)
adapters.init(model)
ref = load_file(out + "/ours.safetensors")
outputs = {{}}
for name in names:
    info = {{}}
    loaded = model.load_adapter(out + "/" + name, use_safetensors=True, loading_info=info)
    assert loaded == name and not info["missing_keys"] and not info["unexpected_keys"], info
    model.set_active_adapters(name)
    with torch.no_grad():
        outputs[name] = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    model.set_active_adapters(None)
    model.delete_adapter(name)
save_file(outputs, out + "/theirs.safetensors")
"""


def _venv_dir() -> Path:
    root = Path(os.environ.get("DELTATUNE_TEST_VENVS", Path.home() / ".cache" / "deltatune-test-venvs"))
    return root / ADAPTERS.replace("==", "-")


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _adapterhub_python() -> Path:
    """The venv's python, made (a clean venv: torch CPU, then ``adapters`` with its transformers 4) if absent."""
    venv = _venv_dir()
    done = venv / ".deltatune-complete"  # written last: a half-made venv is made again
    if done.is_file():
        return _python(venv)
    if os.environ.get("DELTATUNE_ADAPTERHUB_VENV") == "0":
        pytest.skip(f"no AdapterHub venv at {venv} and DELTATUNE_ADAPTERHUB_VENV=0")
    start = time.time()
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(_python(venv)), "-m", "pip", "install", "-q", TORCH, "--index-url",
              "https://download.pytorch.org/whl/cpu"],
             [str(_python(venv)), "-m", "pip", "install", "-q", ADAPTERS]]
    for step in steps:
        run = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        if run.returncode != 0:
            pytest.skip(f"cannot make the AdapterHub venv at {venv} ({' '.join(step[-3:])} failed: "
                        f"{(run.stderr or run.stdout).strip().splitlines()[-1:]})")
    done.write_text(f"made in {time.time() - start:.0f} s\n")
    return _python(venv)


@pytest.fixture(scope="module")
def adapterhub_files(tmp_path_factory) -> Path:
    python = _adapterhub_python()
    out = tmp_path_factory.mktemp("adapterhub")
    made = "{" + ", ".join(f"{k!r}: {v[0]!r}" for k, v in ADAPTERS_MADE.items()) + "}"
    script = out / "make.py"
    script.write_text(textwrap.dedent(SCRIPT).format(bert=BERT, vocab=BERT["vocab_size"], made=made))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # nothing of ours on its path
    run = subprocess.run([str(python), str(script), str(out)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == ADAPTERS.split("==")[1] and run.stdout.split()[1].startswith("4.")
    return out


def _our_bert(files: Path) -> transformers.BertModel:
    from safetensors.torch import load_file

    model = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    model.load_state_dict(load_file(str(files / "base.safetensors")), strict=True)
    return model


def _out(model, ref) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state


@pytest.mark.parametrize("name", list(ADAPTERS_MADE))
def test_adapterhub_adapter_loads_with_equal_outputs(adapterhub_files, name):
    from safetensors.torch import load_file

    ref = load_file(str(adapterhub_files / "outputs.safetensors"))
    model = _our_bert(adapterhub_files)
    # the same base model in transformers 4 and 5
    assert (_out(model, ref) - ref["base"]).abs().max().item() <= 1e-5
    assert (ref[name] - ref["base"]).abs().max().item() > 1e-2  # the adapter changes the output

    dt.load_adapter(model, adapterhub_files / name, name=name)
    cfg = dt.list_adapters(model)[name]
    assert cfg.placement == ADAPTERS_MADE[name][1]
    diff = (_out(model, ref) - ref[name]).abs().max().item()
    assert diff <= 1e-5, diff
    with dt.disabled(model):
        assert (_out(model, ref) - ref["base"]).abs().max().item() <= 1e-5


def test_adapterhub_adapter_roundtrips_through_our_format(adapterhub_files, tmp_path):
    from safetensors.torch import load_file

    ref = load_file(str(adapterhub_files / "outputs.safetensors"))
    model = _our_bert(adapterhub_files)
    dt.load_adapter(model, adapterhub_files / "pfeiffer")
    dt.save_adapter(model, tmp_path / "ours")
    fresh = _our_bert(adapterhub_files)
    dt.load_adapter(fresh, tmp_path / "ours")
    assert (_out(fresh, ref) - ref["pfeiffer"]).abs().max().item() <= 1e-5


def test_our_adapterhub_files_load_in_the_adapters_library_with_equal_outputs(adapterhub_files, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = load_file(str(adapterhub_files / "outputs.safetensors"))
    (tmp_path / "base.safetensors").symlink_to(adapterhub_files / "base.safetensors")
    ours = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    g = torch.Generator().manual_seed(3)
    for name, cfg in WRITTEN.items():
        model = _our_bert(adapterhub_files)
        dt.add_adapter(model, dt.BottleneckConfig(**cfg), name=name)
        model.eval()
        with torch.no_grad():  # weights well away from the init, so the adapter changes the output
            for p in dt.adapter_params(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ours[name] = _out(model, ref)
        assert (ours[name] - ref["base"]).abs().max().item() > 1e-2
        dt.save_adapter(model, tmp_path / name, name=name, format="adapterhub")
    save_file(ours, str(tmp_path / "ours.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(LOAD_SCRIPT).format(bert=BERT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    run = subprocess.run([str(_adapterhub_python()), str(script), str(tmp_path), *WRITTEN], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(str(tmp_path / "theirs.safetensors"))
    for name in WRITTEN:
        diff = (theirs[name] - ours[name]).abs().max().item()
        assert diff <= 1e-5, (name, diff)
