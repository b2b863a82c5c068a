"""Diffusion LoRA through the one training loop: a tiny Stable Diffusion pipeline with random weights
(UNet, VAE, CLIP text encoder, a byte-level CLIP tokenizer, DDPM scheduler) saved in diffusers' layout.

Checks: the noise schedule equals diffusers' DDPMScheduler; the step's loss equals a float64 reference
written from the formulas (ε and v = α_t·ε - σ_t·x0 targets) with the scheduler's ᾱ_t; prior preservation
adds the class rows' loss with its weight; latents are encoded once per image and then read from the
cache; ``deltatune train`` end to end (loss falls, only LoRA tensors train), and diffusers'
``load_lora_weights`` on the saved adapter gives the outputs of the trained model.
"""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusion training needs diffusers")
pytest.importorskip("PIL", reason="image data needs Pillow")

import deltatune as dt  # noqa: E402
from deltatune.train.diffusion import DiffusionModel, DiffusionObjective, NoiseSchedule  # noqa: E402
from deltatune.train.diffusion_run import default_targets, load_diffusion_parts  # noqa: E402
from deltatune.train.image_data import load_image_data  # noqa: E402

RES = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8 latents
IDS = 32  # the tiny tokenizer's length (CLIP's: 77)


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these models are so small that a second thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer(folder: Path):
    """A CLIP tokenizer over single bytes (no merges): 2 x 256 byte symbols and the two specials."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=IDS)


def _parts(tmp: Path, prediction_type: str = "epsilon"):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tokenizer(tmp / "vocab")
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=RES // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=RES)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=IDS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    return unet, vae, text, tok, scheduler


def _images(folder: Path, n: int, seed: int, captions: bool = True) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):  # smooth colour fields of different sizes (resized and cropped to RES)
        w, h = 20 + 4 * i, 16 + 2 * i
        base = torch.rand(3, 1, 1, generator=g) * 255
        ramp = torch.linspace(0, 60, w).view(1, 1, w) * torch.rand(3, 1, 1, generator=g)
        pixels = (base + ramp).clamp(0, 255).expand(3, h, w).permute(1, 2, 0).to(torch.uint8).contiguous()
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline (random weights) saved in diffusers' directory layout."""
    tmp = tmp_path_factory.mktemp("sd")
    unet, vae, text, tok, scheduler = _parts(tmp)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "pipeline")
    return tmp / "pipeline"


# -- the schedule and the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=500),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
])
def test_schedule_equals_diffusers(config):
    ours = NoiseSchedule(config)
    ref = diffusers.DDPMScheduler(**config)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    t = torch.tensor([0, 17, 499])
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))


def _examples(n: int, ids_len: int = IDS, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 500, (ids_len,), generator=g).tolist(),
             "latent_mean": torch.randn(4, 8, 8, generator=g), "latent_std": torch.rand(4, 8, 8, generator=g) * 0.1}
            for _ in range(n)]


