"""Data-parallel training (deltatune.dist): 2 processes on the CPU (gloo) under torchrun, FSDP2 and DDP,
give the adapter of one process with the same global batch; a run whose rank is killed resumes exactly,
on 2 processes or on 1."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.dist import World
from deltatune.dist.fsdp import decoder_blocks
from deltatune.train import TrainError, train
from deltatune.train.args import TrainArgs
from deltatune.train.checkpoint import list_checkpoints
from deltatune.train.parallel import check_world, sharding_of

from test_train import make_tiny_llama, split_settings, write_task  # noqa: E402  (tests/ is on sys.path)

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
# lr small enough that Adam's first steps on near-zero gradients (where the sign of rounding noise
# decides the update) stay far below the 1e-5 tolerance; FSDP's gathered weights sit at other
# addresses, so CPU matmuls may round differently in the last bit
SETTINGS = dict(max_steps=4, micro_batch=2, lr=2e-3, max_length=64, save_every=2, progress=False, r=4, alpha=8,
                device="cpu", dropout=0.1, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dist")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl", n=12)


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def one_process(tiny, out, **kw) -> dict:
    """The adapter of the 1-process run with the 2-process run's global batch (grad_accum 2)."""
    res = train(*split_settings({**SETTINGS, "model": str(tiny[0]), "data": str(tiny[1]), "output": str(out),
                                 "grad_accum": 2, **kw}), log=lambda *_: None)
    assert res.status == "done"
    return load_file(str(res.adapter / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_fsdp_and_ddp_equal_one_process(tiny, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SETTINGS, "model": str(tiny[0]), "data": str(tiny[1])}))
    proc = subprocess.run(torchrun(str(HERE / "_dist_worker.py"), str(settings), str(tmp_path), "ddp", "fsdp"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = one_process(tiny, tmp_path / "one")
    assert max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k) > 1e-3  # it trained
    for kind in ("ddp", "fsdp"):
        out = tmp_path / kind
        assert kind in proc.stdout + proc.stderr  # "ddp over 2 processes (gloo)", logged by rank 0 only
        got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        assert max_diff(got, ref) <= 1e-5, kind
        step, ckpt = list_checkpoints(out / "checkpoints")[-1]
        assert step == 4 and json.loads((ckpt / "state.json").read_text())["world_size"] == 2
        # the checkpoint holds whole tensors (FSDP's shards gathered), the same as one process writes
        one = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
        assert max_diff(load_file(str(ckpt / "trainable.safetensors")), one) <= 1e-5
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one process writes the metrics


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker ``rank`` (a child of the launcher with RANK=rank in its environment)."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{child}/environ").read_bytes():
                return int(child)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


