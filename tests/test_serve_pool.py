"""The adapter pool (``deltatune.serve``): mixed-adapter batches equal each adapter's merged model.

Oracles: for every row of a batch mixing several adapters (different ranks, alpha, rsLoRA, made by us
and by PEFT) and base rows, that adapter's merged single-adapter model (``load_adapter`` + ``merge``),
and the base model for base rows; fp32 on the CPU (the PyTorch reference path; the kernels are checked
against it in test_sgmv.py). Also: LRU eviction and reload, bad files refused while the pool serves on,
memory accounting and the byte budget.
"""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.serve import AdapterPool, PoolError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import _models  # noqa: E402

TOL = 1e-4
ROWS = ["a", None, "b", "c", "a", None, "d"]


def _ours(base, path, seed, before_save=None, **cfg):
    """Save a random LoRA adapter made by deltatune (B non-zero) for ``base`` to ``path``; ``before_save(model,
    seed)`` may change its parameters first."""
    torch.manual_seed(seed)
    model = dt.add_adapter(copy.deepcopy(base), dt.LoraConfig(init="random", **cfg))
    if before_save is not None:
        before_save(model, seed)
    dt.save_adapter(model, path)
    return path


def _peft(base, path, seed, before_save=None, **cfg):
    """Save a random LoRA adapter made by PEFT for ``base`` to ``path`` (``before_save`` as ``_ours``)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    if before_save is not None:
        before_save(model, seed)
    model.save_pretrained(path)
    return path


def _adapters(base, root):
    """Four adapters of different ranks, alpha, targets and scales (rsLoRA, patterns), ours and PEFT's."""
    return {
        "a": _ours(base, root / "a", 1, r=4, alpha=8.0, targets="all-linear"),
        "b": _ours(base, root / "b", 2, r=8, alpha=4.0, use_rslora=True, targets=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 16.0}),
        "c": _peft(base, root / "c", 3, r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                   alpha_pattern={"o_proj": 3}),
        "d": _peft(base, root / "d", 4, r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                   rank_pattern={"gate_proj": 3}),
    }


def _extra(base, root):
    """A fifth adapter for the eviction test."""
    return _ours(base, root / "e", 5, r=2, alpha=2.0, targets=["k_proj", "gate_proj"])


def _merged_logits(base, path, ids):
    model = dt.load_adapter(copy.deepcopy(base), path)
    dt.merge(model)
    return _models.output(model, {"input_ids": ids})


def _logits(base, paths, ids):
    """{adapter name: its merged model's logits} and {None: the base model's}."""
    outs = {name: _merged_logits(base, p, ids) for name, p in paths.items()}
    outs[None] = _models.output(base, {"input_ids": ids})
    return outs


def _expected(logits, rows):
    """Each row's logits from its own adapter's merged model (the base model for None)."""
    return torch.stack([logits[name][i] for i, name in enumerate(rows)])


