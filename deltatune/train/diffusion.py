"""Diffusion models in the one training loop: the DDPM noise schedule, the noise-prediction loss and
DreamBooth's prior preservation, as a training objective (``deltatune.train.objective``).

A step draws, for every latent x0 of the batch (``deltatune.train.image_data``: VAE latents cached
once, one sample of the encoder's Gaussian per step), a timestep t ~ U{0, ..., T-1} and noise
ε ~ N(0, I), forms the noisy latent of DDPM (Ho et al. 2020, eq. 4)

    x_t = α_t · x0 + σ_t · ε,        α_t = sqrt(ᾱ_t),  σ_t = sqrt(1 - ᾱ_t),  ᾱ_t = Π_{s<=t} (1 - β_s)

and regresses the UNet's output, conditioned on the caption's text-encoder states, on the target of
the scheduler's ``prediction_type``: ε ("epsilon"), v = α_t · ε - σ_t · x0 ("v_prediction",
Salimans & Ho 2022, sec. 4) or x0 ("sample"). The loss of an example is the mean squared error over
its latent's elements. With prior preservation (DreamBooth, Ruiz et al. 2022, eq. 2) every instance
example brings a class example (a class image and the class prompt) whose loss counts with weight
``prior_loss_weight``; the step's loss is then mean(instance) + weight · mean(class), as diffusers'
DreamBooth scripts compute it, because the loop divides the summed loss by the instance rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from deltatune.train.loop import Run

__all__ = ["PREDICTION_TYPES", "KOHYA_NAME", "NoiseSchedule", "DiffusionModel", "DiffusionObjective", "ImageMeter",
           "noise_loss", "save_kohya"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What the UNet predicts, by diffusers' scheduler names."""


class NoiseSchedule:
    """DDPM's forward process from a diffusers ``scheduler_config.json`` dict: ``betas`` (T,) and
    ``alphas_cumprod`` (T,), float32 as diffusers' schedulers hold them, and the training target.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` ("linear",
    "scaled_linear", "squaredcos_cap_v2"), ``trained_betas``, ``rescale_betas_zero_snr`` and
    ``prediction_type``; ``prediction_type`` given here overrides the config's. Raises ValueError
    naming the key for a setting it cannot follow."""

    def __init__(self, config: dict, prediction_type: Optional[str] = None):
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif kind == "scaled_linear":  # latent diffusion's: linear in sqrt(beta)
            betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17: from a cosine alpha-bar, beta <= 0.999
            def bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - bar((i + 1) / steps) / bar(i / steps), 0.999) for i in range(steps)],
                                 dtype=torch.float32)
        else:
            raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported (linear, scaled_linear, "
                             f"squaredcos_cap_v2, or trained_betas)")
        if config.get("rescale_betas_zero_snr"):
            betas = _zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r}: expected one of {PREDICTION_TYPES}")

    @property
    def num_timesteps(self) -> int:
        """T: the timesteps a training step draws from."""
        return self.betas.numel()

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of timesteps ``t`` (N,), shaped (N, 1, 1, ...) to broadcast over ``like``, float32."""
        bar = self.alphas_cumprod.to(t.device)[t].float()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return bar.sqrt().view(shape), (1.0 - bar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t · x0 + σ_t · ε."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should predict: ε, v = α_t · ε - σ_t · x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that ᾱ_T = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1): shift and scale sqrt(ᾱ) to end at 0 while keeping its first value."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    bar = root ** 2
    alphas = torch.cat([bar[:1], bar[1:] / bar[:-1]])
    return 1.0 - alphas


class DiffusionModel(nn.Module):
    """What trains: a conditional UNet and the text encoder of its captions (the VAE stays outside:
    latents are encoded once, before training). Adapters go on this module, so module paths read
    ``unet.<...>`` and ``text_encoder.<...>``, diffusers' own prefixes for LoRA files."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (N, C, h, w) for ``noisy`` latents at ``timesteps``, conditioned on the
        last hidden states of ``input_ids`` (N, L) through the text encoder."""
        states = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, encoder_hidden_states=states).sample

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the UNet's (and a trained text encoder's) activations in the backward pass."""
        self.unet.enable_gradient_checkpointing()
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            self.text_encoder.gradient_checkpointing_enable(**kwargs)


