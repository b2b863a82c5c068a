"""bench/bench_serve_layers.py on the CPU at the tiny shape: its rows and checks come out, adapters written by
deltatune (no PEFT rows) serve like PEFT's, and with ``--dora`` the pool's DoRA rows equal PEFT's DoRA one
adapter at a time."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_serve_layers.py"
SMALL = ["--shape", "tiny", "--iters", "1", "--warmup", "0", "--prefill-rows", "4", "--prefill-len", "8",
         "--decode-rows", "8"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve_layers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench, tmp_path, *flags):
    out = tmp_path / "out.json"
    bench.main([*SMALL, "--json", str(out), *flags])
    return json.loads(out.read_text())


def test_rows_without_peft_from_deltatunes_files(bench, tmp_path, capsys):
    result = _run(bench, tmp_path, "--skip", "peft,reload")
    rows = {(r["case"], name) for r in result["rows"] for name in r["ms"]}
    assert {("prefill", "base"), ("prefill", "deltatune pool"), ("decode", "pool, base rows only")} <= rows
    assert not any("PEFT" in name for _, name in rows)
    assert 1e-3 < result["checks"]["prefill"]["pool_vs_base"] < 0.5  # the adapters change the outputs, a little
    floor = result["checks"]["decode_floor"]  # 8 adapters of ranks 8-64 over the 14 tiny projections
    ranks, (hidden, inter, layers, q, kv) = [8, 16, 32, 64], bench.SHAPES["tiny"]
    per_rank = layers * ((hidden + q) + 2 * (hidden + kv) + (q + hidden) + 3 * (hidden + inter)) * 4  # fp32
    assert floor["adapter_gb"] * 1e9 == pytest.approx(sum(ranks) * 2 * per_rank)
    assert floor["base_row"] == "base" and floor["floor_x"] == pytest.approx(1 + floor["adapter_gb"] / floor["base_gb"])
    err = capsys.readouterr().err
    assert "adapters made and saved (deltatune)" in err and "prefill: deltatune pool:" in err  # progress lines


def test_dora_rows_equal_peft_one_adapter_at_a_time(bench, tmp_path):
    pytest.importorskip("peft")
    checks = _run(bench, tmp_path, "--skip", "reload", "--dora")["checks"]
    for case in ("prefill", "decode"):
        assert checks[case]["pool_vs_peft_a0"] < 1e-5
        assert checks[case]["pool_vs_base"] > 1e-3
