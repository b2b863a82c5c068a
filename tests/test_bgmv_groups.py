"""One shrink launch for the pooled layers that read one input (``DELTATUNE_BGMV_GROUPS=1``; issue 18, off by
default until measured): in a two-phase decode step, q with v (k's padded rank differs here, so it shrinks alone)
and gate with up shrink in one ``bgmv_shrink_group`` launch each, and the step's logits are the same bits as
with a launch a layer. On CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (tests/test_sgmv.py
says why); on a GPU the same check runs compiled."""

import json
import os
import tempfile

import pytest
import torch
from _mixed_lora import pool_of_three
from _util import run_interpreted

import _models  # noqa: E402

ROWS = ["a", None, "b", "c", "a", "b"]


def check_groups(device, dtype):
    """{launches of each kernel with groups off and on, and whether the logits are equal bit for bit}."""
    from deltatune.kernels import sgmv

    with tempfile.TemporaryDirectory() as root:
        base, pool = pool_of_three(device, dtype, root)
        ids = torch.randint(0, _models.VOCAB, (len(ROWS), 1), generator=torch.Generator().manual_seed(0)).to(device)
        out, counts = {}, {}
        for on in ("0", "1"):
            os.environ["DELTATUNE_BGMV_GROUPS"] = on
            seen = {}
            kernels = {name: getattr(sgmv, name) for name in ("bgmv_shrink", "bgmv_shrink_group", "bgmv_expand")}

            class Counting:
                def __init__(self, name):
                    self.name = name

                def __getitem__(self, grid):
                    seen[self.name] = seen.get(self.name, 0) + 1
                    return kernels[self.name][grid]

            for name in kernels:
                setattr(sgmv, name, Counting(name))
            try:
                with torch.no_grad(), pool.routed(base, ROWS, gathered=True, phases=2):
                    out[on] = base(input_ids=ids).logits
            finally:
                for name, kernel in kernels.items():
                    setattr(sgmv, name, kernel)
                del os.environ["DELTATUNE_BGMV_GROUPS"]
            counts[on] = seen
    return {"counts": counts, "equal": bool(torch.equal(out["0"], out["1"])),
            "changed": float((out["1"] - base(input_ids=ids).logits).abs().max())}


def _assert(result):
    layers = len(_models.llama().model.layers)
    off, on = result["counts"]["0"], result["counts"]["1"]
    assert off == {"bgmv_shrink": 7 * layers, "bgmv_expand": 7 * layers}
    # per layer: q+v and gate+up grouped (2 launches), k, o and down alone (3)
    assert on == {"bgmv_shrink_group": 2 * layers, "bgmv_shrink": 3 * layers, "bgmv_expand": 7 * layers}
    assert result["equal"] and result["changed"] > 1e-3


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__file__)


def test_grouped_shrinks_interpreted_cpu(interpreted):
    for dtype in ("float32", "bfloat16"):
        _assert(interpreted[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU runs this interpreted)")
def test_grouped_shrinks_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process; the GPU check needs compiled kernels")
    for dtype in (torch.float32, torch.bfloat16):
        _assert(check_groups("cuda", dtype))


def test_bad_switch_value_is_refused(monkeypatch):
    from deltatune.serve.pool_call import shrink_groups_on

    monkeypatch.setenv("DELTATUNE_BGMV_GROUPS", "yes")
    with pytest.raises(ValueError, match="DELTATUNE_BGMV_GROUPS must be 0"):
        shrink_groups_on()
    monkeypatch.delenv("DELTATUNE_BGMV_GROUPS")
    assert not shrink_groups_on()


if __name__ == "__main__":  # the subprocess: TRITON_INTERPRET=1 is set before triton is imported
    print(json.dumps({str(d)[6:]: check_groups("cpu", d) for d in (torch.float32, torch.bfloat16)}))