def noise_loss(model: DiffusionModel, schedule: NoiseSchedule, x0: torch.Tensor, input_ids: torch.Tensor,
               noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error (N,) of ``model``'s prediction for x_t against the schedule's target."""
    pred = model(schedule.add_noise(x0, noise, timesteps).to(x0.dtype), timesteps, input_ids)
    err = F.mse_loss(pred.float(), schedule.target(x0, noise, timesteps).float(), reduction="none")
    return err.flatten(1).mean(1)


class DiffusionObjective:
    """The noise-prediction loss on cached latents as the loop's objective (``deltatune.train.objective``).

    Examples (``image_data.latent_examples``) hold ``input_ids`` (the caption, padded to the
    tokenizer's length), ``latent_mean`` and ``latent_std`` (the VAE encoder's Gaussian, unscaled) and,
    with prior preservation, ``prior``: a class example of the same form. ``scaling_factor`` and
    ``shift_factor`` are the VAE config's: x0 = (latent - shift) · scale.
    """

    def __init__(self, schedule: NoiseSchedule, scaling_factor: float, shift_factor: Optional[float] = None,
                 prior_loss_weight: float = 1.0):
        self.schedule, self.scaling_factor, self.shift_factor = schedule, scaling_factor, shift_factor or 0.0
        self.prior_loss_weight = prior_loss_weight

    def collate(self, examples: list[dict]) -> dict:
        """``input_ids`` (N, L), ``latent_mean`` / ``latent_std`` (N, C, h, w) and ``instance`` (N,) bool:
        the instance rows first, then their class rows when the examples bring them."""
        rows = examples + [ex["prior"] for ex in examples if "prior" in ex]
        return {"input_ids": torch.tensor([ex["input_ids"] for ex in rows], dtype=torch.long),
                "latent_mean": torch.stack([ex["latent_mean"] for ex in rows]),
                "latent_std": torch.stack([ex["latent_std"] for ex in rows]),
                "instance": torch.arange(len(rows)) < len(examples)}

    def targets(self, batch: dict) -> int:
        """The instance rows: the step's loss is their mean (plus the weighted mean of the class rows)."""
        return int(batch["instance"].sum())

    def latents(self, batch: dict, device) -> torch.Tensor:
        """x0: one sample of each row's cached Gaussian, shifted and scaled as the VAE config says (float32)."""
        mean = batch["latent_mean"].to(device, non_blocking=True).float()
        std = batch["latent_std"].to(device, non_blocking=True).float()
        return (mean + std * torch.randn_like(mean) - self.shift_factor) * self.scaling_factor

    def batch_loss(self, model, batch: dict, device, autocast, fast: bool = False):
        """(Σ instance losses + prior_loss_weight · Σ class losses, instance rows, None); draws x0, ε and t
        from torch's generator, which the loop seeds from (seed, step)."""
        x0 = self.latents(batch, device)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=device)
        ids = batch["input_ids"].to(device, non_blocking=True)
        with autocast():
            per_row = noise_loss(model, self.schedule, x0, ids, noise, timesteps)
        instance = batch["instance"].to(device)
        weights = torch.where(instance, 1.0, self.prior_loss_weight)
        return (per_row * weights).sum(), int(batch["instance"].sum()), None

    def meter(self, model, device: torch.device, amp_dtype) -> "ImageMeter":
        """Images/s and memory."""
        return ImageMeter(device)

    def save_outputs(self, run: "Run") -> Path:
        """The trained adapter in ``<output>/adapter``: PEFT's files (the ``DiffusionModel``'s module paths),
        diffusers' ``pytorch_lora_weights.safetensors`` (LoRA) and ``deltatune_train.json``."""
        import deltatune as dt
        from deltatune.formats.diffusers_lora import save_diffusers_lora
        from deltatune.hub import base_reference
        from deltatune.train.outputs import RUN_INFO, write_json

        base = base_reference(run.args.model)
        target = dt.save_adapter(run.model, run.out / "adapter", name="default",
                                 base_model=base["base_model_name_or_path"])
        if run.args.method == "lora":
            save_diffusers_lora(run.model, target, "default")
        if run.args.save_format == "kohya":
            save_kohya(run.model, target / KOHYA_NAME, "default")
        write_json(target / RUN_INFO, {
            "base_model": base["base_model"], "task": "diffusion", "method": run.args.method, "label_names": None,
            "data_format": run.train_data.fmt, "resolution": run.data.resolution,
            "prediction_type": self.schedule.prediction_type})
        return target


KOHYA_NAME = "kohya.safetensors"
"""The kohya / LyCORIS file a diffusion run writes beside PEFT's with --save-format kohya."""


def save_kohya(model: DiffusionModel, path: Path, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` (its UNet and text encoder parts) as one kohya / LyCORIS file
    (``formats/kohya.py``: ``lora_unet_*`` / ``lora_te_*`` modules, alpha per module); returns the path."""
    import dataclasses

    from deltatune.adapters import adapter_record, describe_adapter
    from deltatune.formats import kohya

    parts = describe_adapter(model, name)
    if getattr(adapter_record(model).configs[name], "use_rslora", False):  # kohya's scale is alpha / r
        parts = {p: dataclasses.replace(part, settings={**part.settings, "alpha": part.settings["alpha"]
                                                        * math.sqrt(part.settings["rank"])})
                 for p, part in parts.items()}
    tensors = {}
    for component in ("unet", "text_encoder"):
        mine = {p[len(component) + 1:]: part for p, part in parts.items() if p.startswith(component + ".")}
        if mine:
            tensors.update(kohya.file_tensors(mine, kohya.prefix_for(component, False),
                                              kohya.model_namer(getattr(model, component), component)))
    return kohya.write_file(path, tensors, {})


class ImageMeter:
    """A step's throughput on images: rows (instance and class) per second, and peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, batches: list[dict], seconds: float) -> dict:
        """{images, images_s, mem_gib and mem_reserved_gib (CUDA)}."""
        images = sum(b["input_ids"].shape[0] for b in batches)
        out = {"images": images, "images_s": images / max(seconds, 1e-9)}
        if self.device.type == "cuda":
            out["mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            out["mem_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)
        return out
