"""``deltatune train`` on a diffusers Stable Diffusion pipeline directory: load its parts from local files,
cache the VAE latents of the images, train an adapter on the UNet (and optionally the text encoder)
with the one loop and ``DiffusionObjective``, and save it in PEFT's and diffusers' files.

    deltatune train --model SD_DIR --data photos/ --output runs/sks --resolution 512 --r 16 --alpha 16 \\
        --instance-prompt "a photo of sks dog" --class-data dogs/ --class-prompt "a photo of a dog"

``SD_DIR`` holds ``model_index.json`` and the ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/`` subfolders (``StableDiffusionPipeline.save_pretrained``'s layout: SD 1.x / 2.x);
nothing is downloaded. The adapter directory (``<output>/adapter``) holds PEFT's files for the
``DiffusionModel`` (``deltatune.load_adapter`` reads them back), and ``pytorch_lora_weights.safetensors``,
which ``StableDiffusionPipeline.from_pretrained(SD_DIR).load_lora_weights(<output>/adapter)`` loads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltatune.train.args import FULL, DataArgs, TrainArgs, TrainError, resolve_device
from deltatune.train.diffusion import DiffusionModel, DiffusionObjective, NoiseSchedule

if TYPE_CHECKING:
    from deltatune.train.loop import TrainResult

__all__ = ["UNET_TARGETS", "TEXT_ENCODER_TARGETS", "DiffusionParts", "is_diffusion_model", "load_diffusion_parts",
           "default_targets", "train_diffusion"]

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections: what LoRA trains by default (diffusers' DreamBooth/text-to-image scripts)."""
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP's attention projections: trained too with --train-text-encoder."""


