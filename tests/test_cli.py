"""The command line: short errors with suggestions, YAML keys named with their file, no abbreviated
flags, `train --output X --resume` alone, `models`, and Ctrl-C through a broken pipe."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deltatune.cli import main, parse_train_args
from deltatune.train.checkpoint import list_checkpoints

from test_train import make_tiny_llama, write_task  # noqa: E402  (tests/ is on sys.path under pytest)

pytest.importorskip("jsonargparse")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    return make_tiny_llama(root / "model"), write_task(root / "task.jsonl", n=12)


def run_flags(tiny, out, *extra):
    return ["--model", str(tiny[0]), "--data", str(tiny[1]), "--output", str(out), "--micro-batch", "2",
            "--max-length", "64", "--r", "4", "--device", "cpu", "--no-progress", *extra]


def test_mistyped_flag_is_a_short_error_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--lrr", "0.1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean `--lr`?" in err
    assert err.startswith("deltatune train: error: unrecognized arguments: --lrr")
    assert len(err.splitlines()) <= 3 and "usage:" not in err  # no usage dump
    with pytest.raises(SystemExit):
        main(["eval", "--adaptr", "x"])
    assert "did you mean `--adapter`?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--precision", "fp8"])
    err = capsys.readouterr().err
    assert err.startswith("deltatune train: error: --precision: ") and "fp8" in err
    assert main(["trian"]) == 2 and "did you mean `train`?" in capsys.readouterr().err


def test_long_flags_are_never_abbreviated(capsys):
    assert parse_train_args(["--max-steps", "7"], "t")[0].max_steps == 7
    with pytest.raises(SystemExit):
        parse_train_args(["--max-step", "7"], "t")  # once silently read as --max-steps
    assert "did you mean `--max-steps`? (flags are not abbreviated)" in capsys.readouterr().err
    for argv in (["--micro", "2"], ["--grad-acc", "2"]):
        with pytest.raises(SystemExit):
            parse_train_args(argv, "t")


def test_unknown_yaml_key_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\nlrr: 0.001\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{cfg}: unknown key 'lrr'; did you mean 'lr'?" in err and "usage:" not in err
    cfg.write_text("- a list\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg)])
    assert "expected a mapping of settings" in capsys.readouterr().err
    cfg.write_text("method: full\nr: 4\n")  # a LoRA field is no setting of full fine-tuning
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg)])
    assert "unknown key 'r'" in capsys.readouterr().err
    cfg.write_text("lora_dropout: 0.1\nmax-steps: 3\n")  # aliases and dashed spellings are keys too
    args, _, lora = parse_train_args(["--config", str(cfg)], "t")
    assert (args.max_steps, lora.dropout) == (3, 0.1)


def test_resume_with_only_output_uses_the_saved_settings(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *run_flags(tiny, out, "--max-steps", "2", "--lr", "0.02", "--seed", "5")]) == 0
    saved = json.loads((out / "train_args.json").read_text())
    # Nothing but --output and --resume (once: "--model is required"); max_steps may change on resume.
    assert main(["train", "--output", str(out), "--resume", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "is required" not in err
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == 3
    now = json.loads((out / "train_args.json").read_text())
    assert {k: v for k, v in now.items() if k not in ("max_steps", "resume")} == \
        {k: v for k, v in saved.items() if k not in ("max_steps", "resume")}
    # A flag that would change the computation is still refused.
    assert main(["train", "--output", str(out), "--resume", "--lr", "0.5", "--max-steps", "4"]) == 2
    assert "lr: 0.02 -> 0.5" in capsys.readouterr().err
    # Without a record to resume from, the error says what is missing and where it looked.
    assert main(["train", "--output", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--model is required" in err and "holds no train_args.json" in err


def test_failed_run_leaves_no_folder_holding_only_its_lock(tiny, tmp_path, capsys):
    out = tmp_path / "bad"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["train", *run_flags(tiny, out)[:2], "--data", str(bad), "--output", str(out)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err and not out.exists()


def test_models_prints_installed_model_paths(capsys):
    from deltatune.assets import installed_models

    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for name, _, package, path in installed_models():
        assert name in printed and (str(path) in printed if path else package in printed)
    installed = [(name, path) for name, _, _, path in installed_models() if path]
    if installed:
        assert main(["models", installed[0][0]]) == 0
        assert capsys.readouterr().out.strip() == str(installed[0][1])  # for --model $(deltatune models NAME)
    with pytest.raises(SystemExit):
        main(["models", "no-such-model"])
    assert "takes one of" in capsys.readouterr().err


def test_sigint_through_a_broken_pipe_still_checkpoints(tiny, tmp_path):
    """`deltatune train ... 2>&1 | tee log`, then Ctrl-C: tee dies first, and the progress bar's next
    write used to raise BrokenPipeError before the promised checkpoint."""
    out = tmp_path / "run"
    flags = run_flags(tiny, out, "--max-steps", "100000", "--save-every", "0")
    flags[flags.index("--no-progress")] = "--progress"  # the bar writes to the pipe all the time
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "train", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
            assert time.time() < deadline, "training did not start"
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        proc.stdout.close()  # the reader of the pipe is gone: every write now fails with EPIPE
        time.sleep(1.0)      # some progress-bar updates hit the broken pipe
        assert proc.poll() is None, f"the run died on a broken pipe (status {proc.returncode})"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130  # documented: interrupted runs exit with 130
    done = list_checkpoints(out / "checkpoints")
    assert len(done) == 1 and done[0][0] >= 1
    assert json.loads((done[0][1] / "state.json").read_text())["step"] == done[0][0]


def test_eval_checks_adapter_files_before_loading_and_shows_progress(tiny, tmp_path, capsys, monkeypatch):
    import deltatune.hub as hub

    out = tmp_path / "run"
    assert main(["train", *run_flags(tiny, out, "--max-steps", "1", "--val-fraction", "0.25")]) == 0
    capsys.readouterr()
    adapter = out / "adapter"
    assert main(["eval", "--adapter", str(adapter), "--data", str(tiny[1]), "--max-length", "64"]) == 0
    captured = capsys.readouterr()
    assert "evaluate" in captured.err and "loading" in captured.err  # what is loaded, and a bar over batches
    assert json.loads(captured.out.strip().splitlines()[-1])["examples"] == 12  # stdout keeps only the result
    # A broken adapter is reported before the model loads (once after a 30 s load).
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(hub, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.setattr(hub, "load_tokenizer", lambda *a, **k: pytest.fail("loaded the tokenizer first"))
    assert main(["eval", "--adapter", str(adapter), "--data", str(tiny[1])]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path / "nothing"), "--data", str(tiny[1])]) == 2
    assert "no such adapter directory" in capsys.readouterr().err


def test_validation_pass_shows_a_progress_bar(tiny, tmp_path, capsys):
    from deltatune.train import DataArgs, TrainArgs, train

    train(TrainArgs(model=str(tiny[0]), output=str(tmp_path / "run"), max_steps=1, micro_batch=2, device="cpu"),
          DataArgs(data=str(tiny[1]), val_fraction=0.5, max_length=64), log=lambda s: None)
    assert "evaluate" in capsys.readouterr().err