def _ids(n, length=6, seed=0):
    return torch.randint(0, _models.VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(base model, adapter directories, input ids, logits by adapter) per architecture, built once."""
    cache = {}

    def build(arch):
        if arch not in cache:
            torch.manual_seed(0)
            base = getattr(_models, arch)().eval()
            root = tmp_path_factory.mktemp(arch)
            paths = _adapters(base, root)
            ids = _ids(len(ROWS))
            cache[arch] = base, paths, ids, _logits(base, {**paths, "e": _extra(base, root)}, ids)
        return cache[arch]
    return build


@pytest.fixture(params=["llama", "qwen2"])
def setup(request, built):
    return built(request.param)


@pytest.fixture
def llama(built):
    """The Llama setup only: for checks that do not depend on the architecture."""
    return built("llama")


def _pool(base, paths, **kw):
    pool = AdapterPool(base, **kw)
    for name, p in paths.items():
        pool.register(name, p)
    return pool


def test_pool_rows_equal_merged_models(setup):
    base, paths, ids, logits = setup
    expected = _expected(logits, ROWS)
    pool = _pool(base, paths)
    with pool.routed(base, ROWS):
        out = _models.output(base, {"input_ids": ids})
    assert (out - expected).abs().max() <= TOL
    # the adapters really differ from each other and from the base (the check can fail)
    assert min((expected[0] - expected[i]).abs().max() for i in (1, 2, 3, 6)) > 1e-2
    # hooks are gone after the context: the base model again
    assert torch.equal(_models.output(base, {"input_ids": ids}), _models.output(copy.deepcopy(base), {"input_ids": ids}))


def test_reference_routing_equals_merged_models(setup):
    base, paths, ids, logits = setup
    expected = _expected(logits, ROWS)
    model = copy.deepcopy(base)
    for name, p in paths.items():
        dt.load_adapter(model, p, name)
    with dt.routed(model, ROWS):
        out = _models.output(model, {"input_ids": ids})
    assert (out - expected).abs().max() <= TOL


def test_pool_beside_the_models_own_adapters(setup):
    """Pooled adapters and adapters added to the model (DeltaLayers) in one batch."""
    base, paths, ids, logits = setup
    expected = _expected(logits, ROWS)
    model = copy.deepcopy(base)
    dt.load_adapter(model, paths["c"], "c")
    pool = _pool(model, {n: p for n, p in paths.items() if n != "c"})
    with pool.routed(model, ROWS):
        out = _models.output(model, {"input_ids": ids})
    assert (out - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="already an adapter of the model"):
        pool.register("c", paths["c"])
    dt.load_adapter(model, paths["a"], "a")  # added to the model after it was pooled: ambiguous in a batch
    with pytest.raises(ValueError, match="both in the pool and on the model"):
        with pool.routed(model, ["a"]):
            pass


def test_tokens_of_one_flat_batch(llama):
    """The engine's layout: one (T, in) input, a name per token (and (1, T, in) with a name per token)."""
    base, paths, _, _ = llama
    pool = _pool(base, paths)
    layer = base.model.layers[1].self_attn.q_proj
    x = torch.randn(len(ROWS) * 3, layer.in_features)
    rows = [ROWS[(7 * t) % len(ROWS)] for t in range(x.shape[0])]
    weights = {None: layer.weight}
    for name, p in paths.items():
        model = dt.load_adapter(copy.deepcopy(base), p)
        weights[name] = dt.merge(model).model.layers[1].self_attn.q_proj.weight
    want = torch.stack([F.linear(x[t], weights[n], layer.bias) for t, n in enumerate(rows)])
    with torch.no_grad(), pool.routed(base, rows):
        flat = layer(x)
        batched = layer(x[None])[0]
    assert (flat - want).abs().max() <= TOL
    assert (batched - want).abs().max() <= TOL
    with pytest.raises(ValueError, match="routing gives"), pool.routed(base, rows[:-1]), torch.no_grad():
        layer(x)


def test_lru_eviction_and_reload(llama):
    """More adapters than slots: batches of different pairs stay exact as slots are reused."""
    base, paths, ids, logits = llama
    more = {**paths, "e": paths["a"].parent / "e"}
    pool = _pool(base, more, max_resident=2)
    assert pool.capacity == 2 and pool.names() == ["a", "b", "c", "d", "e"]
    for pair in (["a", "b"], ["c", "a"], ["d", "e"], ["a", "b"], ["b", "d"]):
        rows = [pair[0], None, pair[1], pair[0]]
        with pool.routed(base, rows):
            out = _models.output(base, {"input_ids": ids[:4]})
        expected = _expected(logits, rows)
        assert (out - expected).abs().max() <= TOL, pair
        assert pool.resident() == pair  # least recently used first; the others were evicted
    with pytest.raises(PoolError, match="holds 2 at once"):
        with pool.routed(base, ["a", "b", "c"]):
            pass
    with pool.routed(base, ["a", None]):  # still serving
        out = _models.output(base, {"input_ids": ids[:2]})
    assert (out - _expected(logits, ["a", None])).abs().max() <= TOL
    pool.unregister("a")
    assert "a" not in pool.names() and "a" not in pool.resident()
    with pytest.raises(KeyError, match="neither the pool nor the model"):
        with pool.routed(base, ["a"]):
            pass


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f))


