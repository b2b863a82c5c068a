"""The serving engine: requests in, tokens out, many adapters on one base model in every batch.

    from deltatune.serve import Engine

    eng = Engine(model, tokenizer)                     # or Engine.from_pretrained("dir" or "file.gguf")
    eng.add_adapter("sql", "runs/sql/adapter")
    outs = eng.generate(["prompt a", "prompt b"], adapters=["sql", None], max_new_tokens=32)
    outs[0].text, outs[0].token_ids
    for piece in eng.stream("Once upon", temperature=0.8, seed=1): print(piece, end="")
    eng.chat([{"role": "user", "content": "Hi"}]).text

One ``step()`` asks the scheduler for a batch (prefill chunks and decode tokens of any requests, each
with its own adapter or none), runs it through the model runner over the paged KV cache, samples
each finished row with its request's settings and ends the requests that stop. ``generate``,
``stream`` and ``chat`` are loops over ``step()``; requests added meanwhile (``add_request``) share
the steps. Adapters are routed per token by ``deltatune.adapters.routed``, or by an adapter pool
(``pool=``, its ``routed`` and ``register``) when one is given.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from deltatune.serve.beam import BeamGroup
from deltatune.serve.decode_graphs import DecodeGraphs, default_on, table_width
from deltatune.serve.decode_graphs import planned_bytes as planned_graph_bytes
from deltatune.serve.kv_cache import bytes_per_block, plan_num_blocks
from deltatune.serve.model_runner import ModelRunner
from deltatune.serve.sampling import Sampler, SamplingParams
from deltatune.serve.scheduler import RequestRefused, Scheduler, Sequence

__all__ = ["Engine", "GenerationOutput", "RequestRefused"]

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def _adapter_config(path) -> dict:
    """The adapter directory's ``adapter_config.json`` as a dict, or {} (a missing or unreadable config is left to
    the adapter's own loader to report)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class GenerationOutput:
    """A finished request."""

    request_id: int
    text: str
    """The generated text (special tokens skipped; cut before a stop string)."""
    token_ids: list[int]
    """The generated token ids (an EOS or stop token that ended it included)."""
    prompt_token_ids: list[int]
    finish_reason: str
    """"stop" (EOS, a stop token or string), "length" (max_new_tokens or the model's length), "abort"."""
    adapter: str | None = None
    latency: float = 0.0
    """Seconds from the request's arrival to its last token."""
    time_to_first_token: float = 0.0
    beams: list[tuple[list[int], float]] = field(default_factory=list)
    """Beam search: every finished hypothesis (generated token ids, score), best first (token_ids is the first)."""


