"""Bad adapter files give clear errors naming the file and the key or module; pickles never load."""

import json
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune import AdapterFileError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0", "2"], init="random"))
    dt.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _unchanged(model):
    return not any(isinstance(m, dt.DeltaLayer) for m in model.modules()) and not dt.list_adapters(model)


def test_round_trip(saved):
    model = _model()
    dt.load_adapter(model, saved)
    assert dt.list_adapters(model).keys() == {"default"}
    assert not any(p.requires_grad for p in dt.adapter_params(model))  # loaded for inference by default


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(AdapterFileError, match="no such adapter directory"):
        dt.load_adapter(_model(), tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: missing"):
        dt.load_adapter(_model(), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: missing"):
        dt.load_adapter(_model(), saved)


@pytest.mark.parametrize("cut", [4, 40, -7])
def test_truncated_or_corrupt_safetensors(saved, cut):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    model = _model()
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_garbage_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\xff" * 200)
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        dt.load_adapter(_model(), saved)


def test_invalid_json_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: not valid JSON"):
        dt.load_adapter(_model(), saved)


def test_shape_disagreeing_with_config(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 3
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    model = _model()
    with pytest.raises(AdapterFileError, match=r"key 'base_model\.model\.0\.lora_A\.weight' has shape \(2, 6\).*needs \(3, 6\)"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_shape_disagreeing_with_model(saved):
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(AdapterFileError, match=r"module '0' \(Linear\) with rank 2"):
        dt.load_adapter(model, saved)
    assert _unchanged(model)


def test_config_naming_modules_the_model_lacks(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: no module of Sequential matches targets=\['q_proj'\]"):
        dt.load_adapter(_model(), saved)


def test_key_naming_a_module_the_model_lacks(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.7.lora_A.weight"] = torch.zeros(2, 6)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match=r"key 'base_model\.model\.7\.lora_A\.weight': module '7' is not a module"):
        dt.load_adapter(_model(), saved)


def test_missing_key(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.2.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match=r"no tensor for \['base_model\.model\.2\.lora_B\.weight'\]"):
        dt.load_adapter(_model(), saved)


def test_unknown_config_keys_warn(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["some_future_option"] = 1
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_option"):
        dt.load_adapter(_model(), saved)


@pytest.mark.parametrize("key, value, message", [
    ("lora_bias", True, "lora_bias=True is not supported"),
    ("bias", "all", "bias='all' is not supported"),
])
def test_unsupported_settings_raise(saved, key, value, message):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg[key] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=message):
        dt.load_adapter(_model(), saved)


def test_dora_file_without_magnitudes_names_the_missing_keys(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=r"no tensor for .*lora_magnitude_vector"):
        dt.load_adapter(_model(), saved)


class _Planted:
    """Unpickling this would create a file: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_file_is_never_unpickled(saved, tmp_path):
    marker = tmp_path / "PWNED"
    (saved / "adapter_model.safetensors").unlink()
    (saved / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Planted(str(marker))}))
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin: pickle files are never loaded"):
        dt.load_adapter(_model(), saved)
    assert not marker.exists()
    # the planted payload is live: the call pickle would make on loading creates the file
    payload = pickle.dumps(_Planted(str(marker)))
    assert b"open" in payload
    call, args = _Planted(str(marker)).__reduce__()
    call(*args).close()
    assert marker.exists()


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = _model()
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=["0"]))
    dt.save_adapter(model, tmp_path / "a")
    dt.save_adapter(model, tmp_path / "a")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
