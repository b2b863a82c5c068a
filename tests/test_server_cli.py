"""`deltatune serve` on the command line: its flags as ServeArgs, bad values refused with the flag
named before any model loads, and the flags reaching the app that uvicorn would serve."""

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.hub import load_model
from deltatune.serve import serve_command
from deltatune.serve.engine import Engine
from deltatune.serve.serve_command import ServeArgs

from test_train import make_tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)

pytest.importorskip("jsonargparse")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
MISSING = "/nonexistent/deltatune-model"  # never loaded: every refusal below comes first


@pytest.fixture
def parsed(monkeypatch):
    """main(["serve", *flags]) -> the ServeArgs run_serve would get (nothing is loaded or served)."""
    seen = []
    monkeypatch.setattr(serve_command, "run_serve", lambda args: seen.append(args) or 0)

    def parse(*flags):
        assert main(["serve", *flags]) == 0
        return seen.pop()
    return parse


def test_defaults_bind_loopback_and_flags_parse(parsed):
    args = parsed("--model", "m")
    assert args == ServeArgs(model="m")
    assert (args.host, args.port, args.adapter, args.api_key, args.adapter_root) == ("127.0.0.1", 8000, [], None, None)
    assert (args.max_concurrent_requests, args.max_request_bytes, args.max_tokens_limit) == (64, 1 << 20, None)
    assert not args.allow_adapter_loading and not args.pool
    args = parsed("--model", "m", "--host", "0.0.0.0", "--port", "9001", "--adapter", "sql=runs/sql",
                  "--adapter=chat=runs/chat", "--adapter", "x=a=b", "--adapter-root", "/srv/adapters",
                  "--allow-adapter-loading", "--api-key", "sk-1", "--max-concurrent-requests", "3",
                  "--max-request-bytes", "4096", "--max-tokens-limit", "50", "--max-resident-adapters", "2",
                  "--pool", "--served-model-name", "base", "--graceful-timeout", "1.5")
    assert args.adapter == ["sql=runs/sql", "chat=runs/chat", "x=a=b"]  # repeated, in order
    assert serve_command.adapter_specs(args.adapter) == {"sql": "runs/sql", "chat": "runs/chat", "x": "a=b"}
    assert (args.host, args.port, args.adapter_root, args.allow_adapter_loading, args.api_key) == \
        ("0.0.0.0", 9001, "/srv/adapters", True, "sk-1")
    assert (args.max_concurrent_requests, args.max_request_bytes, args.max_tokens_limit) == (3, 4096, 50)
    assert (args.max_resident_adapters, args.pool, args.served_model_name, args.graceful_timeout) == \
        (2, True, "base", 1.5)


@pytest.mark.parametrize("flags, words", [
    (["--port", "abc"], ["--port", "abc"]),
    (["--prot", "80"], ["did you mean `--port`?"]),
    (["--max-request-bytes", "1k"], ["--max-request-bytes", "1k"]),
    (["--api_keys", "k"], ["did you mean"]),
])
def test_unparsable_flags_exit_with_a_short_error(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", MISSING, *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune serve: error: ") and len(err.splitlines()) <= 2
    assert all(w in err for w in words), err


@pytest.mark.parametrize("flags, words", [
    (["--port", "70000"], ["--port 70000", "0..65535"]),
    (["--port", "-1"], ["--port -1"]),
    (["--host", ""], ["--host"]),
    (["--api-key", " "], ["--api-key", "non-empty"]),
    (["--max-concurrent-requests", "0"], ["--max-concurrent-requests 0", "at least 1"]),
    (["--max-request-bytes", "-5"], ["--max-request-bytes -5"]),
    (["--max-tokens-limit", "0"], ["--max-tokens-limit 0"]),
    (["--max-resident-adapters", "0"], ["--max-resident-adapters 0"]),
    (["--graceful-timeout", "-1"], ["--graceful-timeout -1.0"]),
    (["--max-lora-rank", "16"], ["--max-lora-rank 16", "with --pool"]),
    (["--max-lora-rank", "0", "--pool"], ["--max-lora-rank 0", "at least 1"]),
    (["--adapter", "sql"], ["--adapter 'sql'", "NAME=DIR"]),
    (["--adapter", "=dir"], ["NAME=DIR"]),
    (["--adapter", "a=x", "--adapter", "a=y"], ["'a' is given twice"]),
    (["--allow-adapter-loading"], ["--allow-adapter-loading needs --adapter-root"]),
    (["--adapter-root", "/nonexistent/root"], ["--adapter-root /nonexistent/root is not a directory"]),
    (["--adapter", "a=/nonexistent/adapter"], ["/nonexistent/adapter"]),
])
def test_bad_values_are_refused_naming_the_flag_before_the_model_loads(flags, words, capsys):
    assert main(["serve", "--model", MISSING, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune serve: error: ") and len(err.splitlines()) <= 2, err
    assert all(w in err for w in words), err
    assert MISSING not in err  # refused before the model was looked for


def test_missing_model_is_refused(capsys):
    assert main(["serve"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["serve", "--model", MISSING]) == 2
    assert MISSING in capsys.readouterr().err  # the model loader's own short error


def test_flags_reach_the_app_uvicorn_serves(tmp_path, monkeypatch, capsys):
    path = make_tiny_llama(tmp_path / "model")
    model, _ = load_model(str(path), dtype="float32")
    torch.manual_seed(1)
    dt.add_adapter(model, dt.LoraConfig(r=2, alpha=4, targets=["q_proj"], init="random"), name="a")
    dt.save_adapter(model, tmp_path / "root" / "sql", "a")
    served, load = {}, Engine.from_pretrained
    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **kw: load(*a, num_blocks=16, **kw))  # no 1 GiB cache
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("DELTATUNE_API_KEY", "sk-from-env")
    flags = ["serve", "--model", str(path), "--device", "cpu", "--port", "8123", "--adapter",
             f"sql={tmp_path / 'root' / 'sql'}", "--allow-adapter-loading", "--adapter-root",
             str(tmp_path / "root"), "--max-concurrent-requests", "3", "--max-request-bytes", "4096",
             "--max-tokens-limit", "50", "--graceful-timeout", "2"]
    assert main(flags) == 0
    state = served["app"].state.deltatune
    assert (served["host"], served["port"], served["timeout_graceful_shutdown"]) == ("127.0.0.1", 8123, 2.0)
    assert state.api_key == "sk-from-env" and state.base_name == "model" and list(state.adapters) == ["sql"]
    assert (state.max_concurrent_requests, state.max_request_bytes, state.max_tokens_limit) == (3, 4096, 50)
    assert state.allow_adapter_loading and state.adapter_root == str((tmp_path / "root").resolve())
    assert "http://127.0.0.1:8123/v1 (API key required)" in capsys.readouterr().err
    assert main([*flags, "--api-key", "sk-flag", "--served-model-name", "base"]) == 0
    assert served["app"].state.deltatune.api_key == "sk-flag"  # the flag wins over the environment
    assert served["app"].state.deltatune.base_name == "base"