def _reference(model, scheduler, batch, scale: float, seed: int, prediction_type: str) -> torch.Tensor:
    """Per-row loss from the formulas, in float64 where no model runs: the draws in the objective's order
    (latent sample, ε, t), x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε, target ε or v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0."""
    torch.manual_seed(seed)
    mean, std = batch["latent_mean"].double(), batch["latent_std"].double()
    x0 = (mean + std * torch.randn_like(batch["latent_mean"]).double()) * scale
    noise = torch.randn_like(batch["latent_mean"]).double()
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
    bar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    xt = bar.sqrt() * x0 + (1 - bar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else bar.sqrt() * noise - (1 - bar).sqrt() * x0
    with torch.no_grad():
        pred = model.unet(xt.float(), t, encoder_hidden_states=model.text_encoder(batch["input_ids"])[0]).sample
    return ((pred.double() - target) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_equals_reference(tmp_path, prediction_type):
    unet, _, text, _, scheduler = _parts(tmp_path, prediction_type)
    model = DiffusionModel(unet, text)
    objective = DiffusionObjective(NoiseSchedule(dict(scheduler.config)), scaling_factor=0.18215)
    assert objective.schedule.prediction_type == prediction_type
    batch = objective.collate(_examples(3))
    torch.manual_seed(5)
    with torch.no_grad():
        loss, n, _ = objective.batch_loss(model, batch, torch.device("cpu"), _nullcontext)
    ref = _reference(model, scheduler, batch, 0.18215, 5, prediction_type)
    assert n == 3 and objective.targets(batch) == 3
    torch.testing.assert_close(loss.double(), ref.sum(), rtol=2e-5, atol=1e-6)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_prior_preservation_adds_weighted_class_loss(tmp_path):
    unet, _, text, _, scheduler = _parts(tmp_path)
    model = DiffusionModel(unet, text)
    instance, prior = _examples(2, seed=1), _examples(2, seed=2)
    for ex, p in zip(instance, prior):
        ex["prior"] = p
    losses = {}
    for weight in (0.0, 0.7):
        objective = DiffusionObjective(NoiseSchedule(dict(scheduler.config)), 0.18215, prior_loss_weight=weight)
        batch = objective.collate(instance)
        assert batch["input_ids"].shape[0] == 4 and batch["instance"].tolist() == [True, True, False, False]
        assert objective.targets(batch) == 2  # the loop divides by the instance rows
        torch.manual_seed(9)
        with torch.no_grad():
            losses[weight] = objective.batch_loss(model, batch, torch.device("cpu"), _nullcontext)[0].double()
    rows = _reference(model, scheduler, batch, 0.18215, 9, "epsilon")
    torch.testing.assert_close(losses[0.0], rows[:2].sum(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(losses[0.7], rows[:2].sum() + 0.7 * rows[2:].sum(), rtol=2e-5, atol=1e-6)


# -- data: latents cached once -------------------------------------------------------------------------------------
def test_latents_encoded_once_and_cached(tmp_path, sd_dir):
    parts = load_diffusion_parts(str(sd_dir))
    data = _images(tmp_path / "imgs", 4, seed=0)
    classes = _images(tmp_path / "cls", 3, seed=1, captions=False)
    encoded = []
    encode = parts.vae.encode

    def counting(pixels, *a, **k):
        encoded.append(pixels.shape[0])
        return encode(pixels, *a, **k)

    parts.vae.encode = counting
    kw = dict(class_data=str(classes), class_prompt="a photo of a thing", cache_dir=tmp_path / "cache", log=lambda m: None)
    ds = load_image_data(str(data), parts.tokenizer, parts.vae, "cpu", RES, batch_size=3, **kw)
    assert sum(encoded) == 4 + 3  # every image once, instance and class
    assert len(ds) == 4 and ds.task == "diffusion"
    assert ds.examples[3]["prior"] is not None and ds.examples[0]["latent_mean"].shape == (4, RES // 2, RES // 2)
    with torch.no_grad():  # the cached Gaussian is the VAE's own
        from deltatune.train.image_data import load_pixels

        dist = encode(load_pixels(data / "img2.png", RES)[None]).latent_dist
    torch.testing.assert_close(ds.examples[2]["latent_mean"], dist.mean[0])
    torch.testing.assert_close(ds.examples[2]["latent_std"], dist.std[0])
    again = load_image_data(str(data), parts.tokenizer, parts.vae, "cpu", RES, batch_size=3, **kw)
    assert sum(encoded) == 7  # read from the cache: no encode
    torch.testing.assert_close(again.examples[1]["latent_mean"], ds.examples[1]["latent_mean"])
    (data / "img0.txt").write_text("another caption")  # captions are not part of the latents
    (data / "img9.png").write_bytes((data / "img1.png").read_bytes())
    (data / "img9.txt").write_text("a copy")
    load_image_data(str(data), parts.tokenizer, parts.vae, "cpu", RES, batch_size=3, **kw)
    assert sum(encoded) == 7 + 5  # a changed image set is encoded anew


def test_jsonl_data_and_bad_rows(tmp_path):
    from deltatune.train.formats import DataError
    from deltatune.train.image_data import read_image_captions

    _images(tmp_path / "imgs", 2, seed=0, captions=False)
    rows = [{"image": "imgs/img0.png", "caption": "one"}, {"file_name": "imgs/img1.png", "text": "two"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = read_image_captions(tmp_path / "d.jsonl")
    assert [(p.name, c) for p, c in pairs] == [("img0.png", "one"), ("img1.png", "two")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "imgs/nope.png", "caption": "x"}))
    with pytest.raises(DataError, match="line 1: image .*nope.png does not exist"):
        read_image_captions(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="img0.png: no caption file img0.txt"):
        read_image_captions(tmp_path / "imgs")
    assert read_image_captions(tmp_path / "imgs", "sks")[1][1] == "sks"


# -- end to end ---------------------------------------------------------------------------------------------------
def test_cli_trains_lora_and_diffusers_loads_it(tmp_path, sd_dir):
    from deltatune.cli import main
    from safetensors.torch import load_file

    data = _images(tmp_path / "imgs", 4, seed=0)
    out = tmp_path / "run"
    # the attention projections and, so that 30 steps of a UNet this small show it learning, its first and
    # last convolutions (LoRA on Conv2d, which diffusers' file carries too); and two of CLIP's projections
    targets = r"unet\.(conv_in|conv_out)|unet\..*\.(to_q|to_k|to_v|to_out\.0)|text_encoder\..*\.(q_proj|v_proj)"
    code = main(["train", "--model", str(sd_dir), "--data", str(data), "--output", str(out), "--resolution", str(RES),
                 "--max-steps", "30", "--micro-batch", "4", "--lr", "1e-2", "--r", "4", "--alpha", "8",
                 "--targets", targets, "--schedule", "constant", "--save-every", "0", "--no-progress", "--seed", "0",
                 "--save-format", "kohya"])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:8]) / 8, losses
    record = json.loads((out / "train_args.json").read_text())
    assert record["task"] == "diffusion" and record["resolution"] == RES
    adapter = out / "adapter"
    assert json.loads((adapter / "deltatune_train.json").read_text())["task"] == "diffusion"

    # the checkpoint holds what trained: LoRA's A and B on the targets, nothing else
    ckpt = next((out / "checkpoints").iterdir())
    trained = list(load_file(str(ckpt / "trainable.safetensors")))
    assert trained and all(".deltas.default." in k for k in trained), trained[:5]
    assert {k.split(".deltas")[0].rsplit(".", 1)[-1] for k in trained if k.startswith("unet.")} == {
        "to_q", "to_k", "to_v", "0", "conv_in", "conv_out"}
    assert {k.split(".deltas")[0].rsplit(".", 1)[-1] for k in trained if k.startswith("text_encoder.")} == {
        "q_proj", "v_proj"}

    # ours (PEFT-format adapter on the DiffusionModel) and diffusers' pipeline with our LoRA file agree
    parts = load_diffusion_parts(str(sd_dir))
    ours = DiffusionModel(parts.unet, parts.text_encoder)
    dt.load_adapter(ours, adapter)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.load_lora_weights(str(adapter))
    x, t = torch.randn(2, 4, RES // 2, RES // 2), torch.tensor([10, 600])
    ids = parts.tokenizer(["a photo of thing 1", "x"], padding="max_length", max_length=IDS, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        mine = ours(x, t, ids)
        with dt.disabled(ours):
            base = ours(x, t, ids)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert (mine - base).abs().max() > 1e-3  # the adapter changed the output: the comparison means something

    # --save-format kohya: one kohya file (lora_unet_* / lora_te_* modules), read back onto a fresh UNet and
    # text encoder: the same outputs
    fresh = load_diffusion_parts(str(sd_dir))
    dt.load_adapter(fresh.unet, adapter / "kohya.safetensors", component="unet")
    dt.load_adapter(fresh.text_encoder, adapter / "kohya.safetensors", component="text_encoder")
    with torch.no_grad():
        kohya_out = fresh.unet(x, t, encoder_hidden_states=fresh.text_encoder(ids)[0]).sample
    torch.testing.assert_close(kohya_out, mine, rtol=1e-4, atol=1e-5)


def test_train_text_encoder_targets_and_refusals(tmp_path, sd_dir):
    from deltatune.train.args import DataArgs, TrainArgs, TrainError
    from deltatune.train.diffusion_run import train_diffusion

    parts = load_diffusion_parts(str(sd_dir))
    model = DiffusionModel(parts.unet, parts.text_encoder)
    dt.add_adapter(model, dt.LoraConfig(r=2, targets=default_targets(True)))
    paths = [p for p, _ in dt.adapters.adapter_modules(model)]
    assert any(p.startswith("text_encoder.") and p.endswith("q_proj") for p in paths)
    assert any(p.startswith("unet.") and p.endswith("to_out.0") for p in paths)
    assert all(p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"}
               for p in paths)
    data = DataArgs(data=str(tmp_path), resolution=RES)
    with pytest.raises(TrainError, match="--merge"):
        train_diffusion(TrainArgs(model=str(sd_dir), output=str(tmp_path / "o"), merge=True), data)
    with pytest.raises(TrainError, match="multiple of 2"):
        train_diffusion(TrainArgs(model=str(sd_dir), output=str(tmp_path / "o")),
                        DataArgs(data=str(tmp_path), resolution=15), log=lambda m: None)


def test_resume_and_checkpointing_give_the_uninterrupted_run(tmp_path, sd_dir):
    """4 steps in one go equal 2 steps + --resume to 4 with diffusers' gradient checkpointing (same draws: ε, t
    and the latent samples come from the step's seed); class images with prior preservation on both."""
    from safetensors.torch import load_file

    from deltatune.train.args import DataArgs, TrainArgs
    from deltatune.train.diffusion_run import train_diffusion

    data = _images(tmp_path / "imgs", 3, seed=0)
    classes = _images(tmp_path / "cls", 2, seed=3, captions=False)
    runs = {}
    for name, steps, extra in (("one", [4], {}), ("two", [2, 4], {"gradient_checkpointing": True})):
        for i, max_steps in enumerate(steps):
            args = TrainArgs(model=str(sd_dir), output=str(tmp_path / name), max_steps=max_steps, resume=i > 0,
                             prior_loss_weight=0.5, save_every=2, lr=1e-2, schedule="constant", micro_batch=2,
                             progress=False, device="cpu", **extra)
            result = train_diffusion(args, DataArgs(data=str(data), resolution=RES, class_data=str(classes),
                                                    class_prompt="a thing"), dt.LoraConfig(r=2, alpha=4),
                                     log=lambda m: None)
        assert result.status == "done" and result.step == 4
        runs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert runs["one"].keys() == runs["two"].keys()
    for key in runs["one"]:
        torch.testing.assert_close(runs["two"][key], runs["one"][key], rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in runs["one"].items() if "lora_B" in k)
