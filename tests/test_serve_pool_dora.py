"""DoRA adapters in the adapter pool (issue 18): a batch mixing DoRA adapters (ours and PEFT's, different
ranks, a bias-carrying Qwen2 among the models), LoRA adapters and base rows gives every row its own adapter's
output: our DoRA layer's forward, PEFT's DoRA forward for PEFT's file, the base model for base rows (fp32, CPU,
the PyTorch reference). The engine through the pool and its static decode path gives the tokens of the engine
with the adapters loaded into the model; a DoRA adapter registered after the slots exist drops them (their
output scales are new), so graphs over them are captured again. The GPU tests run the kernels, the gathered
path and captured graphs."""

import copy
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.serve import AdapterPool, Engine

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import _models  # noqa: E402
import test_serve_pool  # noqa: E402  (tests/ is on sys.path under pytest)

TOL = 1e-4
ROWS = ["dora", None, "peft_dora", "lora", "dora", None]


def _scramble_magnitudes(model, seed):
    """Magnitudes of a trained DoRA adapter: off their initial ||W + s·BA|| (where DoRA equals LoRA)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def _ours(base, path, seed, **cfg):
    return test_serve_pool._ours(base, path, seed, before_save=_scramble_magnitudes, **cfg)


def _peft(base, path, seed, **cfg):
    return test_serve_pool._peft(base, path, seed, before_save=_scramble_magnitudes, **cfg)


def _adapters(base, root):
    return {
        "dora": _ours(base, root / "dora", 1, r=4, alpha=8.0, targets="all-linear", use_dora=True),
        "peft_dora": _peft(base, root / "peft_dora", 2, r=8, lora_alpha=4, use_dora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
        "lora": _ours(base, root / "lora", 3, r=6, alpha=12.0, targets=["q_proj", "k_proj", "up_proj"]),
    }


def _ids(n, length=7, seed=0):
    return torch.randint(0, _models.VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _expected(base, paths, ids, rows):
    """Each row's logits from its own adapter: ours loaded into the model (our DoRA forward, unmerged), PEFT's
    file through PEFT's own DoRA forward, the base for None."""
    outs = {None: _models.output(base, {"input_ids": ids})}
    for name, path in paths.items():
        if name.startswith("peft"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
            outs[name] = _models.output(model, {"input_ids": ids})
        else:
            outs[name] = _models.output(dt.load_adapter(copy.deepcopy(base), path), {"input_ids": ids})
    return torch.stack([outs[name][i] for i, name in enumerate(rows)]), outs


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    torch.manual_seed(0)
    base = getattr(_models, request.param)().eval()
    root = tmp_path_factory.mktemp(f"dora_{request.param}")
    paths = _adapters(base, root)
    ids = _ids(len(ROWS))
    expected, by_adapter = _expected(base, paths, ids, ROWS)
    return base, paths, ids, expected, by_adapter


def _pool(base, paths, **kw):
    pool = AdapterPool(base, **kw)
    for name, p in paths.items():
        pool.register(name, p)
    return pool


def test_dora_rows_equal_their_own_models(setup):
    base, paths, ids, expected, by_adapter = setup
    pool = _pool(base, paths)
    with torch.no_grad(), pool.routed(base, ROWS):
        out = _models.output(base, {"input_ids": ids})
    assert (out - expected).abs().max() <= TOL
    # the check can fail: the output scales matter (the same factors with m at its initial norm, f = 1, are LoRA)
    lora_like = dt.load_adapter(copy.deepcopy(base), paths["dora"])
    with torch.no_grad():
        for module in lora_like.modules():
            for delta in getattr(module, "deltas", {}).values():
                delta.attach(module)  # m re-initialised to ||W + s·BA||
    assert (_models.output(lora_like, {"input_ids": ids})[0] - by_adapter["dora"][0]).abs().max() > 1e-2


def test_dora_merged_model_agrees(setup):
    """The merged DoRA model (W' = f ⊙ (W + s·BA)) gives the pool's row too."""
    base, paths, ids, expected, _ = setup
    merged = dt.load_adapter(copy.deepcopy(base), paths["dora"])
    dt.merge(merged)
    want = _models.output(merged, {"input_ids": ids})
    pool = _pool(base, {"dora": paths["dora"]})
    with torch.no_grad(), pool.routed(base, ["dora"] * len(ROWS)):
        got = _models.output(base, {"input_ids": ids})
    assert (got - want).abs().max() <= TOL


def test_first_dora_adapter_drops_the_slots_and_base_rows_stay_exact(setup):
    """Slots made for LoRA only get output scales when the first DoRA adapter registers: the pool drops them
    (``generation``), its slot bytes grow by the layers' outputs, and rows of the base and of LoRA adapters stay
    bit for bit what they were."""
    base, paths, ids, expected, _ = setup
    pool = _pool(base, {"lora": paths["lora"]})
    rows = [None, "lora", None, "lora", None, None]
    with torch.no_grad(), pool.routed(base, rows):
        before = _models.output(base, {"input_ids": ids})
    generation, lora_bytes = pool.generation, pool.slot_bytes()
    assert pool.resident() == ["lora"]
    pool.register("dora", paths["dora"])
    assert pool.generation == generation + 1 and pool.resident() == []
    outs = sum(fan_out for _, _, fan_out in pool.planned_shapes().values())
    assert pool.slot_bytes() > lora_bytes and pool.slot_bytes() - lora_bytes >= outs * 4 - 1
    with torch.no_grad(), pool.routed(base, rows):
        after = _models.output(base, {"input_ids": ids})
    assert torch.equal(before, after)
    with torch.no_grad(), pool.routed(base, ["dora", *rows[1:]]):
        mixed = _models.output(base, {"input_ids": ids})
    assert torch.equal(mixed[1:], before[1:]) and (mixed[0] - expected[0]).abs().max() <= TOL


def test_unregistered_dora_slot_scales_nothing(setup):
    """A DoRA adapter's slot, emptied and given to a LoRA adapter, scales nothing for it."""
    base, paths, ids, expected, by_adapter = setup
    pool = _pool(base, {"dora": paths["dora"]}, max_resident=1)
    with torch.no_grad(), pool.routed(base, ["dora"] * len(ROWS)):
        _models.output(base, {"input_ids": ids})
    pool.unregister("dora")
    pool.register("lora", paths["lora"])
    with torch.no_grad(), pool.routed(base, ["lora"] * len(ROWS)):
        got = _models.output(base, {"input_ids": ids})
    assert (got - by_adapter["lora"]).abs().max() <= TOL


def _engine_tokens(tmp_path, device="cpu", capture=False):
    """(tokens of the engine with the adapters in the model, of the pooled engine through decode graphs)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).to(device).eval()
    paths = {"d0": _ours(model, tmp_path / "d0", 5, r=4, alpha=8.0, targets="all-linear", use_dora=True),
             "d1": _ours(model, tmp_path / "d1", 6, r=2, alpha=2.0, targets=["q_proj", "v_proj"], use_dora=True),
             "l0": _ours(model, tmp_path / "l0", 7, r=8, alpha=4.0, targets="all-linear")}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3)]
    names = ["d0", None, "d1", "l0", "d0"]
    outs, models = [], [model, copy.deepcopy(model)]  # the plain engine loads the adapters into its model
    for pooled in (False, True):
        eng = Engine(models[pooled], None, pool=True if pooled else None, num_blocks=64, max_num_seqs=8,
                     cuda_graphs=pooled)
        if pooled:
            eng.graphs.capture = capture
        for name, path in paths.items():
            eng.add_adapter(name, str(path))
        outs.append([o.token_ids for o in eng.generate(prompts, adapters=names, max_new_tokens=12, temperature=0.0,
                                                        ignore_eos=True)])
        if pooled:
            assert any(k[-1] for k in eng.graphs.graphs)  # decode steps with pooled adapters ran the static path
    return outs


def test_engine_pool_with_dora_gives_the_model_routed_tokens(tmp_path):
    plain, pooled = _engine_tokens(tmp_path)
    assert pooled == plain


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels and CUDA graphs need a CUDA GPU")
def test_gpu_dora_through_kernels_and_graphs(setup, tmp_path):
    base, paths, ids, expected, _ = setup
    gpu = copy.deepcopy(base).cuda()
    pool = _pool(gpu, paths)
    for gathered in (False, True):  # SGMV (prefill-shaped), then the gathered kernel on every projection
        with torch.no_grad(), pool.routed(gpu, ROWS, gathered=gathered):
            out = _models.output(gpu, {"input_ids": ids.cuda()})
        assert (out.cpu() - expected).abs().max() <= 1e-3
    plain, pooled = _engine_tokens(tmp_path, "cuda", capture=True)
    assert pooled == plain


def test_scale_rows_from_the_device_table_equal_the_host_rows():
    """``PoolCall.scaled`` reads each token's row of scales from the step's device slot table where the kernels
    run (what a captured graph replays) and from the host slots elsewhere: the same rows, per dim-0 row of a
    (B, L, out) output or per token, base tokens on the row of ones; a call without DoRA slots in use leaves
    y alone unless forced gathered."""
    from types import SimpleNamespace

    from deltatune.serve.pool_call import PoolCall

    g = torch.Generator().manual_seed(0)
    S, out = 3, 5
    scales = torch.cat([torch.rand(S, out, generator=g) + 0.5, torch.ones(1, out)])
    layer = SimpleNamespace(out_scale=scales, dora_slots={0, 2})
    slots = [2, -1, 0, 1]
    bias = torch.randn(out, generator=g)
    for shape in ((4, 3, out), (4, out)):
        y = torch.randn(*shape, generator=g)
        host = PoolCall(slots, None, None).scaled(layer, y, y, bias)
        device = PoolCall(slots, None, torch.tensor(slots, dtype=torch.int32), gathered=True).scaled(layer, y, y, bias)
        assert torch.equal(host, device)
        rows = torch.tensor([2, 3, 0, 1])
        f = scales[rows].view(4, *([1] * (len(shape) - 2)), out)
        assert torch.allclose(host, f * (y - bias) + bias, atol=1e-6)
        assert torch.equal(host[1], y[1])  # the base row, bit for bit
    y = torch.randn(4, out, generator=g)
    assert PoolCall([1, -1, 1, 1], None, None).scaled(layer, y, y, bias) is y  # slot 1 holds LoRA here


def test_dora_on_gpt2_conv1d_and_a_4bit_base(tmp_path):
    """DoRA's output scale over other linear geometries: GPT-2's transposed Conv1D (with biases) and the 4-bit
    QuantLinear (W dequantized for the norm, as QDoRA), each against our DoRA forward on the same base."""
    from deltatune.quant import quantize_model

    torch.manual_seed(0)
    gpt2 = _models.gpt2().eval()
    llama = quantize_model(_models.llama().eval())
    cases = [(gpt2, _ours(gpt2, tmp_path / "g", 1, r=4, targets=["c_attn", "c_proj", "c_fc"], use_dora=True),
              _models.inputs("gpt2")),
             (llama, _ours(llama, tmp_path / "q", 2, r=4, targets=["q_proj", "down_proj"], use_dora=True),
              {"input_ids": _ids(2)})]
    for base, path, batch in cases:
        reference = dt.load_adapter(copy.deepcopy(base), path, "d")
        with torch.no_grad(), dt.routed(reference, ["d", None]):
            want = _models.output(reference, batch)
        pool = _pool(base, {"d": path})
        with torch.no_grad(), pool.routed(base, ["d", None]):
            out = _models.output(base, batch)
        assert (out - want).abs().max() <= TOL
        assert (want[0] - _models.output(base, batch)[0]).abs().max() > 1e-2
