"""kohya / LyCORIS files for diffusers models (formats/kohya*.py), against the real libraries on tiny
UNet / CLIP models built here: diffusers' own kohya loader (LoRA, LoCon), lycoris-lora's modules
(LoHa, LoKr, Tucker LoCon, DoRA), kohya's hash rule, whole-file conversion with PEFT's format."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

import deltatune as dt  # noqa: E402
from deltatune.adapters import DeltaLayer  # noqa: E402
from deltatune.formats import kohya_names as kn  # noqa: E402
from deltatune.formats.kohya import KohyaSkipped  # noqa: E402

ATOL = 1e-5


# -- tiny models (random weights, small configs, as diffusers' and transformers' own tests build them) -----
def sd_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(2, 4)).eval()


def sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=48,
        use_linear_projection=True).eval()


def clip(projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def unet_inputs(unet, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 2, generator=g)}
    return (x, torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)), kwargs


def unet_out(unet, seed: int = 1):
    args, kwargs = unet_inputs(unet, seed)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def te_out(te):
    ids = torch.tensor([[0, 5, 9, 17, 2], [0, 44, 3, 2, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def layers(model, *, kinds=(nn.Linear, nn.Conv2d), where=("attentions", "resnets", "self_attn", "mlp", "samplers")):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, kinds) and any(w in p for w in where)]


def te_name(path):
    return kn.flat(kn.te_kohya_path(path))  # lora_te_text_model_encoder_..., as kohya names CLIP's modules


def lora_tensors(model, prefix, namer=kn.flat, rank=4, seed=0, alpha=2.0, dtype=torch.float32, where=None, no_alpha=()):
    """A kohya LoRA / LoCon (3x3 convolutions too) state dict for ``model``'s layers, random."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in layers(model, **({"where": where} if where else {})):
        name = prefix + namer(path)
        w = m.weight
        sd[name + ".lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=g) * 0.2).to(dtype)
        sd[name + ".lora_up.weight"] = (torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.2).to(dtype)
        if path not in no_alpha:
            sd[name + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def save(sd, path, metadata=None):
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata=metadata)
    return path


def diffusers_unet(unet, path, sdxl=False, name="default"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    state, alphas = pipe.lora_state_dict(str(path), unet_config=unet.config) if sdxl else pipe.lora_state_dict(str(path))
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    pipe.load_lora_into_unet(unet_state, alphas, unet=unet, adapter_name=name)
    return state, alphas


# -- names ----------------------------------------------------------------------------------------------
def test_names_round_trip_on_every_module_of_the_models():
    xl = sdxl_unet()
    layout = kn.layout_of(xl)
    assert layout == kn.SDXL_LAYOUT
    for model in (sd_unet(), xl, clip(), clip(projection=True)):
        for path, module in model.named_modules():
            if not path:
                continue
            assert kn.unflatten(kn.flat(path)) == path
            sgm = kn.to_sgm(path, layout) if model is xl else None
            if sgm is not None:
                assert kn.from_sgm(sgm, layout) == path and kn.unflatten(kn.flat(sgm)) == sgm
            elif model is xl and isinstance(module, (nn.Linear, nn.Conv2d)):
                pytest.fail(f"{path} has no SGM name")
    # SGM's layout as kohya's SDXL files name it
    assert kn.to_sgm("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", layout) == \
        "input_blocks.5.1.transformer_blocks.1.attn2.to_k"
    assert kn.to_sgm("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    assert kn.to_sgm("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.3.0.op"
    assert kn.to_sgm("mid_block.resnets.1.time_emb_proj", layout) == "middle_block.2.emb_layers.1"


# -- LoRA / LoCon against diffusers ---------------------------------------------------------------------------
def test_kohya_lora_and_locon_match_diffusers_unet_and_text_encoder(tmp_path):
    unet, te = sd_unet(), clip()
    sd = {**lora_tensors(unet, "lora_unet_", alpha=2.0), **lora_tensors(te, "lora_te_", te_name, seed=3, alpha=8.0)}
    sd.update(lora_tensors(unet, "lora_unet_", seed=5, rank=2, alpha=1.0, where=("conv_in", "time_embedding")))
    path = save(sd, tmp_path / "style.safetensors", {"ss_network_dim": "4"})

    ref_unet, ref_te = copy.deepcopy(unet), copy.deepcopy(te)
    from diffusers import StableDiffusionPipeline

    state, alphas = diffusers_unet(ref_unet, path)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=ref_te, prefix="text_encoder")

    base, wrapped = unet_out(unet), len(layers(unet)) + 3
    with pytest.warns(KohyaSkipped, match=r"text_encoder: 12"):
        dt.load_adapter(unet, path, name="style", component="unet")
    with pytest.warns(KohyaSkipped, match=r"unet: "):
        dt.load_adapter(te, path, name="style", component="text_encoder")
    assert len([m for m in unet.modules() if isinstance(m, DeltaLayer)]) == wrapped
    out, ref = unet_out(unet), unet_out(ref_unet)
    assert (ref - base).abs().max() > 1e-2  # the file does something
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(te_out(te), te_out(ref_te), atol=ATOL, rtol=0)
    dt.merge(unet)  # merged == unmerged
    torch.testing.assert_close(unet_out(unet), ref, atol=ATOL, rtol=0)


def test_sdxl_sgm_names_match_diffusers(tmp_path):
    unet = sdxl_unet()
    layout = kn.layout_of(unet)

    def sgm(path):
        return kn.flat(kn.to_sgm(path, layout))
    # diffusers' own SGM mapping garbles emb_layers / time embeddings; the rest is compared with it
    sd = lora_tensors(unet, "lora_unet_", sgm, where=("attentions", "conv1", "conv2", "conv_shortcut", "samplers"))
    path = save(sd, tmp_path / "xl.safetensors")
    ref = copy.deepcopy(unet)
    diffusers_unet(ref, path, sdxl=True)
    dt.load_adapter(unet, path, name="xl")
    torch.testing.assert_close(unet_out(unet), unet_out(ref), atol=ATOL, rtol=0)


# -- LyCORIS' modules as the oracle for what diffusers refuses ---------------------------------------------
def _lycoris_file(model, specs, path, seed=0):
    """Build lycoris-lora modules on ``model``'s layers ({layer path: (module class, kwargs)}), give every
    factor random values and write their state dicts as a kohya file. Returns (path, {layer: (x, y)}),
    y being the lycoris module's forward on x (what LyCORIS applies)."""
    g = torch.Generator().manual_seed(seed)
    sd, refs = {}, {}
    for layer_path, (cls, kwargs) in specs.items():
        org = model.get_submodule(layer_path)
        name = "lora_unet_" + kn.flat(layer_path)
        module = cls(name, org, 1.0, **kwargs)
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if pname != "dora_scale":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                else:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            for k, v in module.custom_state_dict().items():
                sd[f"{name}.{k}"] = v.detach().clone().contiguous()
            if isinstance(org, nn.Linear):
                x = torch.randn(2, 3, org.in_features, generator=g)
            else:
                x = torch.randn(2, org.in_channels, 8, 8, generator=g)
            refs[layer_path] = (x, module(x).detach().clone())
    save(sd, path)
    return path, refs


def _check_merged(model, refs):
    """Each layer's output equals LyCORIS' unmerged, and again merged."""
    for merged in (False, True):
        if merged:
            dt.merge(model)
        for layer_path, (x, expected) in refs.items():
            with torch.no_grad():
                out = model.get_submodule(layer_path)(x)
            torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
CONV3 = "down_blocks.1.resnets.0.conv1"
CONV1 = "down_blocks.1.resnets.0.conv_shortcut"
PROJ = "down_blocks.1.attentions.0.proj_in"  # a 1x1 conv in SD 1.x


def _diffusers_refuses(path):
    unet = sd_unet()
    with pytest.raises(ValueError, match="not been correctly renamed"):  # diffusers 0.42 on LyCORIS' keys
        diffusers_unet(unet, path)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_files_merge_as_lycoris(tmp_path, tucker):
    from lycoris.modules import LohaModule

    unet = sd_unet()
    specs = {p: (LohaModule, dict(lora_dim=4, alpha=2.0, use_tucker=tucker)) for p in (ATTN, FF, CONV3, CONV1)}
    path, refs = _lycoris_file(unet, specs, tmp_path / "loha.safetensors")
    _diffusers_refuses(path)
    dt.load_adapter(unet, path, name="loha")
    assert type(dt.list_adapters(unet)["loha"]).method == "loha"
    _check_merged(unet, refs)


@pytest.mark.parametrize("variant", ["low_rank_w2", "full", "decompose_both", "tucker", "factor"])
def test_lokr_files_merge_as_lycoris(tmp_path, variant):
    from lycoris.modules import LokrModule

    kwargs = {"low_rank_w2": dict(lora_dim=2, alpha=1.0), "full": dict(lora_dim=64, alpha=3.0),
              "decompose_both": dict(lora_dim=1, alpha=1.0, decompose_both=True),
              "tucker": dict(lora_dim=2, alpha=4.0, use_tucker=True), "factor": dict(lora_dim=2, alpha=1.0, factor=4)}[variant]
    unet = sd_unet()
    paths = (ATTN, FF, CONV3) if variant != "factor" else (ATTN, FF)
    path, refs = _lycoris_file(unet, {p: (LokrModule, kwargs) for p in paths}, tmp_path / "lokr.safetensors")
    _diffusers_refuses(path)
    dt.load_adapter(unet, path, name="lokr")
    _check_merged(unet, refs)


def test_locon_tucker_and_dora_merge_as_lycoris(tmp_path):
    from lycoris.modules import LoConModule

    unet = sd_unet()
    specs = {CONV3: (LoConModule, dict(lora_dim=4, alpha=2.0, use_tucker=True)),
             "up_blocks.1.resnets.0.conv2": (LoConModule, dict(lora_dim=3, alpha=1.0, use_tucker=True)),
             ATTN: (LoConModule, dict(lora_dim=4, alpha=2.0))}
    path, refs = _lycoris_file(unet, specs, tmp_path / "tucker.safetensors")
    _diffusers_refuses(path)  # lora_mid
    base_out = unet_out(unet)
    dt.load_adapter(unet, path, name="tucker")
    unmerged = unet_out(unet)
    _check_merged(unet, refs)
    torch.testing.assert_close(unet_out(unet), unmerged, atol=ATOL, rtol=0)
    assert (unmerged - base_out).abs().max() > 1e-3

    dora_unet = sd_unet()
    specs = {p: (LoConModule, dict(lora_dim=4, alpha=2.0, weight_decompose=True)) for p in (ATTN, FF, CONV3, PROJ)}
    path, refs = _lycoris_file(dora_unet, specs, tmp_path / "dora.safetensors")
    dt.load_adapter(dora_unet, path, name="dora")
    assert dt.list_adapters(dora_unet)["dora"].use_dora
    _check_merged(dora_unet, refs)


# -- writing: deltatune's adapters as kohya files, read back by diffusers ---------------------------------
def test_save_kohya_file_loads_in_diffusers_and_keeps_components(tmp_path):
    unet, te = sd_unet(), clip()
    dt.add_adapter(unet, dt.LoraConfig(r=4, alpha=8, init="random", targets=["to_q", "to_v", "conv1", "proj_in"],
                                       rank_pattern={"conv1": 2}), name="mine")
    dt.add_adapter(te, dt.LoraConfig(r=2, alpha=2, init="random", targets=["q_proj", "fc1"]), name="mine")
    path = tmp_path / "mine.safetensors"
    dt.save_adapter(unet, path, name="mine", format="kohya", component="unet", metadata={"ss_output_name": "mine"})
    dt.save_adapter(te, path, name="mine", format="kohya", component="text_encoder")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_text_model") for k in keys)
    assert meta["ss_output_name"] == "mine" and len(meta["sshs_model_hash"]) == 64
    ref = sd_unet()
    diffusers_unet(ref, path)
    torch.testing.assert_close(unet_out(ref), unet_out(unet), atol=ATOL, rtol=0)
    back = sd_unet()
    with pytest.warns(KohyaSkipped):
        dt.load_adapter(back, path, name="mine")
    torch.testing.assert_close(unet_out(back), unet_out(unet), atol=ATOL, rtol=0)

    xl = sdxl_unet()
    dt.add_adapter(xl, dt.LoHaConfig(r=2, alpha=1, init_weights=False, targets=["to_k", "conv2"]), name="h")
    xl_path = dt.save_adapter(xl, tmp_path / "xl.safetensors", name="h", format="kohya")
    with safe_open(str(xl_path), "pt") as f:
        assert all(k.startswith("lora_unet_input_blocks_") or k.startswith(("lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in f.keys())
    again = sdxl_unet()
    dt.load_adapter(again, xl_path, name="h")
    torch.testing.assert_close(unet_out(again), unet_out(xl), atol=ATOL, rtol=0)


# -- conversion with PEFT's format ----------------------------------------------------------------------------
def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_kohya_peft_kohya_round_trip_is_byte_stable(tmp_path):
    from deltatune.cli import main
    from deltatune.formats.kohya_hash import model_hashes

    unet, te = sd_unet(), clip()
    sd = {**lora_tensors(unet, "lora_unet_", dtype=torch.float16, no_alpha=(CONV3,)),
          **lora_tensors(te, "lora_te_", te_name, seed=2, rank=2, alpha=0.1, dtype=torch.float16)}
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_tag_frequency": json.dumps({"a": {"b": 1}}),
            "modelspec.title": "style"}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(sd, meta)
    src = save(sd, tmp_path / "in.safetensors", meta)
    with pytest.warns(KohyaSkipped, match="without alpha"):
        assert main(["convert", str(src), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "unet" / "adapter_config.json").is_file()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "out.safetensors"), "--to", "kohya"]) == 0
    tensors, out_meta = _read(tmp_path / "out.safetensors")
    assert tensors.keys() == sd.keys()
    for k, v in sd.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    assert out_meta == meta  # ss_* and other metadata kept, the hashes of the same tensors the same

    # the PEFT directory is PEFT's own format: PEFT applies it as deltatune applies the kohya file
    from peft import PeftModel

    ref = copy.deepcopy(unet)
    ref_out = PeftModel.from_pretrained(ref, str(tmp_path / "peft" / "unet")).base_model.model
    with pytest.warns(KohyaSkipped):
        dt.load_adapter(unet, src, name="k")
    torch.testing.assert_close(unet_out(ref_out), unet_out(unet), atol=1e-4, rtol=0)


def test_sdxl_lycoris_round_trip(tmp_path):
    from lycoris.modules import LokrModule

    from deltatune.formats.kohya_convert import kohya_to_peft, peft_to_kohya

    xl = sdxl_unet()
    layout = kn.layout_of(xl)
    sd = {}
    for p in (ATTN, "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0", "mid_block.resnets.0.conv1"):
        for kwargs in [dict(lora_dim=2, alpha=1.0)] if p != ATTN else [dict(lora_dim=64, alpha=5.0)]:
            module = LokrModule("x", xl.get_submodule(p), 1.0, **kwargs)
            name = "lora_unet_" + kn.flat(kn.to_sgm(p, layout))
            sd.update({f"{name}.{k}": torch.randn(v.shape).to(torch.bfloat16) for k, v in module.custom_state_dict().items()})
    for prefix, te in (("lora_te1_", clip()), ("lora_te2_", clip(projection=True))):
        sd.update(lora_tensors(te, prefix, te_name, seed=len(prefix), dtype=torch.bfloat16))
    src = save(sd, tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    dirs = kohya_to_peft(src, tmp_path / "peft")
    assert sorted(d.name for d in dirs) == ["text_encoder", "text_encoder_2", "unet"]
    out = peft_to_kohya(tmp_path / "peft", tmp_path / "out.safetensors")
    tensors, meta = _read(out)
    assert tensors.keys() == sd.keys() and all(torch.equal(tensors[k], sd[k]) and tensors[k].dtype == sd[k].dtype for k in sd)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    te2 = clip(projection=True)
    base = te_out(te2)
    with pytest.warns(KohyaSkipped):
        dt.load_adapter(te2, out, name="te2")  # the class says which component
    assert (te_out(te2) - base).abs().max() > 1e-3


# -- kohya's hashes -----------------------------------------------------------------------------------------
def test_hashes_are_kohyas(tmp_path):
    from safetensors.torch import save_file

    from deltatune.formats.kohya import write_file

    sd = {"lora_unet_x.lora_down.weight": torch.randn(4, 80000), "lora_unet_x.alpha": torch.tensor(4.0)}  # > 1 MiB
    meta = {"ss_network_dim": "4", "user_note": "changes nothing"}
    path = write_file(tmp_path / "h.safetensors", sd, meta)
    _, written = _read(path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    # legacy: 64 KiB at 1 MiB of the file holding only the ss_* metadata
    save_file(sd, str(tmp_path / "ss_only.safetensors"), metadata={"ss_network_dim": "4"})
    ss_only = (tmp_path / "ss_only.safetensors").read_bytes()
    assert written["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert written["user_note"] == "changes nothing"


# -- bad input -------------------------------------------------------------------------------------------------
def _untouched(model):
    return not any(isinstance(m, DeltaLayer) for m in model.modules()) and not dt.list_adapters(model)


def test_sdxl_file_on_sd15_unet_is_one_clear_error(tmp_path):
    xl = sdxl_unet()
    layout = kn.layout_of(xl)
    sd = lora_tensors(xl, "lora_unet_", lambda p: kn.flat(kn.to_sgm(p, layout)), where=("attentions",))
    sd.update(lora_tensors(clip(projection=True), "lora_te2_", te_name))
    path = save(sd, tmp_path / "xl.safetensors")
    unet = sd_unet()
    with pytest.raises(dt.AdapterFileError, match="SDXL") as e:
        dt.load_adapter(unet, path, name="xl")
    assert "nothing was loaded" in str(e.value)
    assert _untouched(unet)


def test_missing_alpha_is_kohyas_rank_and_reported(tmp_path):
    unet = sd_unet()
    paths = [p for p, _ in layers(unet)]
    none = save(lora_tensors(unet, "lora_unet_", no_alpha=paths), tmp_path / "none.safetensors")
    ref, ours = copy.deepcopy(unet), copy.deepcopy(unet)
    diffusers_unet(ref, none)  # a file without any alpha: diffusers scales by 1 too
    with pytest.warns(KohyaSkipped, match=f"{len(paths)} modules without alpha"):
        dt.load_adapter(ours, none, name="none")
    torch.testing.assert_close(unet_out(ours), unet_out(ref), atol=ATOL, rtol=0)
    # some without: kohya's (and LyCORIS') alpha = rank for those, whatever the others have
    some = save(lora_tensors(unet, "lora_unet_", alpha=2.0, no_alpha=paths[:5]), tmp_path / "some.safetensors")
    with pytest.warns(KohyaSkipped, match="5 modules without alpha"):
        dt.load_adapter(unet, some, name="some")
    scales = [unet.get_submodule(p).deltas["some"].scale for p in paths]
    assert scales[:5] == [1.0] * 5 and set(scales[5:]) == {0.5}


@pytest.mark.parametrize("extra,match", [
    ({"lora_unet_conv_in.oft_blocks": torch.zeros(2, 2, 2)}, "OFT"),
    ({"lora_unet_conv_in.diff": torch.zeros(32, 4, 3, 3)}, "full fine-tuning"),
    ({"lora_unet_conv_in.weirdo": torch.zeros(1)}, "no kohya / LyCORIS tensor name"),
    ({"lora_vae_decoder_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_vae_decoder_conv_in.lora_up.weight": torch.zeros(4, 2, 1, 1)}, "no Stable Diffusion component"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "no \\['lora_up.weight'\\]"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1), "lora_unet_conv_in.hada_w1_a": torch.zeros(1)},
     "at once"),
    ({"lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": torch.zeros(2, 4, 3, 3),
      "lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight": torch.zeros(4, 2, 1, 1)}, "name no module"),
    ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, "needs"),
])
def test_bad_files_raise_and_change_nothing(tmp_path, extra, match):
    unet = sd_unet()
    sd = {**lora_tensors(unet, "lora_unet_", where=("attentions",)), **extra}
    path = save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(dt.AdapterFileError, match=match):
        dt.load_adapter(unet, path, name="bad")
    assert _untouched(unet)


def test_component_without_modules_and_pickles_are_refused(tmp_path):
    unet, te = sd_unet(), clip()
    path = save(lora_tensors(unet, "lora_unet_", where=("attentions",)), tmp_path / "u.safetensors")
    with pytest.raises(dt.AdapterFileError, match="no modules of component 'text_encoder'"):
        dt.load_adapter(te, path, name="x")
    (tmp_path / "x.ckpt").write_bytes(b"not opened")
    with pytest.raises(dt.AdapterFileError, match="pickle"):
        dt.load_adapter(unet, tmp_path / "x.ckpt", name="x", format="kohya")
    assert _untouched(te) and _untouched(unet)


def test_convert_command_errors(tmp_path, capsys):
    from deltatune.cli import main

    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "peft"])
    assert "a directory; --to peft converts a kohya .safetensors file" in capsys.readouterr().err
    bad = save({"lora_unet_conv_in.oft_blocks": torch.zeros(2, 2, 2)}, tmp_path / "oft.safetensors")
    with pytest.raises(SystemExit):
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "peft"])
    assert "OFT" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- several style files at chosen strengths -----------------------------------------------------------------