@pytest.mark.slow
def test_killed_rank_resumes_exactly_on_two_or_one_processes(tiny, tmp_path):
    out = tmp_path / "run"
    flags = ["--model", str(tiny[0]), "--data", str(tiny[1]), "--output", str(out), "--micro-batch", "2",
             "--max-length", "64", "--lora-dropout", "0.1", "--seed", "3", "--lr", "0.002", "--device", "cpu",
             "--no-progress", "--save-every", "2", "--keep", "10", "--alpha", "8"]
    ref = one_process(tiny, tmp_path / "ref", max_steps=12, r=16)  # --r cannot pass torchrun's own flags
    proc = subprocess.Popen(torchrun("-m", "deltatune.cli", "train", *flags, "--max-steps", "12"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list_checkpoints(out / "checkpoints"):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint written"
            time.sleep(0.05)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)  # one rank dies mid-run; torchrun stops the other
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert 0 < done[-1] < 12
    # the same checkpoint resumed by one process (grad_accum 2: the same global batch)
    shutil.copytree(out, tmp_path / "single")
    (tmp_path / "single" / ".lock").unlink(missing_ok=True)
    res = train(*split_settings({**SETTINGS, "model": str(tiny[0]), "data": str(tiny[1]), "max_steps": 12,
                                 "output": str(tmp_path / "single"), "grad_accum": 2, "resume": True, "r": 16}),
                log=lambda *_: None)
    assert max_diff(load_file(str(res.adapter / "adapter_model.safetensors")), ref) <= 1e-5
    # and by two processes, with nothing but --output and --resume
    resumed = subprocess.run(torchrun("-m", "deltatune.cli", "train", "--output", str(out), "--resume",
                                      "--no-progress"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {done[-1]}" in resumed.stdout + resumed.stderr
    assert max_diff(load_file(str(out / "adapter" / "adapter_model.safetensors")), ref) <= 1e-5


def test_resume_on_another_number_of_processes_keeps_the_global_step(tmp_path):
    ckpt = tmp_path / "step-00000002"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    saved = {"grad_accum": 1, "micro_batch": 2}
    one = World()
    assert check_world(saved, ckpt, TrainArgs(grad_accum=2), one)["grad_accum"] == 2  # 1 x 2 processes = 2 x 1
    with pytest.raises(TrainError, match="use --grad-accum 2"):
        check_world(saved, ckpt, TrainArgs(grad_accum=1), one)
    assert check_world(saved, ckpt, TrainArgs(grad_accum=1), World(rank=1, size=2)) is saved


def test_sharding_choice_and_decoder_blocks():
    assert sharding_of(TrainArgs(), World()) == "none"
    assert sharding_of(TrainArgs(), World(size=2)) == "fsdp"
    assert sharding_of(TrainArgs(sharding="ddp"), World(size=2)) == "ddp"
    with pytest.raises(TrainError, match="separate copies"):
        sharding_of(TrainArgs(sharding="none"), World(size=2))
    with pytest.raises(TrainError, match="--merge does not run under --sharding fsdp"):  # it used to hang
        sharding_of(TrainArgs(merge=True), World(size=2))
    assert sharding_of(TrainArgs(merge=True, sharding="ddp"), World(size=2)) == "ddp"
    assert sharding_of(TrainArgs(merge=True), World()) == "none"
    from _models import gpt2, llama

    assert [type(b).__name__ for b in decoder_blocks(llama())] == ["LlamaDecoderLayer"] * 2
    model = gpt2()
    model._no_split_modules = None  # the fallback: the largest ModuleList of one class
    assert decoder_blocks(model) == list(model.transformer.h)
    assert decoder_blocks(torch.nn.Linear(2, 2)) == []


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"fast": True, "gradient_checkpointing": True}, {"quant": "nf4"}],
                         ids=["fused-path-checkpointing", "qlora"])