@dataclass
class DiffusionParts:
    """A pipeline's parts that training uses."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict


def is_diffusion_model(path: str) -> bool:
    """Whether ``path`` is a diffusers pipeline directory (``model_index.json`` or ``unet/config.json``)."""
    p = Path(path) if path else None
    return p is not None and p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file())


def load_diffusion_parts(path: str) -> DiffusionParts:
    """UNet, VAE, text encoder, tokenizer and scheduler config of pipeline directory ``path``, from local files
    only, in float32. Raises ``ModelLoadError`` naming what is missing or not supported."""
    from deltatune.hub import ModelLoadError

    root = Path(path)
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / name).is_dir()]
    if missing:
        raise ModelLoadError(f"{root}: not a diffusers pipeline directory (missing {', '.join(m + '/' for m in missing)})")
    if (root / "text_encoder_2").is_dir():
        raise ModelLoadError(f"{root}: a pipeline with two text encoders (SDXL) is not supported yet; SD 1.x / 2.x are")
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ModelLoadError(f"diffusion models need diffusers: pip install 'deltatune[diffusion]' ({e})") from None
    try:
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        unet = diffusers.UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
        vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            text_encoder = transformers.CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                                                      local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot load the pipeline {root}: {e}") from None
    return DiffusionParts(unet.float(), vae.float(), text_encoder.float(), tokenizer, scheduler_config)


def default_targets(train_text_encoder: bool) -> str:
    """The target regex (over ``DiffusionModel``'s module paths) of the UNet's attention projections, and
    with ``train_text_encoder`` the text encoder's."""
    def alternatives(names):
        return "|".join(n.replace(".", r"\.") for n in names)

    spec = rf"unet\..*\.({alternatives(UNET_TARGETS)})"
    if train_text_encoder:
        spec += rf"|text_encoder\..*\.({alternatives(TEXT_ENCODER_TARGETS)})"
    return spec


def _check(args: TrainArgs, data: DataArgs, method) -> None:
    """Settings that a diffusion run cannot follow, refused before anything loads."""
    if args.method == FULL or method is None:
        raise TrainError("--method full is not supported for diffusion models; train an adapter (--method lora)")
    refused = {"--merge": args.merge, "--quant": args.quant, "--tokens-per-step": args.tokens_per_step,
               "--val-data / --val-fraction": data.val_data or data.val_fraction > 0,
               "--teacher": getattr(args, "teacher", None)}
    given = [flag for flag, value in refused.items() if value]
    if given:
        raise TrainError(f"{', '.join(given)}: not supported for diffusion models (the loss of a noise-prediction "
                         f"step is an estimate at random timesteps; merge with diffusers' fuse_lora after loading)")
    if args.save_format == "kohya" and args.method not in ("lora", "loha", "lokr"):
        raise TrainError(f"--save-format kohya: kohya files carry LoRA, LoHa and LoKr, not {args.method}")
    if args.prior_loss_weight < 0:
        raise TrainError(f"--prior-loss-weight must be >= 0, got {args.prior_loss_weight}")
    if data.class_prompt and not data.class_data:
        raise TrainError("--class-prompt needs --class-data (a folder of class images for prior preservation)")
    if data.resolution <= 0:
        raise TrainError(f"--resolution must be positive, got {data.resolution}")


def train_diffusion(args: TrainArgs, data: DataArgs, method=None, log=print) -> "TrainResult":
    """``deltatune train`` for a Stable Diffusion pipeline at ``args.model``: encode the images of
    ``data.data`` (and ``data.class_data``) once, then train ``method`` (default LoRA on the UNet's
    attention projections, ``--train-text-encoder`` adds CLIP's) with the noise-prediction loss.
    Returns the loop's ``TrainResult``. Raises ``TrainError``, ``DataError`` or ``ModelLoadError``."""
    import deltatune.train.checkpoint as ckpt
    from deltatune.train.image_data import load_image_data
    from deltatune.train.loop import resolve_method, train

    method = resolve_method(args, method)
    _check(args, data, method)
    out = Path(args.output)
    existing = ckpt.list_checkpoints(out / "checkpoints")
    if existing and not args.resume:  # said before minutes of encoding (the loop's setup says it again)
        raise TrainError(f"{out} already holds checkpoints (newest: step {existing[-1][0]}); pass --resume to "
                         f"continue that run, or choose another --output")
    if getattr(method, "targets", None) == "all-linear":  # the config's default: diffusion's own default instead
        method = method.replace(targets=default_targets(args.train_text_encoder))
    log(f"loading {args.model} ...")
    parts = load_diffusion_parts(args.model)
    try:
        schedule = NoiseSchedule(parts.scheduler_config, None if args.prediction_type == "auto" else args.prediction_type)
    except ValueError as e:
        raise TrainError(f"{args.model}/scheduler: {e}") from None
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)  # SD's VAE: 8
    if data.resolution % factor:
        raise TrainError(f"--resolution must be a multiple of {factor} (the VAE downsamples by {factor}), "
                         f"got {data.resolution}")
    device = resolve_device(args.device)
    vae = parts.vae.to(device)
    vae_file = next(iter(sorted((Path(args.model) / "vae").glob("*.safetensors"))), None)
    vae_key = json.dumps([str(Path(args.model).resolve()), vae_file.stat().st_mtime_ns if vae_file else 0])
    train_ds = load_image_data(data.data, parts.tokenizer, vae, device, data.resolution, args.micro_batch,
                               data.instance_prompt, data.class_data, data.class_prompt, out / "latents", vae_key, log)
    vae_config = vae.config
    parts.vae = vae = None  # the VAE is not needed again: free its memory before training
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(train_ds.summary() + f"; {data.resolution}x{data.resolution}, latents "
        f"{tuple(train_ds.examples[0]['latent_mean'].shape)}, {schedule.prediction_type} prediction over "
        f"{schedule.num_timesteps} timesteps" + ("; prior preservation, weight "
                                                 f"{args.prior_loss_weight}" if data.class_data else ""))
    objective = DiffusionObjective(schedule, float(vae_config.scaling_factor), getattr(vae_config, "shift_factor", None),
                                   args.prior_loss_weight)
    model = DiffusionModel(parts.unet, parts.text_encoder)
    args = dataclasses.replace(args, fast=False)  # the fused path fuses decoder LMs, not UNets
    data = dataclasses.replace(data, task="diffusion")
    return train(args, data, method, model=model, tokenizer=parts.tokenizer, train_data=train_ds, log=log,
                 objective=objective)