def _bad_files(base, root):
    """(directory, what the error must say) for adapter files the pool must refuse."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = []
    missing = _ours(base, root / "missing", 7, r=4, targets=["q_proj"])
    _rewrite(missing, lambda t: t.pop(key))
    cases.append((missing, "no tensor for key '" + key))
    shape = _ours(base, root / "shape", 7, r=4, targets=["q_proj"])
    _rewrite(shape, lambda t: t.__setitem__(key, torch.zeros(5, 32)))
    cases.append((shape, f"key '{key}' has shape \\(5, 32\\)"))
    nan = _ours(base, root / "nan", 7, r=4, targets=["q_proj"])
    _rewrite(nan, lambda t: t[key].__setitem__((0, 0), float("nan")))
    cases.append((nan, "non-finite"))
    extra = _ours(base, root / "extra", 7, r=4, targets=["q_proj"])
    _rewrite(extra, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.nope.lora_A.weight", torch.zeros(4, 32)))
    cases.append((extra, "mlp.nope.lora_A.weight"))
    pickled = _ours(base, root / "pickled", 7, r=4, targets=["q_proj"])
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases.append((pickled, "adapter_model.bin: pickle files are never loaded"))
    embed = _ours(base, root / "embed", 7, r=4, targets=["embed_tokens"])
    cases.append((embed, "linear layers only"))
    ia3 = root / "ia3"
    dt.save_adapter(dt.add_adapter(copy.deepcopy(base), dt.IA3Config(targets=["q_proj"])), ia3)
    cases.append((ia3, "serves LoRA adapters"))
    config = _ours(base, root / "config", 7, r=4, targets=["q_proj"])
    (config / "adapter_config.json").write_text(json.dumps({**json.loads((config / "adapter_config.json").read_text()),
                                                           "target_modules": ["no_such_module"]}))
    cases.append((config, "no_such_module"))
    return cases


def test_bad_files_refused_pool_keeps_serving(llama, tmp_path):
    base, paths, ids, logits = llama
    expected = _expected(logits, ROWS)
    pool = _pool(base, paths)
    with pool.routed(base, ROWS):
        _models.output(base, {"input_ids": ids})
    for path, message in _bad_files(base, tmp_path):
        with pytest.raises(dt.AdapterFileError, match=message) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.register("bad", path)
        assert str(path.name) in str(err.value)
        assert "bad" not in pool.names()
    with pytest.raises(ValueError, match="already registered"):
        pool.register("a", paths["a"])
    with pool.routed(base, ROWS):
        out = _models.output(base, {"input_ids": ids})
    assert (out - expected).abs().max() <= TOL


def test_finite_check_refuses_any_nan_or_infinity_and_accepts_values_whose_sum_overflows(llama, tmp_path):
    """register's check sums each tensor in float32 first (one fast reduction) and looks element by element
    only when the sum is not finite: an infinity, a NaN or +inf beside -inf are refused; finite values whose
    sum overflows float32 are accepted."""
    from deltatune.serve.pool import _all_finite

    base = llama[0]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    pool = AdapterPool(base)
    for name, values in {"inf": [float("inf")], "nan": [float("nan")], "both": [float("inf"), float("-inf")]}.items():
        path = _ours(base, tmp_path / name, 7, r=4, targets=["q_proj"])
        _rewrite(path, lambda t: t[key].view(-1)[: len(values)].copy_(torch.tensor(values)))
        with pytest.raises(dt.AdapterFileError, match=f"key '{key}' holds non-finite"):
            pool.register(name, path)
    huge = _ours(base, tmp_path / "huge", 7, r=4, targets=["q_proj"])
    _rewrite(huge, lambda t: t[key].view(-1)[:2].fill_(3e38))  # finite; their float32 sum is inf
    pool.register("huge", huge)
    assert pool.names() == ["huge"]
    top = torch.finfo(torch.bfloat16).max
    assert _all_finite(torch.tensor([top, top, 1.0], dtype=torch.bfloat16))
    assert not _all_finite(torch.tensor([top, top, float("nan")], dtype=torch.bfloat16))
    assert not _all_finite(torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16))


def test_memory_accounting_and_budget(llama):
    from safetensors.torch import load_file

    base, paths, ids, logits = llama
    pool = _pool(base, paths, max_resident=3)
    assert pool.resident_bytes() == 0  # nothing on the device before the first batch
    # one slot: every targeted layer's A (R, in) and B (out, R) at its largest rank, a scale and a rank (int32)
    per_slot = 0
    for name, module in base.named_modules():
        ranks = []
        for p in paths.values():
            sd = load_file(str(p / "adapter_model.safetensors"))
            key = f"base_model.model.{name}.lora_A.weight"
            if key in sd:
                ranks.append(sd[key].shape[0])
        if ranks:
            per_slot += max(ranks) * (module.in_features + module.out_features) * 4 + 4 + 4
    assert pool.slot_bytes() == per_slot
    with pool.routed(base, ["a", "b"]):
        pass
    assert pool.resident_bytes() == 3 * per_slot
    assert pool.host_bytes() > 0
    budget = _pool(base, paths, max_resident=64, max_bytes=int(2.5 * per_slot))
    assert budget.capacity == 2
    with pytest.raises(PoolError, match="holds 2 at once"):
        with budget.routed(base, ["a", "b", "c"]):
            pass
    with budget.routed(base, ["a", "d"]):
        out = _models.output(base, {"input_ids": ids[:2]})
    assert (out - _expected(logits, ["a", "d"])).abs().max() <= TOL
    assert budget.resident_bytes() == 2 * per_slot <= budget.max_bytes
    tight = AdapterPool(base, max_bytes=100)
    with pytest.raises(PoolError, match="over the pool's budget"):
        tight.register("a", paths["a"])
    assert tight.names() == []
    fixed = AdapterPool(base, max_rank=8)
    with pytest.raises(PoolError, match="max_rank=8"):
        fixed.register("d", paths["d"])


def test_gpt2_conv1d_and_4bit_linear_layers(tmp_path):
    """Other linear geometries: GPT-2's transposed Conv1D (against the merged model) and the 4-bit
    QuantLinear (against the reference routing of the adapter loaded into the model)."""
    torch.manual_seed(0)
    gpt2 = _models.gpt2().eval()
    path = _ours(gpt2, tmp_path / "g", 1, r=4, targets=["c_attn", "c_proj", "c_fc"])
    ids = _models.inputs("gpt2")
    want = _models.output(dt.merge(dt.load_adapter(copy.deepcopy(gpt2), path)), ids)
    pool = _pool(gpt2, {"g": path})
    with pool.routed(gpt2, ["g", None]):
        out = _models.output(gpt2, ids)
    assert (out[0] - want[0]).abs().max() <= TOL
    assert torch.equal(out[1], _models.output(gpt2, ids)[1])
    assert (want[0] - out[1]).abs().max() > 1e-2

    from deltatune.quant import quantize_model

    llama = _models.llama().eval()
    path = _ours(llama, tmp_path / "q", 2, r=4, targets=["q_proj", "down_proj"])
    q = quantize_model(llama)
    reference = dt.load_adapter(copy.deepcopy(q), path, "q")
    ids = _ids(2)
    with dt.routed(reference, ["q", None]):
        want = _models.output(reference, {"input_ids": ids})
    pool = _pool(q, {"q": path})
    with pool.routed(q, ["q", None]):
        out = _models.output(q, {"input_ids": ids})
    assert (out - want).abs().max() <= TOL
    assert (want[0] - _models.output(q, {"input_ids": ids})[0]).abs().max() > 1e-2


def test_serve_imports_stay_light():
    """``deltatune.serve`` and the pool import torch only until used (no triton, transformers, peft)."""
    import subprocess
    import sys

    code = ("import sys, deltatune\nassert 'deltatune.serve' not in sys.modules\n"
            "from deltatune.serve import AdapterPool, mixed_lora\n"
            "print(sorted(m for m in ('triton', 'transformers', 'peft', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