def test_fused_path_checkpointing_and_qlora_under_fsdp_and_ddp(tiny, tmp_path, extra):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SETTINGS, "model": str(tiny[0]), "data": str(tiny[1]), "max_steps": 3, **extra}))
    proc = subprocess.run(torchrun(str(HERE / "_dist_worker.py"), str(settings), str(tmp_path), "ddp", "fsdp"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "fast" in extra:
        assert "fused path" in proc.stdout + proc.stderr
    ref = one_process(tiny, tmp_path / "one", max_steps=3, **extra)
    for kind in ("ddp", "fsdp"):
        assert max_diff(load_file(str(tmp_path / kind / "adapter" / "adapter_model.safetensors")), ref) <= 1e-5, kind


# -- QLoRA under FSDP: the 4-bit codes in float storage, sharded ----------------------------------------------
def test_qlora_under_fsdp_shards_the_4bit_codes(tiny, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SETTINGS, "model": str(tiny[0]), "data": str(tiny[1]), "max_steps": 3,
                                    "quant": "nf4", "shard_report": True}))
    proc = subprocess.run(torchrun(str(HERE / "_dist_worker.py"), str(settings), str(tmp_path), "fsdp"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = one_process(tiny, tmp_path / "one", max_steps=3, quant="nf4")
    assert max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k) > 1e-3  # it trained
    assert max_diff(load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")), ref) <= 1e-5
    assert not any("packed" in k or "absmax" in k for k in ref)  # the adapter file holds the adapter only

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny[0])
    shapes = {n: m.weight.shape for n, m in dense.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}  # what --quant nf4 quantizes
    ranks = [json.loads((tmp_path / "fsdp" / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    for name, shape in shapes.items():
        for role, nbytes in (("packed", shape.numel() // 2), ("absmax", shape.numel() // 64)):  # double quant
            key = f"{name}.{role}"
            assert all(key in r["params"] for r in ranks), f"{key} is not a parameter: FSDP cannot shard it"
            (local0, whole, dtype), (local1, *_) = (r["params"][key] for r in ranks)
            assert dtype == "torch.float32" and whole == -(-nbytes // 4), (name, role)  # 4 code bytes a float
            assert local0 + local1 == whole and max(local0, local1) == -(-whole // 2), (name, role)  # half each
    # and no process keeps the whole tensors elsewhere (the base module an adapter wraps points at the shards)
    assert [r["hidden_whole_bytes"] for r in ranks] == [0, 0]


def _quantized_tiny(kind, double_quant=True):
    from _models import llama

    torch.manual_seed(0)
    model = llama()
    dt.quantize_model(model, kind=kind, blocksize=None if kind == "int8" else 64, double_quant=double_quant)
    dt.add_adapter(model, dt.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in dt.adapter_params(model):
            p.normal_(0, 0.05)  # a non-zero adapter, so merging changes the codes
    return model


def test_float_storage_round_trip_is_exact():
    from deltatune.quant.storage import from_float, to_float

    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)  # all 16 bits: NaNs, infs, subnormals
    odd = every.view(torch.uint8)[:-1]  # bytes that fill no whole element: padded
    for source in (every, odd, torch.tensor(3.25), torch.randint(-128, 127, (5, 3), dtype=torch.int8)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            storage = to_float(source, dtype)
            assert storage.dtype == dtype and storage.dim() == 1
            assert storage.numel() == -(-source.numel() * source.element_size() // dtype.itemsize)
            moved = torch.cat([c.clone() for c in storage.chunk(2)])  # what FSDP's shard and all-gather do: copies
            back = from_float(moved, source.dtype, source.shape)
            assert back.dtype == source.dtype and back.shape == source.shape
            same = (back.view(torch.uint8), source.view(torch.uint8)) if source.dim() else (back, source)
            assert torch.equal(*same)  # the bytes (0-dim: the value, whose bytes a view cannot show)
    with pytest.raises(ValueError, match="floating dtype"):
        to_float(every, torch.int32)


@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_float_storage_layer_is_the_buffer_layer(kind, double_quant):
    from deltatune.quant import store_as_buffers, store_as_float
    from deltatune.train.report import count_params

    model = _quantized_tiny(kind, double_quant)
    ids = torch.randint(0, 64, (2, 9))
    ref = model(ids).logits
    ref.sum().backward()
    grads = [p.grad.clone() for p in dt.adapter_params(model)]
    buffers = {n: b.clone() for n, b in model.named_buffers() if "proj" in n}
    counts = count_params(model)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        store_as_float(model, dtype)
        held = {n: p for n, p in model.named_parameters() if n in buffers}
        assert set(held) == set(buffers) and not any(n in buffers for n, _ in model.named_buffers())
        assert all(p.dtype == dtype and not p.requires_grad for p in held.values())
        assert count_params(model) == counts  # the codes count as the logical weight, not again
        model.zero_grad()
        out = model(ids).logits
        out.sum().backward()
        assert torch.equal(out, ref)
        assert all(torch.equal(p.grad, g) for p, g in zip(dt.adapter_params(model), grads))
        assert "float_storage" in repr(model.get_submodule("model.layers.0.mlp.up_proj"))
        store_as_buffers(model)
        assert all(torch.equal(b, buffers[n]) and b.dtype == buffers[n].dtype for n, b in model.named_buffers()
                   if n in buffers)
        assert not any(n in buffers for n, _ in model.named_parameters())

    # merge (dequantize, add, requantize) writes through the float storage as into the buffers
    merged_ref = copy.deepcopy(model)
    dt.merge(merged_ref)
    store_as_float(model, torch.bfloat16)
    dt.merge(model)
    assert torch.equal(model(ids).logits, merged_ref(ids).logits)
    dt.unmerge(model)
    exported = dt.quant.export_merged(copy.deepcopy(model), dtype=torch.float32)  # export reads the storage
    torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    dt.remove_adapter(model, "default")  # the unwrapped QuantLinear keeps the float storage
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, dt.quant.QuantLinear) and q_proj.packed.dtype == torch.bfloat16
    model(ids)
    model.half()  # a cast after store_as_float would change the codes' bytes: refused, not decoded
    with pytest.raises(TypeError, match="float storage written as torch.bfloat16"):
        model(ids)
