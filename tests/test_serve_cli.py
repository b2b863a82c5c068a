"""`deltatune generate` and `deltatune chat` on a tiny model directory: the text the engine generates,
a conversation read from piped stdin, short errors."""

import io

import pytest
import torch

import deltatune as dt
from deltatune.cli import main
from deltatune.serve import Engine

from test_train import make_tiny_llama  # noqa: E402  (tests/ is on sys.path under pytest)

pytest.importorskip("jsonargparse")
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir with a chat template, LoRA adapter dir)."""
    root = tmp_path_factory.mktemp("serve_cli")
    path = make_tiny_llama(root / "model")
    engine = Engine.from_pretrained(str(path), num_blocks=8)
    engine.tokenizer.chat_template = TEMPLATE
    engine.tokenizer.save_pretrained(path)
    torch.manual_seed(3)
    dt.add_adapter(engine.model, dt.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random"), name="a")
    with torch.no_grad():
        for p in dt.adapter_params(engine.model):
            p.normal_(0, 0.5)
    dt.save_adapter(engine.model, root / "adapter", "a")
    return path, root / "adapter"


def _engine(path, adapter=None):
    eng = Engine.from_pretrained(str(path), num_blocks=16)
    if adapter:
        eng.add_adapter("adapter", str(adapter))
    return eng


def test_generate_prints_the_engine_text(tiny, capsys):
    path, adapter = tiny
    flags = ["--model", str(path), "--prompt", "repeat two", "--max-new-tokens", "12", "--device", "cpu"]
    assert main(["generate", *flags]) == 0
    base = capsys.readouterr().out
    assert base == _engine(path).generate(["repeat two"], max_new_tokens=12)[0].text + "\n"
    assert main(["generate", *flags, "--adapter", str(adapter), "--no-stream"]) == 0
    tuned = capsys.readouterr().out
    assert tuned == _engine(path, adapter).generate(["repeat two"], "adapter", max_new_tokens=12)[0].text + "\n"
    assert tuned != base  # the adapter is used
    seeded = ["generate", *flags, "--temperature", "1.0", "--seed", "5"]
    assert main(seeded) == 0 and main(seeded) == 0
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second


def test_chat_answers_each_line_of_piped_stdin(tiny, capsys, monkeypatch):
    path, _ = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nhow are you\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    eng = _engine(path)
    first = eng.chat([{"role": "user", "content": "hi"}], max_new_tokens=6).text
    second = eng.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "how are you"}], max_new_tokens=6).text
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_generate_and_chat_errors_are_short(tiny, tmp_path, capsys, monkeypatch):
    path, _ = tiny
    assert main(["generate", "--prompt", "x"]) == 2
    assert "deltatune generate: error: --model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(path), "--max-new-token", "3"])
    assert "did you mean `--max-new-tokens`?" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt", "x", "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune generate: error: ") and str(tmp_path) in err and len(err.splitlines()) <= 2
    assert main(["generate", "--model", str(path), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    plain = make_tiny_llama(tmp_path / "plain")  # its tokenizer has no chat template
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_cuda_graphs_flag_reaches_the_engine(tiny, capsys, monkeypatch):
    """--cuda-graphs / --no-cuda-graphs go to the engine; unset, the engine decides (on with CUDA)."""
    path, _ = tiny
    seen = []
    real = Engine.from_pretrained.__func__

    def spy(cls, *a, **k):
        seen.append(k.get("cuda_graphs", "absent"))
        return real(cls, *a, **k)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(spy))
    flags = ["--model", str(path), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    for extra in ([], ["--no-cuda-graphs"], ["--cuda-graphs"]):
        assert main(["generate", *flags, *extra]) == 0
    assert seen == [None, False, True]
    assert capsys.readouterr().out
