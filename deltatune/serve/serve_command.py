"""``deltatune serve``: the OpenAI-compatible HTTP server (``server.py``) from the command line.

    deltatune serve --model SmolLM2-135M.gguf --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter

binds 127.0.0.1:8000 (loopback) unless ``--host`` says otherwise. SIGTERM or Ctrl-C stops taking
new connections, lets running requests finish (up to ``--graceful-timeout`` seconds), then exits.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["ServeArgs", "run_serve", "gather_adapter_flags", "adapter_specs", "check_limits"]

PROG = "deltatune serve"


@dataclass
class ServeArgs:
    """Serve a model and adapters over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""

    model: Optional[str] = None
    """Base model: directory, .gguf file or hub id."""
    adapter: list[str] = field(default_factory=list)
    """An adapter to serve as NAME=DIR (repeat the flag for more); requests choose it with "model": NAME."""
    host: str = "127.0.0.1"
    """Address to bind (default loopback only; 0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port."""
    api_key: Optional[str] = None
    """Clients must send "Authorization: Bearer KEY" (default: the DELTATUNE_API_KEY environment variable)."""
    served_model_name: Optional[str] = None
    """The base model's name in requests and /v1/models (default: the model path's stem)."""
    max_resident_adapters: int = 64
    """Adapters held at once."""
    pool: bool = False
    """Serve LoRA adapters from a stacked adapter pool (AdapterPool: LRU residency, SGMV kernels on GPU)."""
    max_lora_rank: Optional[int] = None
    """With --pool: the largest LoRA rank served; the pool's slots at this rank are set aside beside the KV cache."""
    allow_adapter_loading: bool = False
    """Offer /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root)."""
    adapter_root: Optional[str] = None
    """The directory adapters loaded over HTTP must lie in (paths outside it are refused)."""
    max_concurrent_requests: int = 64
    """Generation requests answered at once; more get HTTP 429."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies get HTTP 413."""
    max_tokens_limit: Optional[int] = None
    """The largest max_tokens a request may ask for (default: the model's length)."""
    graceful_timeout: float = 30.0
    """Seconds SIGTERM waits for running requests before the server exits."""
    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16"."""
    device: str = "auto"
    """"auto" (CUDA if present), "cpu", "cuda", ..."""
    cuda_graphs: Optional[bool] = None
    """Replay decode steps from CUDA graphs (unset: on with a CUDA device; --no-cuda-graphs: eager steps)."""


def adapter_specs(specs: list[str]) -> dict[str, str]:
    """``["name=dir", ...]`` as ``{name: dir}``; ValueError naming a malformed or repeated one."""
    found = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: give NAME=DIR (for example sql=runs/sql/adapter)")
        if name in found:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        found[name] = path
    return found


def check_limits(args: ServeArgs) -> None:
    """ValueError naming the first flag of ``args`` whose value the server cannot use (before the model loads)."""
    checks = [(bool(args.host), "--host", "an address to bind (127.0.0.1, 0.0.0.0, ::1, ...)"),
              (0 <= args.port <= 65535, "--port", "a TCP port in 0..65535"),
              (args.api_key is None or bool(args.api_key.strip()), "--api-key", "a non-empty key"),
              (args.max_resident_adapters >= 1, "--max-resident-adapters", "at least 1"),
              (args.max_concurrent_requests >= 1, "--max-concurrent-requests", "at least 1"),
              (args.max_request_bytes >= 1, "--max-request-bytes", "at least 1"),
              (args.max_tokens_limit is None or args.max_tokens_limit >= 1, "--max-tokens-limit", "at least 1"),
              (args.graceful_timeout >= 0, "--graceful-timeout", "seconds, at least 0"),
              (args.max_lora_rank is None or args.max_lora_rank >= 1, "--max-lora-rank", "at least 1"),
              (args.max_lora_rank is None or args.pool, "--max-lora-rank", "it together with --pool")]
    for ok, flag, wanted in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} {value!r}: give {wanted}")


def run_serve(args: ServeArgs) -> int:
    """Load the model and adapters, then serve until SIGTERM / Ctrl-C; returns the exit status."""
    try:
        import uvicorn

        from deltatune.serve.server import create_app
    except ImportError as e:
        print(f"{PROG}: error: {e.name or e} is not installed: pip install 'deltatune[serve]'", file=sys.stderr)
        return 2
    from deltatune.formats.files import read_adapter_files
    from deltatune.hub import ModelLoadError
    from deltatune.serve.engine import Engine

    if not args.model:
        print(f"{PROG}: error: --model is required", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("DELTATUNE_API_KEY") or None
    try:
        check_limits(args)
        adapters = adapter_specs(args.adapter)
        if args.allow_adapter_loading and not args.adapter_root:
            raise ValueError("--allow-adapter-loading needs --adapter-root DIR: adapters load from under it only")
        if args.adapter_root and not os.path.isdir(args.adapter_root):
            raise ValueError(f"--adapter-root {args.adapter_root} is not a directory")
        for path in adapters.values():
            read_adapter_files(path)  # a broken adapter is reported before the model loads
        engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                        max_resident_adapters=args.max_resident_adapters, pool=args.pool or None,
                                        max_lora_rank=args.max_lora_rank, cuda_graphs=args.cuda_graphs)
        for name, path in adapters.items():
            engine.add_adapter(name, path)
        name = args.served_model_name or Path(args.model.rstrip("/")).stem
        app = create_app(engine, name, api_key=api_key, allow_adapter_loading=args.allow_adapter_loading,
                         adapter_root=args.adapter_root, max_concurrent_requests=args.max_concurrent_requests,
                         max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit)
    except (ModelLoadError, ValueError, OSError, KeyError) as e:  # AdapterFileError, UnsupportedModelError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"serving {name}" + (f" + adapters {', '.join(adapters)}" if adapters else "")
          + f" on http://{args.host}:{args.port}/v1" + (" (API key required)" if api_key else ""), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def gather_adapter_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--adapter NAME=DIR`` flags (they may repeat), and their values."""
    rest, specs, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--adapter", "--adapter+") and i + 1 < len(argv):
            specs.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--adapter="):
            specs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, specs
