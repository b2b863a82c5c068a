"""Issue 18, many adapters: what registering and loading one costs on the host, and that loads happen before a
request joins a step, not inside the steps of the requests already running.

Counted, not timed: aten calls a load makes, pinned/host blocks made, pool loads inside a step's forward,
Python calls a step makes with 8 or 200 adapters registered. Exactness of the pool after loads that shrink a
slot's rank: against the merged single-adapter models, as in test_serve_pool.py.
"""

import collections
import copy
import gc
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.serve import AdapterPool, Engine
from deltatune.serve.scheduler import Scheduler, Sequence
from deltatune.serve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
import _models  # noqa: E402

TOL = 1e-4


def _base():
    torch.manual_seed(0)
    model = _models.llama().eval()
    model.generation_config.eos_token_id = None
    return model


def _save(base, path, seed, r):
    torch.manual_seed(seed)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(r=r, alpha=2 * r, init="random", targets="all-linear"))
    dt.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loads")
    base = _base()
    return base, {r: _save(base, root / f"r{r}", r, r) for r in (16, 4, 8)}


class _Ops(TorchDispatchMode):
    """Counts the aten calls that do device work (copies, fills), views left out."""

    WORK = ("copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_", "index_put_")

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.WORK:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_a_load_is_a_few_batched_calls_whatever_the_layers_and_stays_exact(files):
    """A load used to make 4-6 calls per target layer (A, B, scale, rank, two pads); now a batched copy of the
    factors, one copy for all the layers' scales, one for their ranks, and one batched clear of a past
    occupant's rows beyond the new rank. A rank-16 adapter replaced by a rank-4 one in the same slot adds
    exactly the rank-4 adapter's terms (the rows 4..16 were cleared)."""
    base, paths = files
    pool = AdapterPool(base, max_resident=1)
    for r, path in paths.items():
        pool.register(f"r{r}", path)
    layers = len(pool._shapes)
    assert layers == 14  # 2 decoder layers x 7 projections
    pool.make_resident(["r16"])
    with _Ops() as ops:
        pool.make_resident(["r4"])  # evicts r16 from the one slot
    assert sum(ops.calls.values()) <= 4, ops.calls
    assert ops.calls["_foreach_copy_"] == 1 and ops.calls["_foreach_zero_"] == 1
    ids = torch.randint(3, _models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with pool.routed(base, ["r4", None]):
        out = _models.output(base, {"input_ids": ids})
    merged = copy.deepcopy(base)
    dt.load_adapter(merged, paths[4], "r4")
    dt.merge(merged, "r4")
    want = torch.cat([_models.output(merged, {"input_ids": ids[:1]}), _models.output(base, {"input_ids": ids[1:]})])
    assert (out - want).abs().max() <= TOL
    assert pool.loads == 2


def test_adapters_are_packed_one_buffer_each_in_shared_host_blocks(files, tmp_path, monkeypatch):
    """Every factor of an adapter is a view of one flat buffer; 30 adapters share one host block (one pinned
    allocation on a GPU, where each factor used to be its own: 28 here, 224 for a 1B Llama); targets are
    resolved once per distinct config (3 here, not 30); a bad file refused after packing gives its space back."""
    from deltatune.formats.files import AdapterFileError
    from deltatune.serve import pool_host

    base, paths = files
    pool = AdapterPool(base, max_resident=2)
    resolved = []
    select = pool_host.select_targets
    monkeypatch.setattr(pool_host, "select_targets", lambda *a, **k: resolved.append(1) or select(*a, **k))
    for i in range(30):
        pool.register(f"a{i}", paths[(4, 8, 16)[i % 3]])
    assert len(resolved) == 3
    flats = [pool._adapters[f"a{i}"].flat for i in range(30)]
    for i, flat in enumerate(flats):
        inside = [t for f in pool._adapters[f"a{i}"].layers.values() for t in (f.A, f.B)]
        assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in inside)
        assert sum(t.numel() for t in inside) == flat.numel()
    assert len({f.untyped_storage().data_ptr() for f in flats}) == 1 and pool._arena.blocks_made == 1
    assert pool.host_bytes() == sum(f.nbytes for f in flats)
    used = pool._arena._used
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((paths[8] / "adapter_config.json").read_text())
    tensors = load_file(str(paths[8] / "adapter_model.safetensors"))
    tensors[key].view(-1)[5] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=f"key '{key}' holds non-finite"):
        pool.register("bad", bad)
    assert pool._arena._used == used and "bad" not in pool.names()