def test_weighted_styles_match_diffusers_set_adapters(tmp_path):
    unet = sd_unet()
    a = save(lora_tensors(unet, "lora_unet_", seed=1, where=("attentions",)), tmp_path / "a.safetensors")
    b = save(lora_tensors(unet, "lora_unet_", seed=2, rank=2, alpha=1.0), tmp_path / "b.safetensors")
    ref = copy.deepcopy(unet)
    diffusers_unet(ref, a, name="a")
    diffusers_unet(ref, b, name="b")
    ref.set_adapters(["a", "b"], weights=[0.7, 0.4])
    expected = unet_out(ref)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    dt.load_adapter(unet, a, name="a")
    dt.load_adapter(unet, b, name="b")
    dt.set_active(unet, {"a": 0.7, "b": 0.4})
    torch.testing.assert_close(unet_out(unet), expected, atol=ATOL, rtol=0)
    dt.merge(unet)  # each folded in at its weight
    torch.testing.assert_close(unet_out(unet), expected, atol=ATOL, rtol=0)
    dt.set_active(unet, {"a": 1.0, "b": 1.0})  # a merge keeps the weight it was made with
    dt.unmerge(unet)
    after = unet.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)


def test_weighted_loha_and_refused_weighted_dora_merge(tmp_path):
    from lycoris.modules import LoConModule, LohaModule

    unet = sd_unet()
    path, _ = _lycoris_file(unet, {p: (LohaModule, dict(lora_dim=2, alpha=1.0)) for p in (ATTN, CONV3)},
                            tmp_path / "h.safetensors")
    base = unet_out(unet)
    dt.load_adapter(unet, path, name="h")
    full = unet_out(unet)
    dt.set_active(unet, {"h": 0.5})
    half = unet_out(unet)
    # a single layer adapted at weight 0.5 moves its output half way; the network is not linear, so check a layer
    layer = unet.get_submodule(ATTN)
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        y_half = layer(x)
        dt.set_active(unet, "h")
        y_full = layer(x)
        with dt.disabled(unet):
            y_base = layer(x)
    torch.testing.assert_close(y_half, y_base + 0.5 * (y_full - y_base), atol=ATOL, rtol=0)
    assert (half - base).abs().max() > 0 and (half - full).abs().max() > 0
    dt.set_active(unet, {"h": 0.5})
    dt.merge(unet)  # LoHa is additive: merged at 0.5 gives the unmerged output at 0.5
    torch.testing.assert_close(unet_out(unet), half, atol=ATOL, rtol=0)

    dora = sd_unet()
    path, _ = _lycoris_file(dora, {ATTN: (LoConModule, dict(lora_dim=4, alpha=2.0, weight_decompose=True))},
                            tmp_path / "d.safetensors")
    dt.load_adapter(dora, path, name="d")
    dt.set_active(dora, {"d": 0.5})
    w = dora.get_submodule(ATTN).weight.clone()
    with pytest.raises(ValueError, match="merges only at weight 1"):
        dt.merge(dora)
    assert torch.equal(dora.get_submodule(ATTN).weight, w)


