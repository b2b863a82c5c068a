"""Checkpoints: atomic writes, pruning, exact round trips, and kill -9 / SIGTERM then --resume.

The resume tests run training in subprocesses on a tiny random Llama and kill them at chosen
points (after a step, in the middle of a checkpoint write, in the middle of pruning, by SIGTERM);
resuming must give the bitwise-same final adapter as one uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from deltatune.train import checkpoint as ckpt

from test_train import make_tiny_llama, write_task  # noqa: E402  (tests/ is on sys.path under pytest)

# A training run that kills itself at a chosen point. argv: args-json, mode, step.
RUNNER = textwrap.dedent("""
    import dataclasses, json, os, shutil, signal, sys
    import deltatune.train.checkpoint as ck
    from deltatune import LoraConfig
    from deltatune.train import DataArgs, TrainArgs, train

    flat, mode, at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    settings = [cls(**{f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat})
                for cls in (TrainArgs, DataArgs, LoraConfig)]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "ckpt-write":   # die after the first file of checkpoint `at` is written, before the rename
        real_save = ck._save_tensors
        def save(path, tensors):
            real_save(path, tensors)
            if f"step-{at:08d}" in path.parent.name:
                die()
        ck._save_tensors = save
    if mode == "prune":        # die after an old checkpoint is renamed away, before it is deleted
        real_rmtree = shutil.rmtree
        def rmtree(path, *a, **k):
            if ".trash-" in str(path):
                die()
            real_rmtree(path, *a, **k)
        ck.shutil.rmtree = rmtree
    def on_step(step, metrics):
        if step == at and mode == "step":
            die()
        if step == at and mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
    res = train(*settings, on_step=on_step, log=lambda s: None)
    print(json.dumps({"status": res.status, "step": res.step}))
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ckpt")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl", n=18)


def run(tiny, out, mode="none", at=0, resume=False):
    # Dropout, accumulation and an epoch boundary (18 examples, 6 per step) all take part.
    args = dict(model=str(tiny[0]), data=str(tiny[1]), output=str(out), max_steps=10, micro_batch=3, grad_accum=2,
                lr=1e-2, dropout=0.1, r=4, alpha=8, max_length=128, save_every=2, keep=2, warmup_steps=2,
                seed=3, progress=False, resume=resume, device="cpu")
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args), mode, str(at)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return proc


def last_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def read_bytes(path):
    return path.read_bytes()


def test_kill_anywhere_then_resume_is_bitwise_exact(tiny, tmp_path):
    ref = run(tiny, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    cdir = out / "checkpoints"

    p = run(tiny, out, "sigterm", 3)          # SIGTERM mid-interval: saves step 3, exits cleanly
    assert p.returncode == 0 and last_line(p.stdout)["status"] == "interrupted", p.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(cdir)] == [2, 3]

    p = run(tiny, out, "step", 5, resume=True)  # kill -9 after step 5: step 4's checkpoint is newest
    assert p.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(cdir).name == "step-00000004"

    p = run(tiny, out, "ckpt-write", 6, resume=True)  # kill -9 inside the write of checkpoint 6
    assert p.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(cdir).name == "step-00000004"
    assert any(d.name.startswith(".tmp-step-00000006") for d in cdir.iterdir())

    p = run(tiny, out, "prune", 8, resume=True)  # kill -9 while deleting the oldest checkpoint
    assert p.returncode == -signal.SIGKILL
    assert any(d.name.startswith(".trash-") for d in cdir.iterdir())

    p = run(tiny, out, resume=True)
    assert p.returncode == 0 and last_line(p.stdout) == {"status": "done", "step": 10}, p.stderr[-2000:]
    assert not any(d.name.startswith((".tmp-", ".trash-")) for d in cdir.iterdir())
    assert [s for s, _ in ckpt.list_checkpoints(cdir)] == [8, 10]
    assert read_bytes(out / "adapter" / "adapter_model.safetensors") == \
        read_bytes(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    # The metrics log holds each step once, as the uninterrupted run's does.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    ref_losses = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == ref_losses


def test_save_load_round_trip_and_pruning(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for step in (1, 2, 3, 4):
        path = ckpt.save_checkpoint(tmp_path, step, model, opt, sched, keep=2, extra={"samples_seen": step * 5})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4] and path.name == "step-00000004"
    expected_rng = torch.get_rng_state()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    exp_opt = opt.state_dict()

    torch.manual_seed(123)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model2[0].weight.requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert state["samples_seen"] == 20 and sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for n, p in model2.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[n])
    for pid, st in exp_opt["state"].items():
        for k, v in st.items():
            assert torch.equal(opt2.state_dict()["state"][pid][k], v)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # A model whose trainable set differs is refused, naming the checkpoint.
    model2[0].weight.requires_grad_(True)
    with pytest.raises(ckpt.CheckpointError, match="step-00000004"):
        ckpt.load_checkpoint(path, model2)


def test_half_written_checkpoint_is_invisible(tmp_path):
    (tmp_path / ".tmp-step-00000009-123").mkdir()
    (tmp_path / ".tmp-step-00000009-123" / "trainable.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert len(ckpt.clean_stale(tmp_path)) == 1 and not any(tmp_path.iterdir())


def test_a_second_training_on_the_same_output_is_refused(tmp_path):
    """Two runs in one directory would interleave metrics and prune each other's checkpoints."""
    from deltatune.train import DataArgs, TrainArgs, train

    with ckpt.run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with pytest.raises(ckpt.CheckpointError, match=rf"in use by another training \(pid {os.getpid()}\)"):
            train(TrainArgs(model="unused", output=str(tmp_path)), DataArgs(data="unused"))
    with ckpt.run_lock(tmp_path):  # released when the holder is done
        pass