def test_scheduler_admits_a_request_only_once_its_adapter_has_landed():
    """``adapter_ready`` False for an adapter: its request waits, keeping its place at the head of the queue,
    while later requests whose adapters are ready go ahead of it; it joins once the adapter has landed."""
    from deltatune.serve.kv_cache import PagedKVCache

    cache = PagedKVCache(1, 1, 4, num_blocks=16, block_size=4)
    landed = {"a"}
    sched = Scheduler(cache, max_num_batched_tokens=64, adapter_ready=lambda name: name in landed)
    params = SamplingParams(max_new_tokens=4)
    sched.add(Sequence(0, [1, 2, 3], params, "a"))
    sched.add(Sequence(1, [1, 2], params, "b"))
    sched.add(Sequence(2, [4, 5], params, "a"))
    def step():
        chunks = sched.schedule()
        for c in chunks:  # what the engine does after the forward: the chunk is in the cache, a token sampled
            seq = next(s for s in sched.running if s.seq_id == c.seq_id)
            seq.num_computed += len(c.token_ids)
            seq.output_ids.append(7)
        return [(c.seq_id, len(c.token_ids)) for c in chunks]

    assert step() == [(0, 3), (2, 2)] and [s.seq_id for s in sched.waiting] == [1]
    assert step() == [(0, 1), (2, 1)]  # decode tokens; "b" still loading
    landed.add("b")
    assert step() == [(0, 1), (2, 1), (1, 2)] and not sched.waiting


def test_engine_loads_before_admission_never_inside_a_step(files):
    """Requests over more adapters than slots, joining while others run: every load happens in
    ``AdapterPool.prefetch`` before the step a request joins, none inside a step's forward (where it would
    hold up the running requests), and the tokens equal a pool without prefetch (loads inside the steps)."""
    base, paths = files
    prompts = [torch.randint(3, _models.VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 9, 4, 7, 6, 8)]
    names = ["r4", "r8", "r16", "r8", "r4", "r16"]

    def run(prefetch):
        served = copy.deepcopy(base)
        pool = AdapterPool(served, max_resident=2)
        eng = Engine(served, None, num_blocks=64, max_num_batched_tokens=16, pool=pool)
        if not prefetch:
            eng._prefetch = eng.scheduler.adapter_ready = None
        for r, path in paths.items():
            eng.add_adapter(f"r{r}", str(path))
        inside = []
        forward = eng.runner.forward

        def counted(chunks, cache):
            before = pool.loads
            out = forward(chunks, cache)
            inside.append(pool.loads - before)
            return out

        eng.runner.forward = counted
        ids = [eng.add_request(p, a, max_new_tokens=5) for p, a in zip(prompts[:3], names[:3])]
        eng.step()
        ids += [eng.add_request(p, a, max_new_tokens=5) for p, a in zip(prompts[3:], names[3:])]
        while eng.has_unfinished():
            eng.step()
        return [eng.pop_output(i).token_ids for i in ids], sum(inside), pool.loads

    tokens, inside, loads = run(prefetch=True)
    old_tokens, old_inside, _ = run(prefetch=False)
    assert inside == 0 and loads >= 3
    assert old_inside >= 3  # without prefetch every load sits in a step
    assert tokens == old_tokens


def test_host_work_of_a_step_does_not_grow_with_the_adapters_registered(files):
    """The same requests over 2 adapters with 8 or 200 registered: the Python calls of the steps are the same
    (no per-step pass over the registered adapters)."""
    base, paths = files

    def calls(registered):
        served = copy.deepcopy(base)
        eng = Engine(served, None, num_blocks=64, pool=AdapterPool(served, max_resident=4))
        for i in range(registered):
            eng.add_adapter(f"a{i}", str(paths[(4, 8)[i % 2]]))
        for n, name in ((5, "a0"), (7, "a1"), (6, "a0")):
            eng.add_request(list(range(3, 3 + n)), name, max_new_tokens=4)
        count = [0]

        def tracer(frame, event, arg):
            if event == "call":
                count[0] += 1

        gc.collect()  # no finalizers of earlier tests' garbage run (and count) inside the traced steps
        gc.disable()
        sys.setprofile(tracer)
        try:
            while eng.has_unfinished():
                eng.step()
        finally:
            sys.setprofile(None)
            gc.enable()
        return count[0]

    assert calls(8) == calls(200)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy stream of prefetch needs a CUDA GPU")
def test_prefetch_on_a_gpu_lands_on_its_stream_and_equals_a_load_in_the_step(files):
    """On a GPU: adapters prefetched on the pool's copy stream (evicting others, one of them a larger rank in
    the same slot) give the same outputs as loads made inside the routed call; ``ready`` turns true."""
    base, paths = files
    model = copy.deepcopy(base).cuda()
    ids = torch.randint(3, _models.VOCAB, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()
    rows = ["r4", "r8", None]
    outs = []
    for prefetch in (False, True):
        pool = AdapterPool(model, max_resident=2)
        for r, path in paths.items():
            pool.register(f"r{r}", path)
        pool.make_resident(["r16"])  # a rank-16 occupant first: the rank-8 adapter takes its slot
        if prefetch:
            assert pool.prefetch(["r4", "r8"]) == ["r4", "r8"]
            torch.cuda.synchronize()
            assert pool.ready("r4") and pool.ready("r8") and not pool.ready("r16")
        with pool.routed(model, rows):
            outs.append(_models.output(model, {"input_ids": ids}))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
