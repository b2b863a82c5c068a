"""Per-call routing: each batch row uses its own adapter (or none) in one forward call."""

import pytest
import torch
import torch.nn as nn

import deltatune as dt


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=4, targets=["0", "2"], init="random"), name="a")
    dt.add_adapter(model, dt.LoraConfig(r=3, alpha=3, targets=["2"], init="random"), name="b")
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=2, targets=["0"], init="pissa"), name="p")
    return model


def test_mixed_batch_equals_each_row_alone():
    model = _model()
    x = torch.randn(5, 3, 8)
    rows = ["a", "b", None, "p", "a"]
    with torch.no_grad():
        expected = []
        for i, name in enumerate(rows):
            if name is None:
                with dt.disabled(model):
                    expected.append(model(x[i:i + 1]))
            else:
                dt.set_active(model, name)
                expected.append(model(x[i:i + 1]))
        dt.set_active(model, "b")  # what set_active says must not matter inside routed()
        with dt.routed(model, rows):
            mixed = model(x)
        after = model(x)  # the routing ends with the context
    torch.testing.assert_close(mixed, torch.cat(expected), atol=1e-6, rtol=1e-5)
    dt.set_active(model, "b")
    torch.testing.assert_close(after, model(x))


def test_routing_is_differentiable_per_row():
    model = _model()
    x = torch.randn(2, 8)
    with dt.routed(model, ["a", "b"]):
        model(x).sum().backward()
    layer = model[0]
    assert layer.deltas["a"].A.grad is not None and layer.deltas["p"].A.grad is None
    assert model[2].deltas["b"].B.grad is not None


def test_routing_rejects_unknown_names_merged_adapters_and_wrong_rows():
    model = _model()
    with pytest.raises(KeyError, match="nope"):
        with dt.routed(model, ["a", "nope"]):
            pass
    with pytest.raises(ValueError, match="routing gives 3 rows, the input has 2"):
        with dt.routed(model, ["a", "b", None]):
            model(torch.randn(2, 8))
    dt.merge(model, "a")
    with pytest.raises(ValueError, match="unmerged"):
        with dt.routed(model, ["a", "b"]):
            model(torch.randn(2, 8))
