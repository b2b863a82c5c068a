"""``deltatune generate`` and ``deltatune chat``: the engine from the command line.

The settings are flat dataclasses (one flag per field, help from the docstrings, ``--config`` YAML),
parsed by ``deltatune.cli``; ``run_generate`` and ``run_chat`` take them and return an exit status.
Errors are one line, ``deltatune generate: error: ...``, exit status 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

__all__ = ["GenerateArgs", "ChatArgs", "run_generate", "run_chat", "COMMANDS"]


@dataclass
class _EngineFlags:
    """What ``generate`` and ``chat`` share: the model, the adapter, how to sample."""

    model: Optional[str] = None
    """Base model: directory, .gguf file or hub id; default: the base the adapter records."""
    adapter: Optional[str] = None
    """Adapter directory (PEFT format) to generate with."""
    max_new_tokens: int = 256
    """Tokens to generate at most per answer."""
    temperature: float = 0.0
    """0: greedy; > 0: sample at this temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens of the prompt and the answer."""
    seed: Optional[int] = None
    """Seed of the sampling (the same seed, the same text)."""
    stop: Optional[str] = None
    """A string that ends the answer (not printed)."""
    device: str = "auto"
    """"auto" (CUDA if present), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16"."""
    cuda_graphs: Optional[bool] = None
    """Replay decode steps from CUDA graphs (unset: on with a CUDA device; --no-cuda-graphs: eager steps)."""

    def sampling(self) -> dict:
        """The SamplingParams fields these flags set."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                "stop": [self.stop] if self.stop else []}


@dataclass
class GenerateArgs(_EngineFlags):
    """Generate a continuation of a prompt with a model, optionally with an adapter."""

    prompt: Optional[str] = None
    """The prompt; default: read from stdin."""
    chat_template: bool = False
    """Send the prompt as a user message through the tokenizer's chat template."""
    stream: bool = True
    """Print the text as it is generated (else once at the end)."""


@dataclass
class ChatArgs(_EngineFlags):
    """Chat with a model (optionally an adapter) through its chat template: one message a line, Ctrl-D to end."""

    system: Optional[str] = None
    """A system message that opens the conversation."""


def _engine(args: _EngineFlags, prog: str):
    """The engine of ``args`` with the adapter added (as "adapter"); None after printing an error."""
    from deltatune.formats.files import read_adapter_files
    from deltatune.hub import ModelLoadError
    from deltatune.serve.engine import Engine

    if not args.model:
        print(f"{prog}: error: --model is required" + (f" ({args.adapter} records no base model)" if args.adapter
                                                        else ""), file=sys.stderr)
        return None
    try:
        if args.adapter:
            read_adapter_files(args.adapter)  # a broken adapter is reported before the model loads
        engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                        cuda_graphs=args.cuda_graphs)
        if args.adapter:
            engine.add_adapter("adapter", args.adapter)
    except (ModelLoadError, ValueError, OSError, KeyError) as e:  # AdapterFileError, UnsupportedModelError
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None
    return engine


def run_generate(args: GenerateArgs, stdin=None, stdout=None) -> int:
    """``deltatune generate``: print the continuation of ``args.prompt`` (or of stdin); returns the exit status."""
    prog, stdin, stdout = "deltatune generate", stdin or sys.stdin, stdout or sys.stdout
    prompt = args.prompt if args.prompt is not None else stdin.read()
    if not prompt:
        print(f"{prog}: error: the prompt is empty (give --prompt or pipe it in)", file=sys.stderr)
        return 2
    engine = _engine(args, prog)
    if engine is None:
        return 2
    adapter = "adapter" if args.adapter else None
    try:
        source = engine.chat_prompt([{"role": "user", "content": prompt}]) if args.chat_template else prompt
        if args.stream:
            for piece in engine.stream(source, adapter, **args.sampling()):
                stdout.write(piece)
                stdout.flush()
        else:
            stdout.write(engine.generate([source], adapter, **args.sampling())[0].text)
    except ValueError as e:  # a refused request, bad sampling settings, no chat template
        print(f"\n{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stdout.write("\n")
        return 130
    stdout.write("\n")
    return 0


def run_chat(args: ChatArgs, stdin=None, stdout=None) -> int:
    """``deltatune chat``: read a message a line from stdin, print each answer as it is generated; the
    conversation is kept. Ctrl-D (end of input) or Ctrl-C ends it; returns the exit status."""
    prog, stdin, stdout = "deltatune chat", stdin or sys.stdin, stdout or sys.stdout
    engine = _engine(args, prog)
    if engine is None:
        return 2
    if not getattr(engine.tokenizer, "chat_template", None):
        print(f"{prog}: error: the tokenizer of {args.model} has no chat template; use `deltatune generate`",
              file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}" + (f" + {args.adapter}" if args.adapter else "")
              + " (Ctrl-D or Ctrl-C to leave)", file=sys.stderr)
    try:
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            answer = []
            for piece in engine.chat(messages, "adapter" if args.adapter else None, stream=True, **args.sampling()):
                stdout.write(piece)
                stdout.flush()
                answer.append(piece)
            stdout.write("\n")
            stdout.flush()
            messages.append({"role": "assistant", "content": "".join(answer)})
    except KeyboardInterrupt:
        stdout.write("\n")
    except ValueError as e:  # a conversation grown past the cache or the model's length
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"generate": (GenerateArgs, run_generate), "chat": (ChatArgs, run_chat)}
"""command -> (its settings dataclass, the function running it)."""
