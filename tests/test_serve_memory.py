"""The engine's memory plan: the adapter pool's slots and the decode graphs are set aside beside the KV cache.

Oracles: a hand count of the slots (resident slots x every decoder layer's 7 projections x max rank x
(in + out) x dtype size, plus a float32 scale and an int32 rank each); the decode graphs' documented formula
counted from the config by hand; the KV-cache block count under a fake budget, on the CPU and through a faked
CUDA memory query, and what the slots really take once allocated.
"""

import math

import pytest
import torch

import deltatune as dt
from deltatune.serve import AdapterPool, Engine
from deltatune.serve.kv_cache import plan_num_blocks

transformers = pytest.importorskip("transformers")
import _models  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama():
    torch.manual_seed(0)
    return _models.llama().eval()


def _hand_count(model, slots: int, rank: int) -> int:
    """Bytes of ``slots`` slots over the 7 projections of every decoder layer at ``rank`` (fp32)."""
    total = 0
    for layer in model.model.layers:
        for name in PROJECTIONS:
            module = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            linear = getattr(module, name)
            total += rank * (linear.in_features + linear.out_features) * 4 + 4 + 4  # A, B; scale, rank
    return slots * total


def test_planned_bytes_count_every_projection_at_max_rank(tmp_path):
    model = _llama()
    pool = AdapterPool(model, max_resident=3, max_rank=8)
    assert pool.planned_bytes() == _hand_count(model, 3, 8) > 0  # before any adapter is registered
    torch.manual_seed(1)
    dt.save_adapter(dt.add_adapter(_llama(), dt.LoraConfig(r=4, targets="all-linear", init="random")), tmp_path / "a")
    dt.save_adapter(dt.add_adapter(_llama(), dt.LoraConfig(r=2, targets=["q_proj"], init="random")), tmp_path / "q")
    pool.register("q", tmp_path / "q")
    assert pool.planned_bytes() == _hand_count(model, 3, 8)  # registering changes nothing planned
    with pool.routed(model, ["q"]):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert 0 < pool.resident_bytes() < pool.planned_bytes()  # slots of q_proj only so far
    pool.register("a", tmp_path / "a")
    with pool.routed(model, ["a", "q"]):
        model(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert pool.resident_bytes() == pool.planned_bytes()  # every projection's slots: all that was planned
    # without max_rank only what is registered is known; with max_bytes the plan never passes the budget
    loose = AdapterPool(model, max_resident=3)
    assert loose.planned_bytes() == 0
    loose.register("q", tmp_path / "q")
    assert loose.planned_bytes() == 3 * loose.slot_bytes()
    capped = AdapterPool(model, max_resident=64, max_rank=8, max_bytes=_hand_count(model, 2, 8) + 10)
    assert capped.planned_bytes() == _hand_count(model, 2, 8) + 10


@pytest.mark.parametrize("slots, rank", [(4, 8), (16, 32)])
def test_kv_blocks_drop_by_the_pool_bytes_under_a_cpu_budget(slots, rank):
    model = _llama()
    plain = Engine(model, None, num_blocks=None, cpu_cache_bytes=1 << 30)
    per_block, activations = plain.memory_plan["bytes_per_block"], plain.memory_plan["activation_bytes"]
    budget = activations + 1000 * per_block  # a fake budget: exactly 1000 blocks without a pool
    plain = Engine(model, None, cpu_cache_bytes=budget)
    pooled = Engine(model, None, pool=True, max_resident_adapters=slots, max_lora_rank=rank, cpu_cache_bytes=budget)
    pool_bytes = pooled.pool.planned_bytes()
    assert pool_bytes == _hand_count(model, slots, rank) == pooled.memory_plan["adapter_pool_bytes"]
    assert plain.cache.num_blocks == 1000 and plain.memory_plan["adapter_pool_bytes"] == 0
    assert pooled.memory_plan["activation_bytes"] == activations
    assert plain.cache.num_blocks - pooled.cache.num_blocks == math.ceil(pool_bytes / per_block)
    assert pooled.cache.num_blocks * per_block + pool_bytes + activations <= budget  # all of it fits
    assert pooled.cache.keys[0].numel() * 4 * 2 * len(pooled.cache.keys) == pooled.cache.num_blocks * per_block
    assert budget < (pooled.cache.num_blocks + 1) * per_block + pool_bytes + activations  # and no block more
    # explicit num_blocks: no plan, and a budget the pool fills says so
    assert Engine(model, None, pool=True, max_lora_rank=rank, num_blocks=7).cache.num_blocks == 7
    with pytest.raises(ValueError, match="adapter-pool slots"):
        Engine(model, None, pool=True, max_resident_adapters=10**6 // rank, max_lora_rank=rank,
               cpu_cache_bytes=budget)
    with pytest.raises(ValueError, match="max_lora_rank"):
        Engine(model, None, max_lora_rank=8, num_blocks=7)


def _graphs_by_hand(cfg, rows, max_len, block_size=16, splits=None, widths=None):
    """decode_graphs.planned_bytes' formula for a float32 model on the CPU: R x V x 4 logits, then per table
    width W (``widths``; default the one width of ``max_len``) static inputs of 2 (2R - 1) rows, and per row
    bucket r = 1, 2 .. R: activations, the head's output and attention (the reference's gather at full width,
    or with ``splits(r, C)`` the kernel's split partials)."""
    H, inter, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = H // Hq
    R = 1 << (rows - 1).bit_length()
    total = R * V * 4
    for W in widths or [-(-max_len // block_size)]:
        C = W * block_size
        total += 2 * (2 * R - 1) * (3 * 8 + (1 + W) * 4)
        for r in (1 << i for i in range(R.bit_length())):
            if splits is None:
                attention = r * C * (2 * (Hkv + Hq) * D * 4 + 8 * Hq + 5)
            else:
                attention = r * Hq * splits(r, C) * (D + 2) * 4 if splits(r, C) > 1 else 0
            total += r * 4 * (6 * H + 3 * inter) + r * V * 4 + attention
    return total


@pytest.mark.parametrize("rows, max_len", [(8, 128), (5, 1000)])
def test_kv_blocks_drop_by_the_decode_graphs_bytes(rows, max_len):
    """cuda_graphs=True sets the graphs' estimate aside: the cache loses exactly ceil(graphs / block) blocks,
    and the estimate grows with the table width (max_model_len) and the rows."""
    model = _llama()
    kw = dict(max_num_seqs=rows, max_model_len=max_len)
    probe = Engine(model, None, **kw)
    per_block, activations = probe.memory_plan["bytes_per_block"], probe.memory_plan["activation_bytes"]
    want = _graphs_by_hand(model.config, rows, max_len)
    budget = activations + want + 300 * per_block + per_block // 2
    plain = Engine(model, None, cpu_cache_bytes=budget, **kw)
    graphed = Engine(model, None, cpu_cache_bytes=budget, cuda_graphs=True, **kw)
    assert plain.memory_plan["decode_graph_bytes"] == 0
    assert graphed.memory_plan["decode_graph_bytes"] == want
    assert plain.cache.num_blocks - graphed.cache.num_blocks == math.ceil(want / per_block)
    assert graphed.cache.num_blocks * per_block + want + activations <= budget < \
        (graphed.cache.num_blocks + 1) * per_block + want + activations
    assert graphed.graphs.logits.numel() * 4 == (1 << (rows - 1).bit_length()) * model.config.vocab_size * 4
    # explicit num_blocks: nothing planned; a budget the graphs fill says so
    assert Engine(model, None, num_blocks=7, cuda_graphs=True, **kw).memory_plan["decode_graph_bytes"] == 0
    with pytest.raises(ValueError, match="decode CUDA graphs"):
        Engine(model, None, cpu_cache_bytes=activations + want, cuda_graphs=True, **kw)


def test_graphs_estimate_where_the_triton_kernel_runs(monkeypatch):
    """Where the kernel runs, attention costs its split partials, not a full-width gather."""
    pytest.importorskip("triton")
    from deltatune.kernels import backend
    from deltatune.serve.decode_graphs import planned_bytes
    from deltatune.serve.model_runner import ModelRunner

    runner = ModelRunner(_llama(), None)
    kernels = backend.load("deltatune.kernels.triton_paged_attention")
    splits = lambda r, C: kernels.splits_for(r, 2, C)  # noqa: E731  (balanced: splits from r alone)
    reference = planned_bytes(runner, 4, 128, 16)
    assert reference == _graphs_by_hand(runner.config, 4, 128 * 16)
    monkeypatch.setattr(backend, "triton_enabled", lambda t: True)
    kernel = planned_bytes(runner, 4, 128, 16)
    assert kernel == _graphs_by_hand(runner.config, 4, 128 * 16, splits=splits) < reference
    assert splits(1, 128 * 16) > 1  # the partials are counted at all
    # the bucketed A/B setting: a graph per width bucket 1, 2, 4 .. 128, each counted
    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", "bucketed")
    widths = [1 << i for i in range(8)]
    assert planned_bytes(runner, 4, 128, 16) == _graphs_by_hand(runner.config, 4, 0, splits=splits, widths=widths)


@pytest.mark.parametrize("width, widths", [(128, [1, 2, 4, 8, 16, 32, 64, 128]), (63, [1, 2, 4, 8, 16, 32, 64])])
def test_bucketed_graphs_plan_every_width_bucket(monkeypatch, width, widths):
    """DELTATUNE_DECODE_GRAPH_WIDTH=bucketed: the reference's estimate sums every width bucket a table of at
    most ``width`` blocks can take (63 blocks: up to the bucket of 64), more than the one width alone."""
    from deltatune.serve.decode_graphs import planned_bytes
    from deltatune.serve.model_runner import ModelRunner

    runner = ModelRunner(_llama(), None)
    one = planned_bytes(runner, 8, width, 16)
    monkeypatch.setenv("DELTATUNE_DECODE_GRAPH_WIDTH", "bucketed")
    bucketed = planned_bytes(runner, 8, width, 16)
    assert bucketed == _graphs_by_hand(runner.config, 8, 0, widths=widths) > one
    assert one == _graphs_by_hand(runner.config, 8, width * 16)


def test_gpu_plan_subtracts_the_pool_from_the_memory_fraction(monkeypatch):
    total, in_use, per_block = 80 << 30, 10 << 30, 1 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - in_use, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: in_use)
    cuda = torch.device("cuda")
    free = 0.9 * total - in_use - (1 << 30)
    assert plan_num_blocks(per_block, cuda, reserve_bytes=1 << 30) == int(free // per_block)
    assert plan_num_blocks(per_block, cuda, reserve_bytes=1 << 30, adapter_bytes=300 * per_block) == \
        int(free // per_block) - 300
    with pytest.raises(ValueError, match="adapter-pool slots"):
        plan_num_blocks(per_block, cuda, adapter_bytes=int(free) + (2 << 30))
    assert plan_num_blocks(per_block, cuda, reserve_bytes=1 << 30, graph_bytes=40 * per_block) == \
        int(free // per_block) - 40
    with pytest.raises(ValueError, match="MiB for decode CUDA graphs"):
        plan_num_blocks(per_block, cuda, graph_bytes=int(free) + (2 << 30))


@pytest.mark.gpu
def test_on_a_gpu_pool_and_cache_fit_the_fraction(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _llama().cuda()
    torch.manual_seed(1)
    dt.save_adapter(dt.add_adapter(_llama(), dt.LoraConfig(r=8, targets="all-linear", init="random")), tmp_path / "a")
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info()
    fraction = (torch.cuda.memory_reserved() + (256 << 20) + _hand_count(model, 64, 16) + (64 << 20)) / total
    eng = Engine(model, None, pool=True, max_lora_rank=16, gpu_memory_fraction=fraction, max_num_seqs=4)
    assert eng.memory_plan["adapter_pool_bytes"] == _hand_count(model, 64, 16)
    eng.add_adapter("a", str(tmp_path / "a"))
    out = eng.generate([[1, 2, 3], [4, 5]], ["a", None], max_new_tokens=4, ignore_eos=True)
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert eng.pool.resident_bytes() == eng.memory_plan["adapter_pool_bytes"]  # all-linear: all that was planned
    assert torch.cuda.memory_reserved() <= fraction * total


@pytest.mark.gpu
def test_on_a_gpu_captured_decode_graphs_fit_their_estimate():
    """Capture every row bucket of a bf16 model with a 32k vocabulary in the order worst for reuse (1 row, 2,
    4 .. 64): the graphs' private pool (its segments in the allocator's snapshot) plus the shared logits and
    the static inputs stay within ``planned_bytes``; prints how much of the estimate was used."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from deltatune.serve.decode_graphs import planned_bytes

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    eng = Engine(model, None, num_blocks=512, max_num_seqs=64, cuda_graphs=True)
    graphs = eng.graphs
    for n in (1, 2, 4, 8, 16, 32, 64):
        eng.generate([[1 + i, 2, 3, 4] for i in range(n)], max_new_tokens=3, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    assert graphs.off is None and set(graphs.graphs) == {(r, False) for r in (1, 2, 4, 8, 16, 32, 64)}
    pool_id = tuple(graphs.mempool)
    segments = torch.cuda.memory_snapshot()
    pool = sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == pool_id)
    inputs = sum(g.longs.nbytes + g.ints.nbytes for g in graphs.graphs.values())
    used = pool + graphs.logits.nbytes + inputs
    estimate = planned_bytes(eng.runner, 64, graphs.width, 16)
    print(f"decode graphs: pool {pool / 2**20:.1f} MiB + logits {graphs.logits.nbytes / 2**20:.1f} MiB + inputs "
          f"{inputs / 2**20:.2f} MiB = {used / 2**20:.1f} MiB of the estimate's {estimate / 2**20:.1f} MiB")
    assert pool > 0 and used <= estimate