def test_conv_1x1_factors_fit_linear_projections_and_dora_round_trips(tmp_path):
    from diffusers import UNet2DConditionModel

    sd1 = sd_unet()
    sd = lora_tensors(sd1, "lora_unet_", where=("proj_in", "proj_out"))  # SD 1.x: 1x1 convolutions
    path = save(sd, tmp_path / "proj.safetensors")
    torch.manual_seed(0)
    sd2 = UNet2DConditionModel(**{**sd1.config, "use_linear_projection": True}).eval()  # SD 2.x: linear
    dt.load_adapter(sd2, path, name="p")
    layer = sd2.get_submodule(PROJ)
    name = "lora_unet_" + kn.flat(PROJ)
    expected = 0.5 * sd[name + ".lora_up.weight"].flatten(1) @ sd[name + ".lora_down.weight"].flatten(1)
    torch.testing.assert_close(layer.delta_weight("p"), expected, atol=1e-6, rtol=0)

    unet = sd_unet()
    dt.add_adapter(unet, dt.LoraConfig(r=2, alpha=4, init="random", use_dora=True, targets=["to_q", "conv1"]), name="d")
    with torch.no_grad():
        for p in dt.adapter_params(unet, "d", role="magnitude"):
            p.mul_(1.1)
    out = dt.save_adapter(unet, tmp_path / "dora.safetensors", name="d", format="kohya")
    again = sd_unet()
    dt.load_adapter(again, out, name="d")
    torch.testing.assert_close(unet_out(again), unet_out(unet), atol=ATOL, rtol=0)
