"""``deltatune demo``: teach SmolLM2-135M-Instruct a strict output format with LoRA, on a CPU, in minutes.

The task is generated here (no download): a sentence about a person, e.g. "Meet Ana Ortiz, a
41-year-old from Lyon.", is to be answered with exactly one line of JSON with fixed keys and key
order, ``{"name": "Ana Ortiz", "age": 41, "city": "Lyon"}``. The prompt never shows that format,
so the base model answers in prose (exact match near 0%); a couple of minutes of LoRA training
on a few hundred examples teaches it. Exact match is greedy-decoding exact match (the whole
answer, up to the end-of-turn token), on held-out sentences with people not seen in training.

The generated data are written next to the adapter, so the same run is also
``deltatune train --model <SmolLM2 gguf> --data <output>/data/train.jsonl --val-data <output>/data/test.jsonl``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoArgs", "run_demo", "make_examples"]

SYSTEM = "Extract the record."
FIRST = ["Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf",
         "Zoe", "Amara", "Bruno", "Clara", "Diego", "Esther", "Felix", "Hana", "Igor", "Julia", "Kofi", "Lucia"]
LAST = ["Ortiz", "Novak", "Kim", "Schmidt", "Rossi", "Haddad", "Okafor", "Tanaka", "Silva", "Berg", "Dubois",
        "Kowalski", "Nguyen", "Patel", "Moreau", "Larsen", "Costa", "Fischer", "Ivanova", "Mensah", "Walsh",
        "Yilmaz", "Jensen", "Romero", "Sato", "Weber", "Abara", "Lindqvist", "Murphy", "Castillo"]
CITIES = ["Lyon", "Oslo", "Porto", "Kyoto", "Lagos", "Quito", "Perth", "Turin", "Ghent", "Graz", "Leeds",
          "Bergen", "Cusco", "Hanoi", "Krakow", "Malaga", "Nantes", "Seville", "Tampere", "Utrecht", "Vilnius",
          "Zagreb", "Accra", "Busan", "Cork", "Dakar", "Essen", "Fez", "Galway", "Haifa"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} still lives in {city}.",
    "{name} ({age}) moved to {city} last year.",
    "Our new neighbour in {city} is {name}, who turned {age} in May.",
    "Born {age} years ago, {name} now works in {city}.",
    "The librarian of {city}, {name}, is {age}.",
]


@dataclass
class DemoArgs:
    """Fine-tune SmolLM2-135M-Instruct with LoRA on a generated strict-format task and report exact match."""

    output: str = "deltatune-demo"
    """Directory for the adapter, the loss plot, metrics and the generated data (replaced if it holds a demo)."""
    steps: int = 32
    """Optimizer steps."""
    micro_batch: int = 8
    """Examples per step."""
    lr: float = 2e-3
    """Peak learning rate (cosine schedule, short warmup)."""
    r: int = 8
    """LoRA rank (all linear layers)."""
    train_examples: int = 400
    """Generated training examples."""
    test_examples: int = 100
    """Held-out examples (people and sentences not in the training set)."""
    seed: int = 0
    """Seed of the data and of training."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    progress: bool = True
    """Show a progress bar."""


def _record(rng: random.Random, people: list[tuple[str, str]]) -> dict:
    first, last = rng.choice(people)
    name, age, city = f"{first} {last}", rng.randint(18, 89), rng.choice(CITIES)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence},
                         {"role": "assistant", "content": answer}]}


def make_examples(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Chat records (OpenAI ``messages``) for training and held-out testing; test people are unseen."""
    rng = random.Random(seed)
    people = [(f, l) for f in FIRST for l in LAST]
    rng.shuffle(people)
    cut = len(people) // 5
    test_people, train_people = people[:cut], people[cut:]
    train = [_record(rng, train_people) for _ in range(n_train)]
    test = [_record(rng, test_people) for _ in range(n_test)]
    return train, test


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 32) -> str:
    import torch

    from deltatune.train.chat import prompt_ids

    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(args: DemoArgs) -> int:
    """Run the demo; prints exact match before and after and where the results are. Returns 0 on success."""
    import torch

    from deltatune.hub import ModelLoadError, load_model, smollm2_path
    from deltatune.train import DataArgs, TrainArgs, evaluate, load_dataset, method_config, train

    t0 = time.perf_counter()
    out = Path(args.output)
    if out.exists():
        if not (out / "demo.json").exists():
            print(f"deltatune demo: {out} exists and is not a demo output; pass another --output")
            return 2
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    train_rows, test_rows = make_examples(args.train_examples, args.test_examples, args.seed)
    _write_jsonl(out / "data" / "train.jsonl", train_rows)
    _write_jsonl(out / "data" / "test.jsonl", test_rows)

    try:
        gguf = smollm2_path()
        print(f"loading SmolLM2-135M-Instruct from {gguf} ...", flush=True)
        model, tok = load_model(gguf)
    except ModelLoadError as e:
        print(f"deltatune demo: {e}")
        return 2
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    train_ds = load_dataset(out / "data" / "train.jsonl", tok, max_length=128)
    test_ds = load_dataset(out / "data" / "test.jsonl", tok, max_length=128)
    print(f"model loaded in {time.perf_counter() - t0:.0f} s; task: answer a sentence about a person with "
          f"one line of JSON in a fixed format ({len(train_ds)} training, {len(test_ds)} held-out examples)")
    example = test_rows[0]["messages"]
    print(f"  example input : {example[1]['content']}\n  expected      : {example[2]['content']}")

    before = evaluate(model, test_ds, batch_size=25)
    print(f"  base model says: {_greedy(model, tok, example[:2])!r}")
    print(f"held-out exact match before training: {before['exact_match']:.0%}", flush=True)

    targs = TrainArgs(model=gguf, output=str(out), max_steps=args.steps, micro_batch=args.micro_batch, lr=args.lr,
                      warmup_steps=max(args.steps // 10, 1), save_every=0, keep=1, seed=args.seed, device=args.device,
                      progress=args.progress)
    # one example a row, as the documented demo result was measured (a few hundred short chats)
    data = DataArgs(data=str(out / "data" / "train.jsonl"), val_data=str(out / "data" / "test.jsonl"), max_length=128,
                    packing=False)
    lora = method_config("lora", r=args.r, alpha=2.0 * args.r)
    (out / "demo.json").write_text(json.dumps({"demo": "deltatune", "args": vars(args)}, indent=1))
    result = train(targs, data, lora, model=model, tokenizer=tok, train_data=train_ds, val_data=test_ds)
    after = result.eval.get("exact_match", 0.0)
    print(f"  tuned model says: {_greedy(model, tok, example[:2])!r}")
    print(f"held-out exact match after {args.steps} LoRA steps: {after:.0%} (before: {before['exact_match']:.0%})")
    print(f"adapter (PEFT format): {result.adapter}\nloss curve: {out / 'loss.png'}\nmetrics: {out / 'metrics.jsonl'}")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    (out / "demo.json").write_text(json.dumps({"demo": "deltatune", "args": vars(args), "exact_match_before":
                                               before["exact_match"], "exact_match_after": after,
                                               "seconds": time.perf_counter() - t0}, indent=1))
    return 0 if after > 0.5 else 1
