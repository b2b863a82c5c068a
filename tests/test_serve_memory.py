"""The engine's memory plan: the adapter pool's slots are set aside beside the KV cache.

Oracles: a hand count of the slots (resident slots x every decoder layer's 7 projections x max rank x
(in + out) x dtype size, plus a float32 scale and an int32 rank each); the KV-cache block count under a fake budget, on
the CPU and through a faked CUDA memory query, and what the slots really take once allocated.
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
