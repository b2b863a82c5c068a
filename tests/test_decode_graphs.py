"""Decode steps through static, padded inputs (serve.decode_graphs): the tokens equal the plain engine's.

On the CPU the static path runs without capturing (``capture=False``): what a graph records is exactly this
path, so these tests pin its inputs (padding rows, scratch block, one block-table width for every step, the
pool's forced gathered routing), and with DELTATUNE_DECODE_GRAPH_WIDTH=bucketed a graph per width bucket.
The GPU test captures and replays."""

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine
from deltatune.serve.decode_graphs import rows_bucket

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def adapters(model, root, n=3):
    paths = []
    for i in range(n):
        m = tiny(model.device, model.dtype)
        torch.manual_seed(10 + i)
        dt.add_adapter(m, dt.LoraConfig(r=2 + 2 * i, alpha=4, targets=TARGETS, init="random"))
        path = root / f"a{i}"
        dt.save_adapter(m, path)
        paths.append(path)
    return paths


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engines(tmp_path, device="cpu", dtype=torch.float32, capture=False, pool=True):
    model = tiny(device, dtype)
    out = []
    for graphs in (False, True):
        eng = Engine(model, None, pool=pool or None, max_resident_adapters=2, num_blocks=64, max_num_seqs=16,
                     cuda_graphs=graphs)
        if graphs:
            eng.graphs.capture = capture
        if pool:
            for i, path in enumerate(adapters(model, tmp_path)):
                eng.add_adapter(f"a{i}", str(path))
        out.append(eng)
    return out


def widths_seen(graphs):
    """Record the longest block table of every static step of ``graphs`` (a list, filled as steps run)."""
    seen, fill = [], graphs._fill
    graphs._fill = lambda g, chunks, cache: seen.append(max(len(cache.tables[c.seq_id]) for c in chunks)) or \
        fill(g, chunks, cache)
    return seen