class Engine:
    """Continuous-batching generation over a Llama-family model with per-request adapters.

    Args:
        model: a transformers Llama / Qwen2 / Mistral causal LM (its device and dtype are used).
        tokenizer: its tokenizer (None: prompts must be token id lists, outputs carry no text).
        max_resident_adapters: adapters held at once (without a pool, all added adapters are resident).
        pool: an adapter pool (``routed(model, rows)``, ``register(name, path)``, ``unregister(name)``);
            True: a new ``AdapterPool(model, max_resident=max_resident_adapters, max_rank=max_lora_rank)``;
            None: the plain routing (adapters loaded into the model, ``deltatune.adapters.routed``).
        max_lora_rank: with ``pool=True``, the pool's padded rank: its slots for every linear layer at this
            rank are planned beside the KV cache (larger ranks are refused at ``add_adapter``).
        num_blocks: KV-cache blocks; None: from ``gpu_memory_fraction`` (CUDA) or ``cpu_cache_bytes``, less a
            step's activations, the pool's ``planned_bytes()`` and with ``cuda_graphs`` the decode graphs'
            ``decode_graphs.planned_bytes`` (``memory_plan`` records the sums).
        gpu_memory_fraction: share of the GPU's memory that weights, adapters and the cache may take.
        block_size: tokens per KV block.
        max_num_batched_tokens: tokens computed per step (prefill chunks plus decode tokens).
        max_num_seqs: requests running at once.
        max_model_len: tokens a sequence may reach; default: the config's max_position_embeddings.
        seed: seeds the generators of sampled requests that give no seed.
        cuda_graphs: replay decode-only steps from CUDA graphs per batch-size bucket, at one block-table
            width (``max_model_len``'s blocks; ``serve.decode_graphs``); None (default): on when the model is
            on a CUDA device (``decode_graphs.default_on``), off elsewhere.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_resident_adapters: int = 64, pool=None,
                 max_lora_rank: int | None = None, num_blocks: int | None = None, gpu_memory_fraction: float = 0.9, cpu_cache_bytes: int = 1 << 30,
                 block_size: int = 16, max_num_batched_tokens: int = 512, max_num_seqs: int = 256,
                 max_model_len: int | None = None, seed: int | None = None, cuda_graphs: bool | None = None):
        from deltatune.adapters.routing import routed

        if max_lora_rank is not None and pool is not True:
            raise ValueError("max_lora_rank sets the rank of the pool the engine makes (pool=True); give an "
                             "AdapterPool of your own its max_rank instead")
        if pool is True:
            from deltatune.serve.pool import AdapterPool

            pool = AdapterPool(model, max_resident=max_resident_adapters, max_rank=max_lora_rank)
        self.model, self.tokenizer, self.pool = model.eval(), tokenizer, pool
        self.max_resident_adapters = max_resident_adapters
        self.runner = ModelRunner(model, pool.routed if pool is not None else routed)
        r = self.runner
        max_len = max_model_len or getattr(model.config, "max_position_embeddings", None)
        cuda_graphs = default_on(r.device, max_len, num_blocks) if cuda_graphs is None else cuda_graphs
        per_block = bytes_per_block(r.num_layers, r.num_kv_heads, r.head_dim, block_size, r.dtype)
        hidden = model.config.hidden_size
        # a step's activations: projections of max_num_batched_tokens tokens, logits of max_num_seqs rows
        reserve = 4 * max_num_batched_tokens * (6 * hidden + 3 * getattr(model.config, "intermediate_size", 4 * hidden))
        reserve += 4 * max_num_seqs * model.config.vocab_size + (256 << 20)
        # the pool's slots, allocated on first use, share the budget (on a GPU, slots already allocated are
        # in memory_reserved: only the rest is set aside)
        adapters = pool.planned_bytes() if hasattr(pool, "planned_bytes") else 0
        if adapters and r.device.type == "cuda":
            adapters = max(0, adapters - pool.resident_bytes())
        # decode graphs: their logits, static inputs and private pool (decode_graphs.planned_bytes: an estimate)
        graphs = 0
        if cuda_graphs and num_blocks is None:
            graphs = planned_graph_bytes(r, max_num_seqs, table_width(max_len, block_size), block_size)
        if num_blocks is not None:
            reserve = adapters = 0
        blocks = plan_num_blocks(per_block, r.device, num_blocks, gpu_memory_fraction, cpu_cache_bytes,
                                 reserve_bytes=reserve, adapter_bytes=adapters, graph_bytes=graphs)
        # what the KV cache was sized from (bytes; activations, pool and graphs 0 when num_blocks was given)
        self.memory_plan = {"bytes_per_block": per_block, "num_blocks": blocks, "activation_bytes": reserve,
                            "adapter_pool_bytes": adapters, "decode_graph_bytes": graphs,
                            "cache_bytes": blocks * per_block}
        self.cache = r.new_cache(blocks, block_size)
        # decode steps replayed from CUDA graphs (serve.decode_graphs)
        self.graphs = DecodeGraphs(r, self.cache, pool, max_num_seqs, max_len) if cuda_graphs else None
        capacity = (lambda: pool.capacity) if hasattr(pool, "capacity") else None  # a batch fits the pool's slots
        # loads ahead of admission (AdapterPool.prefetch/ready): a request joins a step once its adapter is in
        # its slot, so no step of the running requests waits for a host-to-device copy of another's adapter
        self._prefetch = getattr(pool, "prefetch", None) if hasattr(pool, "ready") else None
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens, max_num_seqs, max_len, max_adapters=capacity,
                                   adapter_ready=pool.ready if self._prefetch is not None else None)
        self.sampler = Sampler(seed)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._adapters: dict[str, str] = {}
        self._virtual = None  # prompt-method adapters (serve.virtual_prompts.VirtualPrompts), once one is added
        self._seqs: dict[int, Sequence] = {}  # requests, by id
        self._groups: dict[int, BeamGroup] = {}  # beam-search requests' groups, by request id
        self._beam_of: dict[int, BeamGroup] = {}  # the group of each running beam, by its sequence id
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "auto", device: str = "auto", **kwargs) -> "Engine":
        """An engine over model ``path`` (HF directory, .gguf file or hub id) and its tokenizer.

        ``dtype`` "auto": bfloat16 on a GPU that has it, float32 elsewhere; ``device`` "auto": CUDA if
        present. ``kwargs`` go to ``Engine``."""
        from deltatune.hub import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        model, tok = load_model(path, dtype=dtype)
        return cls(model.to(device), tok, **kwargs)

    # -- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        """Make the adapter directory ``path`` (PEFT format) servable as ``name``.
        Raises ValueError for a name in use or too many adapters, AdapterFileError for a bad file."""
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already added (from {self._adapters[name]})")
        from deltatune.serve.virtual_prompts import PROMPT_METHODS

        config = _adapter_config(path)
        if config.get("deltatune_method") == "block_expansion":
            raise ValueError(f"{path}: a block-expansion adapter adds decoder layers, which the engine's KV cache and "
                             f"runner were built without; merge it (deltatune merge) and serve the merged model")
        if config.get("peft_type") in PROMPT_METHODS:  # prompt / P- / prefix tuning: virtual tokens, not weights
            self._add_virtual(name, path)
        elif self.pool is not None:
            self.pool.register(name, path)
        else:
            if len(self._adapters) >= self.max_resident_adapters:
                raise ValueError(f"max_resident_adapters={self.max_resident_adapters} adapters are added; remove "
                                 f"one first, or serve through an adapter pool (pool=) to register more")
            from deltatune.formats.files import load_adapter

            load_adapter(self.model, path, name)
        self._adapters[name] = str(path)

    def _add_virtual(self, name: str, path) -> None:
        """Serve the prompt-method adapter at ``path`` as ``name``: its virtual tokens computed once (a P-tuning
        encoder runs here), prepended as virtual ids to each request that names it (``serve.virtual_prompts``)."""
        from deltatune.adapters import virtual_tokens
        from deltatune.adapters.surgery import remove_adapter
        from deltatune.formats.files import load_adapter
        from deltatune.serve.virtual_prompts import VirtualPrompts

        r = self.runner
        if self._virtual is None:
            self._virtual = VirtualPrompts(r.head.weight.shape[0], self.model.config.hidden_size, r.num_layers,
                                           r.num_kv_heads, r.head_dim, r.device, r.dtype)
        load_adapter(self.model, path, name, activate=False)  # checks the files; the model gets the encoder
        try:
            self._virtual.add(name, virtual_tokens(self.model).encoders[name])
        finally:
            remove_adapter(self.model, name)  # the engine feeds the tokens itself; the model is left as it was
        r.virtual = self._virtual

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``; raises KeyError if unknown, ValueError while requests use it."""
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r} (added: {sorted(self._adapters)})")
        busy = [s.seq_id for s in self._seqs.values() if name in (s.adapter, s.virtual) and s.status != "finished"]
        if busy:
            raise ValueError(f"adapter {name!r} is in use by requests {busy}; wait for them or abort them")
        if self._virtual is not None and name in self._virtual:
            self._virtual.remove(name)
        elif self.pool is not None:
            (getattr(self.pool, "unregister", None) or self.pool.remove)(name)
        else:
            from deltatune.adapters.surgery import remove_adapter

            remove_adapter(self.model, name)
        del self._adapters[name]

    def adapters(self) -> list[str]:
        """Names of the adapters added."""
        return list(self._adapters)

    # -- requests ----------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], adapter: str | None = None,
                    params: SamplingParams | None = None, **sampling) -> int:
        """Queue one request; returns its id. ``sampling``: SamplingParams fields (if ``params`` is None).
        Raises RequestRefused (a ValueError) for a request that can never fit, KeyError for an unknown adapter."""
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(f"no adapter named {adapter!r} (added: {sorted(self._adapters)})")
        unknown = set(sampling) - _PARAM_NAMES
        if unknown:
            raise TypeError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(_PARAM_NAMES)}")
        params = params or SamplingParams(**sampling)
        if self._virtual is not None and adapter in self._virtual:  # its virtual tokens first; base weights
            seq = Sequence(next(self._ids), self._virtual.ids(adapter) + self._encode(prompt), params, None,
                           virtual=adapter)
        else:
            seq = Sequence(next(self._ids), self._encode(prompt), params, adapter)
        if params.use_beam_search:
            return self._add_beam_request(seq)
        seq.generator = self.sampler.generator(params, self.runner.device)
        self.scheduler.add(seq)
        self._seqs[seq.seq_id] = seq
        return seq.seq_id

    def _add_beam_request(self, request: Sequence) -> int:
        """Queue a beam-search request: its first beam is scheduled, the request itself only reports."""
        first = Sequence(next(self._ids), request.prompt_ids, request.params, request.adapter)
        self.scheduler.add(first)  # RequestRefused for what could never fit
        p = request.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        room = self.scheduler.max_model_len - len(request.prompt_ids)
        group = BeamGroup(request, stops, min(p.max_new_tokens, room), beams=[first], scores=[0.0])
        request.status = "running"
        self._seqs[request.seq_id], self._groups[request.seq_id] = request, group
        self._beam_of[first.seq_id] = group
        return request.seq_id

    def abort(self, request_id: int) -> None:
        """End a request now (its blocks are freed; finish reason "abort")."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status == "finished":
            return
        group = self._groups.get(request_id)
        if group is None:
            self.scheduler.finish(seq, "abort")
            return
        self._end_beams(group)
        seq.status, seq.finish_reason, seq.finish_time = "finished", "abort", time.perf_counter()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _prefetch_waiting(self) -> None:
        """Start loading the adapters of the requests next in the queue (as many as the pool's slots not held by
        running requests; at most ``max_num_seqs`` requests looked at), keeping the running requests' adapters."""
        sched = self.scheduler
        running = {s.adapter for s in sched.running if s.adapter is not None}
        room = getattr(self.pool, "capacity", sched.max_num_seqs) - len(running)
        wanted = []
        for seq in itertools.islice(sched.waiting, sched.max_num_seqs):
            if len(wanted) >= room:
                break
            if seq.adapter is not None and seq.adapter not in running and seq.adapter not in wanted:
                wanted.append(seq.adapter)
        if wanted:
            self._prefetch(wanted, keep=running)

    def step(self) -> list[Sequence]:
        """Run one batch; returns the sequences that got a token (finished ones included)."""
        if self._prefetch is not None and self.scheduler.waiting:
            self._prefetch_waiting()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = (self.graphs or self.runner).forward(chunks, self.cache)
        done, rows, beams = [], [], []
        for c in chunks:
            group = self._beam_of.get(c.seq_id)
            seq = self._seqs[c.seq_id] if group is None else next(b for b in group.beams if b.seq_id == c.seq_id)
            seq.num_computed += len(c.token_ids)
            if c.want_logits:
                (done if group is None else beams).append(seq)
                rows.append(group is None)
        if beams:
            picked = torch.tensor(rows, device=logits.device)
            beam_logits, logits = logits[~picked], logits[picked]
        tokens = self.sampler(logits, [s.params for s in done], [s.prompt_ids for s in done],
                              [s.output_ids for s in done], [s.generator for s in done])
        for seq, token in zip(done, tokens):
            self._append(seq, token)
        for seq, row in zip(beams, beam_logits if beams else ()):
            group = self._beam_of[seq.seq_id]
            if group.receive(seq, row):
                self._advance(group)
                done.append(group.request)
        return done

    def _advance(self, group: BeamGroup) -> None:
        """One beam-search step of ``group``: fork, extend and drop beams, or end the request."""
        nxt = group.advance()
        request = group.request
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        if nxt is None:
            self._end_beams(group)
            best = group.finished[0][1]
            request.output_ids = list(best)
            if self.tokenizer is not None:
                request.text = self.tokenizer.decode(best, skip_special_tokens=True)
            reason = "stop" if best and best[-1] in group.stop_ids else "length"
            request.status, request.finish_reason, request.finish_time = "finished", reason, time.perf_counter()
            return
        parents, children = group.beams, {p for p, _ in nxt}
        for i, beam in enumerate(parents):  # beams with no continuation first: their blocks free up
            if i not in children:
                self._drop_beam(beam)
        beams, taken = [], set()
        for parent, token in nxt:  # second and later children of a parent: new beams from its blocks
            if parent in taken:
                src = parents[parent]
                child = Sequence(next(self._ids), src.prompt_ids, src.params, src.adapter, list(src.output_ids))
                self.scheduler.fork(src, child)
                child.output_ids.append(token)
                self._beam_of[child.seq_id] = group
                beams.append(child)
            else:
                taken.add(parent)
                beams.append(None)  # the parent itself goes on, extended below
        for i, (parent, token) in enumerate(nxt):
            if beams[i] is None:
                beam = parents[parent]
                beam.output_ids.append(token)
                if beam.status == "parked":
                    self.scheduler.unpark(beam)
                beams[i] = beam
        group.beams = beams

    def _drop_beam(self, beam: Sequence) -> None:
        self._beam_of.pop(beam.seq_id, None)
        if beam.status != "finished":
            self.scheduler.finish(beam, "abort")

    def _end_beams(self, group: BeamGroup) -> None:
        for beam in group.beams:
            self._drop_beam(beam)
        group.beams, group.pending = [], {}

    def _append(self, seq: Sequence, token: int) -> None:
        """Add ``token`` to ``seq``'s output and end ``seq`` if it stops."""
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        p = seq.params
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            reason = "stop"
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            cuts = [i for i in (seq.text.find(s) for s in p.stop) if i >= 0]
            if cuts:
                seq.text, reason = seq.text[: min(cuts)], "stop"
        if reason is None and (len(seq.output_ids) >= p.max_new_tokens
                               or seq.num_tokens >= self.scheduler.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def output(self, request_id: int) -> GenerationOutput:
        """The result of request ``request_id`` (finished or not) so far."""
        s = self._seqs[request_id]
        end = s.finish_time or s.arrival
        group = self._groups.get(request_id)
        vocab = self.runner.head.weight.shape[0]  # a prompt's virtual tokens are no token ids of the model
        return GenerationOutput(s.seq_id, s.text, list(s.output_ids), [t for t in s.prompt_ids if t < vocab],
                                s.finish_reason or "", s.adapter or s.virtual, max(0.0, end - s.arrival),
                                max(0.0, (s.first_token_time or s.arrival) - s.arrival),
                                [(list(t), score) for score, t in group.finished] if group is not None else [])

    def pop_output(self, request_id: int) -> GenerationOutput:
        """The result of a finished request, forgotten by the engine afterwards."""
        out = self.output(request_id)
        del self._seqs[request_id]
        self._groups.pop(request_id, None)
        return out

    # -- the loops -------------------------------------------------------------------------------------
    def generate(self, prompts: str | list, adapters: str | list | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None, **sampling) -> list[GenerationOutput]:
        """Generate for every prompt (text or token ids), each with ``adapters[i]`` (a name or None;
        one name or None for all) and ``params`` (one or one per prompt) or the ``sampling`` fields.
        Returns one GenerationOutput per prompt, in order."""
        prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        adapters = adapters if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(adapters) != len(prompts) or len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(adapters)} adapters, {len(params)} params: give one each")
        ids = []
        try:
            for prompt, adapter, p in zip(prompts, adapters, params):
                ids.append(self.add_request(prompt, adapter, p, **sampling))
            while any(self._seqs[i].status != "finished" for i in ids):
                self.step()
        except BaseException:
            for i in ids:
                self.abort(i)
            raise
        return [self.pop_output(i) for i in ids]

    def stream(self, prompt: str | list[int], adapter: str | None = None, params: SamplingParams | None = None,
               **sampling) -> Iterator[str]:
        """Generate for one prompt, yielding the text as it grows (pieces; no piece of a stop string).
        Closing the iterator early (or Ctrl-C) aborts the request."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        rid = self.add_request(prompt, adapter, params, **sampling)
        seq, sent = self._seqs[rid], 0
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        try:
            while seq.status != "finished":
                self.step()
                final = seq.text if seq.status == "finished" else seq.text[: max(sent, len(seq.text) - hold)]
                final = final.rstrip("\ufffd") if seq.status != "finished" else final  # half a character
                if len(final) > sent:
                    yield final[sent:]
                    sent = len(final)
        finally:
            self.abort(rid)
            self._seqs.pop(rid, None)
            self._groups.pop(rid, None)

    def chat(self, messages: list[dict], adapter: str | None = None, stream: bool = False, **sampling):
        """Answer a conversation (``[{"role": ..., "content": ...}, ...]``) through the tokenizer's chat
        template. Returns a GenerationOutput, or with ``stream=True`` an iterator of text pieces."""
        ids = self.chat_prompt(messages)
        return self.stream(ids, adapter, **sampling) if stream else self.generate([ids], [adapter], **sampling)[0]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` through the chat template, ending where the assistant speaks."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use generate() with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give Engine a tokenizer")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        return ids


def _eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
    found = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None) if not hasattr(model, "generation_config") else None,
                  getattr(tokenizer, "eos_token_id", None)):
        found |= set(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return found
