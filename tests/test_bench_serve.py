"""bench/bench_serve.py: its memory plan against the pool's and the model's own arithmetic, the fit check's
refusals, a CPU smoke run of many registered adapters at saturation, and the host copies it relies on."""

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_serve")


@pytest.mark.parametrize("shape", ["1b", "8b"])
def test_plan_bytes_equal_the_models_and_the_pools(bench, shape):
    """Weights, slot bytes (padded to the largest rank) as the pool plans them, on the real shapes (meta device)."""
    from deltatune.serve import AdapterPool

    plan_mod = load("serve_plan")
    geometry = plan_mod.Geometry(*bench.SHAPES[shape])
    model = bench.build_model(shape, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == geometry.weight_elements()
    plan = plan_mod.Plan(geometry, 2, adapters=10, files=4, ranks=(8, 16, 32), resident=3, max_num_seqs=8,
                         max_num_batched_tokens=256, seq_len=100)
    pool = AdapterPool(model, max_resident=3, max_rank=32, dtype=torch.bfloat16)
    assert plan.slots_bytes() == pool.planned_bytes()
    assert plan.slot_bytes() == pool.slot_bytes(pool.planned_shapes())
    # 10 names over 4 files of ranks 8, 16, 32, 8: names 0-9 use files 0,1,2,3,0,1,2,3,0,1
    per_rank = geometry.rank_elements() * 2
    assert plan.host_bytes() == per_rank * (8 * 3 + 16 * 3 + 32 * 2 + 8 * 2)
    assert plan.file_bytes() == per_rank * (8 + 16 + 32 + 8)


def test_fit_refuses_what_the_machine_lacks_and_says_what_and_by_how_much():
    sp = load("serve_plan")
    plan = sp.Plan(sp.Geometry(2048, 8192, 16, 32, 8, 128256), 2, adapters=1000, files=100, ranks=(8, 16, 32, 64),
                   resident=128, max_num_seqs=128, max_num_batched_tokens=2048, seq_len=640)
    left = sp.check_fit(plan, host_available=125 * sp.GiB, disk_free=60 * sp.GiB, disk_to_write=plan.file_bytes(),
                        device_budget=70 * sp.GiB)
    assert left["kv_sequences"] >= 128 and left["host_spare"] > 0 and left["disk_spare"] > 0
    with pytest.raises(sp.PlanError) as e:
        sp.check_fit(plan, host_available=32 * sp.GiB, disk_free=2 * sp.GiB, disk_to_write=plan.file_bytes(),
                     device_budget=12 * sp.GiB)
    text = str(e.value)
    assert "host memory: 1000 registered adapters take 39.37 GiB" in text and "32.00 GiB is available" in text
    assert "disk: the adapter files still to write take 3.94 GiB, 2.00 GiB is free" in text
    assert "device memory" in text and "128 adapter slots 10.75 GiB" in text
    with pytest.raises(sp.PlanError, match="--adapter-files between 1 and --adapters"):
        sp.Plan(plan.geometry, 2, 10, 20, (8,), 4, 8, 256, 100)


def test_pinned_host_memory_is_the_pools_arena_blocks(bench):
    """Pinned, the adapters are packed in registration order into the pool's 1 GiB host blocks: the plan's
    bytes are the blocks a ``HostArena`` makes for the same adapters (1b: 1,000 adapters of ranks 8-64)."""
    from deltatune.serve.pool_host import BLOCK_BYTES, HostArena

    sp = load("serve_plan")
    assert sp.ARENA_BLOCK == BLOCK_BYTES
    one_b = sp.Plan(sp.Geometry(*bench.SHAPES["1b"]), 2, 1000, 100, (8, 16, 32, 64), 128, 8, 256, 100, pinned=True)
    arena = HostArena(torch.bfloat16, pin=False)  # unpinned on a CPU: the same packing, blocks left untouched
    for a in range(one_b.adapters):
        arena.allocate(one_b.adapter_bytes(one_b.file_rank(one_b.adapter_file(a))) // 2)
    assert one_b.host_memory_bytes() == arena.blocks_made * 2**30
    assert one_b.host_bytes() < one_b.host_memory_bytes() < 1.1 * one_b.host_bytes()  # 42 blocks for 39.4 GiB
    small = sp.Plan(sp.Geometry(*bench.SHAPES["8b"]), 2, 1, 1, (8,), 1, 8, 256, 100, pinned=True)
    assert small.host_bytes() == 40 * 2**20 and small.host_memory_bytes() == 2**30  # one block
    assert dataclasses.replace(small, pinned=False).host_memory_bytes() == small.host_bytes()


def test_cli_refuses_a_run_that_cannot_fit_before_building_anything(tmp_path):
    """100,000 registered adapters of the 8b shape: terabytes of host memory; refused with the plan printed."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_serve.py"), "--shape", "8b", "--adapters", "100000",
                           "--adapter-dir", str(tmp_path / "adapters")], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1
    assert "host: 100000 registered adapters" in proc.stdout
    assert "does not fit the machine" in proc.stderr and "host memory: 100000 registered adapters" in proc.stderr
    assert not (tmp_path / "adapters").exists()  # nothing written


def test_saturation_puts_every_request_at_zero_with_the_same_prompts(bench):
    args = argparse.Namespace(seed=3, requests=20, rate=16.0, prompt_min=4, prompt_max=9, adapters=7)
    paced = bench.workload(args, 100)
    args.rate = float("inf")
    at_once = bench.workload(args, 100)
    assert all(r["at"] == 0.0 for r in at_once) and paced[-1]["at"] > 0
    assert [(r["prompt"], r["adapter"]) for r in at_once] == [(r["prompt"], r["adapter"]) for r in paced]


def test_cpu_smoke_run_of_50_registered_8_resident_at_saturation(bench, tmp_path, capsys):
    out, adapters = tmp_path / "serve.json", tmp_path / "adapters"
    common = ["--shape", "tiny", "--adapters", "50", "--adapter-files", "10", "--resident", "8",
              "--adapter-dir", str(adapters)]
    result = bench.main(common + ["--rate", "inf", "--requests", "6", "--max-new-tokens", "3", "--prompt-min", "4",
                                  "--prompt-max", "8", "--max-num-seqs", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == result and result["complete"] and result["settings"]["rate"] == "inf"
    files = [load_file(str(f)) for f in sorted(adapters.glob("adapter_*/adapter_model.safetensors"))]
    assert len(files) == 10 and {t.dtype for f in files for t in f.values()} == {torch.float32}  # the model's
    assert sum(t.nbytes for f in files for t in f.values()) == result["plan"]["disk_bytes"]
    assert result["plan"]["files_to_write"] == 10 and result["plan"]["adapters"] == 50
    for mode in ("base", "pool"):
        row = result["rows"][mode]
        assert row["requests"] == 6 and row["tokens_per_s"] == pytest.approx(6 * 3 / row["makespan_s"])
        for field in bench.ROW_FIELDS:
            assert row[field] is not None, (mode, field)
        assert 0 < row["ttft_p50_s"] <= row["latency_p50_s"] <= row["latency_p99_s"] <= row["makespan_s"]
    pool = result["rows"]["pool"]
    assert pool["registered"] == 50 and pool["register_s"] > 0 and pool["register_adapters_per_s"] > 0
    assert pool["host_gib"] * 2**30 == result["plan"]["host_bytes"]  # the plan's host bytes are the pool's
    assert pool["distinct_adapters"] >= 2
    printed = capsys.readouterr().out
    assert "plan: one adapter" in printed and "all at t=0" in printed and "register" in printed
    # the files are reused by the next run, unless its ranks put another rank in a file
    again = bench.main(common + ["--plan-only"])
    assert again["plan"]["files_to_write"] == 0 and "rows" not in again
    with pytest.raises(bench.PlanError, match="rank 8 from an earlier run, where this run's --ranks put rank 32"):
        bench.main(common + ["--ranks", "32", "--plan-only"])


def test_names_registered_from_one_file_hold_their_own_host_copies(bench, tmp_path):
    """What the bench's many names over few files rely on: every register() reads and keeps its own copy."""
    from deltatune.serve import AdapterPool

    sp = load("serve_plan")
    model = bench.build_model("tiny", "cpu", torch.bfloat16)  # a GPU run's dtype: the files are in it too
    plan = sp.Plan(sp.Geometry(*bench.SHAPES["tiny"]), 2, 2, 1, (8,), 2, 4, 64, 16)
    [path] = bench.make_adapters(model, tmp_path, plan)
    assert {t.dtype for t in load_file(str(path / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    pool = AdapterPool(model, max_resident=2)
    pool.register("a", path)
    pool.register("b", path)
    a, b = pool._adapters["a"].layers, pool._adapters["b"].layers
    assert a.keys() == b.keys() and len(a) == 14
    for module in a:
        assert torch.equal(a[module].A, b[module].A)
        assert a[module].A.data_ptr() != b[module].A.data_ptr() and a[module].B.data_ptr() != b[module].B.data_ptr()
    assert pool.host_bytes() == plan.host_bytes()