def test_rows_bucket():
    assert [rows_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("mode", ["one", "bucketed"])
def test_static_decode_steps_give_the_plain_engines_tokens(tmp_path, monkeypatch, mode):
    """Mixed adapters (more than the pool's slots over the run, so adapters are evicted and reloaded) and base
    rows; rows that are not a power of two (padding); contexts over several blocks; graphs at one table width
    or (DELTATUNE_DECODE_GRAPH_WIDTH=bucketed) one per width bucket."""
    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", mode)
    plain, static = engines(tmp_path)
    seen = widths_seen(static.graphs)
    ps = prompts(7)
    names = ["a0", None, "a1", "a2", None, "a0", "a1"]
    want = plain.generate(ps, adapters=names, max_new_tokens=40, temperature=0.0, ignore_eos=True)
    got = static.generate(ps, adapters=names, max_new_tokens=40, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    keys = set(static.graphs.graphs)
    # the pool holds 2 of the 3 adapters, so at most 2 adapters' rows run together (with the base rows; a request
    # for the third waits while later ones for the running two pass it): buckets of 1 and 4 or 8 rows (padded),
    # steps with pooled adapters; tables of 1 to 5 blocks
    assert {k[0] for k in keys} & {4, 8} and True in {k[-1] for k in keys}
    assert len(set(seen)) >= 3 and max(seen) < static.graphs.width
    assert static.graphs.width == 256 // 16  # max_position_embeddings' blocks (fewer than the cache's 64)
    if mode == "one":  # all at the one width
        assert all(len(k) == 2 for k in keys)
        assert all(g.ints.shape == (g.rows, 1 + static.graphs.width) for g in static.graphs.graphs.values())
    else:  # a graph per width bucket, each as wide as its bucket
        assert {k[1] for k in keys} == {1 << (w - 1).bit_length() for w in seen}
        assert all(g.ints.shape == (k[0], 1 + k[1]) for k, g in static.graphs.graphs.items())


def test_one_bucket_per_row_count_whatever_the_table_width(tmp_path):
    """One sequence decoding over 1 to 5 blocks: one graph (a bucket per width before); then a short one
    through the same graph, whose table columns past its one block still hold the long one's block ids."""
    plain, static = engines(tmp_path, pool=False)
    seen = widths_seen(static.graphs)
    for prompt, new in (([5, 6, 7], 70), ([8, 9], 6)):
        want = plain.generate([prompt], max_new_tokens=new, temperature=0.0, ignore_eos=True)
        got = static.generate([prompt], max_new_tokens=new, temperature=0.0, ignore_eos=True)
        assert got[0].token_ids == want[0].token_ids
    assert set(static.graphs.graphs) == {(1, False)}
    assert set(seen) == {1, 2, 3, 4, 5} and seen[-1] == 1
    g = static.graphs.graphs[(1, False)]
    assert int(g.ints[0, 0]) == 2 + 6 - 1 and int(g.ints[0, 5]) != static.graphs.scratch_block  # stale, unread


def test_bucketed_graphs_per_width_and_a_bad_mode_raises(tmp_path, monkeypatch):
    """DELTATUNE_DECODE_GRAPH_WIDTH=bucketed: one sequence decoding over 1 to 5 blocks runs graphs of widths 1,
    2, 4 and 8 (the design before one width), with the plain engine's tokens; another value is refused."""
    from deltatune.serve.decode_graphs import graph_widths

    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", "bucketed")
    plain, static = engines(tmp_path, pool=False)
    want = plain.generate([[5, 6, 7]], max_new_tokens=70, temperature=0.0, ignore_eos=True)
    got = static.generate([[5, 6, 7]], max_new_tokens=70, temperature=0.0, ignore_eos=True)
    assert got[0].token_ids == want[0].token_ids
    assert set(static.graphs.graphs) == {(1, w, False) for w in (1, 2, 4, 8)}
    assert graph_widths(16, "bucketed") == [1, 2, 4, 8, 16] and graph_widths(17, "bucketed")[-1] == 32
    assert graph_widths(17, "one") == [17]
    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", "wide")
    with pytest.raises(ValueError, match="DELTATUNE_DECODE_GRAPH_WIDTH"):
        engines(tmp_path, pool=False)


def _larger_rank_after_capture(tmp_path, device="cpu", capture=False):
    """Steps with pooled adapters, then an adapter of a larger rank registered: the pool drops its slots for
    larger ones (``generation``), so the pooled graphs, which read the old slots' addresses, are captured again;
    the tokens stay the plain engine's."""
    plain, graphed = engines(tmp_path, device, torch.float32, capture=capture)
    ps, names = prompts(3, seed=3), ["a0", None, "a1"]
    for eng in (plain, graphed):
        eng.generate(ps, adapters=names, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    before = {k: g for k, g in graphed.graphs.graphs.items() if k[-1]}
    assert before
    model = tiny(device)
    torch.manual_seed(42)
    dt.add_adapter(model, dt.LoraConfig(r=12, alpha=8, targets=TARGETS, init="random"))
    dt.save_adapter(model, tmp_path / "big")
    generation = graphed.pool.generation
    for eng in (plain, graphed):
        eng.add_adapter("big", str(tmp_path / "big"))
    assert graphed.pool.generation == generation + 1
    names = ["big", "a0", None]
    want = plain.generate(ps, adapters=names, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    got = graphed.generate(ps, adapters=names, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    after = {k: g for k, g in graphed.graphs.graphs.items() if k[-1]}
    assert after and all(after[k] is not before.get(k) for k in after)  # captured anew
    return graphed


def test_pooled_graphs_are_captured_again_after_the_pool_reallocates(tmp_path):
    _larger_rank_after_capture(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_gpu_pooled_graphs_are_captured_again_after_the_pool_reallocates(tmp_path):
    graphed = _larger_rank_after_capture(tmp_path, "cuda", capture=True)
    assert graphed.graphs.off is None


def test_table_width_is_the_longest_sequence_within_the_cache():
    from deltatune.serve.decode_graphs import table_width

    assert table_width(256, 16) == 16 and table_width(257, 16) == 17 and table_width(1, 16) == 1
    assert table_width(256, 16, num_blocks=10) == 9  # the scratch block is no sequence's
    assert table_width(None, 16, num_blocks=10) == 9
    with pytest.raises(ValueError, match="max_model_len"):
        table_width(None, 16)


def test_graphs_are_on_by_default_on_cuda_only():
    """Engine(cuda_graphs=None): graphs where the model is on a CUDA device and the graphs' width is known."""
    from deltatune.serve.decode_graphs import default_on

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert default_on(cuda, 2048) and default_on(cuda, None, num_blocks=64)
    assert not default_on(cuda, None) and not default_on(cpu, 2048)
    model = tiny()
    assert Engine(model, None, num_blocks=32).graphs is None  # CPU: the plain path
    assert Engine(model, None, num_blocks=32, cuda_graphs=True).graphs is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_graphs_decode_by_default():
    eng = Engine(tiny("cuda"), None, num_blocks=32)
    assert eng.graphs is not None and eng.memory_plan["decode_graph_bytes"] == 0  # num_blocks given: no plan
    assert Engine(tiny("cuda"), None, num_blocks=32, cuda_graphs=False).graphs is None


def test_a_step_with_a_virtual_token_is_not_graphed(tmp_path):
    """A prompt-method adapter's virtual ids lie past the vocabulary: a one-token chunk holding one (a prompt of
    virtual tokens alone, cut by chunked prefill) runs the plain path, which embeds it."""
    from types import SimpleNamespace

    from deltatune.serve.model_runner import Chunk

    _, static = engines(tmp_path, pool=False)
    static.cache.reserve(7, 1)
    chunk = Chunk(seq_id=7, token_ids=[97 + 2], start=0)
    assert static.graphs.applies([Chunk(seq_id=7, token_ids=[5], start=0)])
    static.runner.virtual = SimpleNamespace(vocab_size=97)
    assert not static.graphs.applies([chunk])
    assert static.graphs.applies([Chunk(seq_id=7, token_ids=[5], start=0)])


def test_steps_that_are_not_decode_only_run_the_plain_path(tmp_path):
    _, static = engines(tmp_path)
    calls = []
    real = static.graphs._compute
    static.graphs._compute = lambda g: calls.append(g.rows) or real(g)
    static.generate(prompts(1), max_new_tokens=1, temperature=0.0)  # one prefill step, no decode step
    assert calls == []
    static.generate(prompts(3), max_new_tokens=3, temperature=0.0, ignore_eos=True)
    assert calls and all(r == 4 for r in calls)


def test_a_model_with_its_own_adapters_is_not_graphed(tmp_path):
    """Without a pool the engine loads adapters into the model (routed by the PyTorch reference, whose
    shapes follow the rows): decode steps with them run the plain path; the tokens are the plain engine's."""
    model = tiny()
    path = adapters(model, tmp_path, n=1)[0]
    outs = []
    for graphs in (False, True):
        eng = Engine(model, None, num_blocks=32, cuda_graphs=graphs)
        if graphs:
            eng.graphs.capture = False
        eng.add_adapter("own", str(path))
        outs.append(eng.generate(prompts(2), adapters=["own", None], max_new_tokens=3, temperature=0.0))
        if graphs:
            assert eng.graphs.graphs == {}
        eng.remove_adapter("own")
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("mode", ["one", "bucketed"])
def test_gpu_graphed_decode_equals_the_plain_engine(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", mode)
    plain, graphed = engines(tmp_path, "cuda", torch.float32, capture=True)
    ps = prompts(11, seed=1)
    names = ["a0", None, "a1", "a2", None, "a0", "a1", "a2", "a2", None, "a0"]
    want = plain.generate(ps, adapters=names, max_new_tokens=48, temperature=0.0, ignore_eos=True)
    got = graphed.generate(ps, adapters=names, max_new_tokens=48, temperature=0.0, ignore_eos=True)
    assert graphed.graphs.off is None and graphed.graphs.graphs
    assert all(g.graph is not None for g in graphed.graphs.graphs.values())
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # again, now replaying the graphs captured above with other rows and adapters
    ps2, names2 = prompts(5, seed=2), [None, "a2", "a1", "a0", "a2"]
    want = plain.generate(ps2, adapters=names2, max_new_tokens=30, temperature=0.0, ignore_eos=True)
    got = graphed.generate(ps2, adapters=names2, max_new_tokens=30, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_the_scratch_block_is_no_requests(tmp_path):
    """With graphs the cache holds one block for padding rows for good: a request that fits the whole cache but
    not the blocks left is refused at once, with the number a request can use, instead of waiting forever."""
    from deltatune.serve.scheduler import RequestRefused

    model = tiny()
    for graphs in (False, True):
        eng = Engine(model, None, num_blocks=4, block_size=16, max_model_len=256, cuda_graphs=graphs)
        if graphs:
            eng.graphs.capture = False
        assert eng.cache.usable_blocks == (3 if graphs else 4) and eng.cache.held == (1 if graphs else 0)
        prompt = list(range(1, 41))  # 40 prompt + 24 new tokens = 64 tokens: 4 blocks of 16
        if graphs:
            with pytest.raises(RequestRefused, match="the cache holds 3 blocks for requests"):
                eng.generate([prompt], max_new_tokens=24, temperature=0.0, ignore_eos=True)
        else:
            out = eng.generate([prompt], max_new_tokens=24, temperature=0.0, ignore_eos=True)
            assert len(out[0].token_ids) == 24
        out = eng.generate([prompt], max_new_tokens=8, temperature=0.0, ignore_eos=True)  # 3 blocks: fits
        assert len(out[0].token_ids) == 8
