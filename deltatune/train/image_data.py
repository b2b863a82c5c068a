"""Image-caption data for diffusion training: a folder of images with same-name ``.txt`` captions, or a
JSONL file of ``{"image": path, "caption": text}`` rows; images resized (shorter side) and center-cropped
to the resolution, encoded by the VAE once and cached.

    photos/               cat1.png + cat1.txt ("a photo of sks cat"), cat2.jpg + cat2.txt, ...
    train.jsonl           {"image": "imgs/1.png", "caption": "a red chair"}   (paths relative to the file)

JSONL rows may also name the image ``file_name`` (Hugging Face's imagefolder ``metadata.jsonl``) or
``image_path``, and the caption ``text`` or ``prompt``. An image without a caption takes
``--instance-prompt`` (DreamBooth's one prompt for all images) or is an error naming it.

The encoder's Gaussian (its mean and standard deviation, before the VAE's scaling factor) is what is
cached: each training step draws a fresh sample from it, as diffusers' scripts do with
``--cache_latents``. The cache is a safetensors file under ``<output>/latents/`` whose name carries a
fingerprint of the images (paths, sizes, modification times), the resolution and the VAE, so a
resumed run reads it instead of encoding again and a changed input is encoded anew.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from deltatune.train.data import Dataset
from deltatune.train.formats import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_image_captions", "load_pixels", "encode_latents", "latent_examples",
           "load_image_data"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_IMAGE_KEYS = ("image", "file_name", "image_path")
_CAPTION_KEYS = ("caption", "text", "prompt")


def read_image_captions(path: str | Path, default_caption: Optional[str] = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder (images + same-name .txt files) or a JSONL file, in
    file-name / line order. Raises ``DataError`` naming the file (and line) of a bad row."""
    root = Path(path)
    if root.is_dir():
        images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        pairs = []
        for image in images:
            caption_file = image.with_suffix(".txt")
            if caption_file.is_file():
                pairs.append((image, caption_file.read_text(encoding="utf-8").strip()))
            elif default_caption is not None:
                pairs.append((image, default_caption))
            else:
                raise DataError(f"{image}: no caption file {caption_file.name}; add one, or give --instance-prompt "
                                f"for images without one")
        return pairs
    if not root.is_file():
        raise DataError(f"{root}: no such folder or file")
    pairs = []
    for line_no, line in enumerate(root.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{root}: line {line_no}: not JSON ({e.msg})") from None
        image = next((row[k] for k in _IMAGE_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        caption = next((row[k] for k in _CAPTION_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)),
                       default_caption)
        if image is None or caption is None:
            raise DataError(f"{root}: line {line_no}: a row needs an image path ({' / '.join(_IMAGE_KEYS)}) and a "
                            f"caption ({' / '.join(_CAPTION_KEYS)}, or --instance-prompt)")
        image_path = (root.parent / image) if not Path(image).is_absolute() else Path(image)
        if not image_path.is_file():
            raise DataError(f"{root}: line {line_no}: image {image_path} does not exist")
        pairs.append((image_path, caption))
    if not pairs:
        raise DataError(f"{root}: no rows")
    return pairs


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Image ``path`` as RGB (3, resolution, resolution) in [-1, 1]: the shorter side resized to
    ``resolution`` (bilinear), then the center cropped. Raises ``DataError`` for an unreadable image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            im = im.resize(size, Image.BILINEAR)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None
    pixels = data.view(resolution, resolution, 3).permute(2, 0, 1).float()  # (3, R, R) in [0, 255]
    return pixels / 127.5 - 1.0


def _fingerprint(images: list[Path], resolution: int, vae_key: str) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in images]
    text = json.dumps([resolution, vae_key, stats])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_latents(vae, images: list[Path], resolution: int, device, batch_size: int = 4,
                   cache_dir: Optional[Path] = None, vae_key: str = "", name: str = "images",
                   log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (N, C, h, w) float32 on the CPU: the VAE encoder's Gaussian of every image,
    computed once (in float32 on ``device``, ``batch_size`` images a call) or read from the cache
    file in ``cache_dir`` whose name fingerprints the images, ``resolution`` and ``vae_key``."""
    from safetensors.torch import load_file, save_file

    from deltatune.formats.atomic import atomic_write

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{name}-{_fingerprint(images, resolution, vae_key)}.safetensors"
        if cache.is_file():
            stored = load_file(str(cache))
            if stored["mean"].shape[0] == len(images):
                log(f"latents of {len(images)} {name} read from {cache}")
                return stored["mean"], stored["std"]
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([load_pixels(p, resolution) for p in images[start:start + batch_size]])
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": mean.contiguous(), "std": std.contiguous()}
        atomic_write(cache, lambda tmp: save_file(tensors, tmp, metadata={"resolution": str(resolution)}))
        log(f"latents of {len(images)} {name} encoded and cached in {cache}")
    return mean, std


def _token_ids(tokenizer, caption: str) -> tuple[list[int], bool]:
    """The caption's ids padded to the tokenizer's length (CLIP: 77), and whether it was cut."""
    length = tokenizer.model_max_length
    full = tokenizer(caption, truncation=False, verbose=False)["input_ids"]
    ids = tokenizer(caption, padding="max_length", max_length=length, truncation=True)["input_ids"]
    return list(ids), len(full) > length


def latent_examples(captions: list[str], mean: torch.Tensor, std: torch.Tensor, tokenizer) -> tuple[list[dict], int]:
    """Examples ``{"input_ids", "latent_mean", "latent_std"}`` and how many captions were cut."""
    out, cut = [], 0
    for i, caption in enumerate(captions):
        ids, truncated = _token_ids(tokenizer, caption)
        cut += truncated
        out.append({"input_ids": ids, "latent_mean": mean[i], "latent_std": std[i]})
    return out, cut


def load_image_data(path: str, tokenizer, vae, device, resolution: int, batch_size: int = 4,
                    instance_prompt: Optional[str] = None, class_data: Optional[str] = None,
                    class_prompt: Optional[str] = None, cache_dir: Optional[Path] = None, vae_key: str = "",
                    log: Callable[[str], None] = print) -> Dataset:
    """The training ``Dataset`` (task "diffusion") of image-caption data ``path``; with ``class_data``
    (a folder or JSONL of class images, captioned by their own .txt files or ``class_prompt``) each
    example also carries ``prior``, a class example (the i-th instance example takes class image
    i mod the number of class images)."""
    pairs = read_image_captions(path, instance_prompt)
    mean, std = encode_latents(vae, [p for p, _ in pairs], resolution, device, batch_size, cache_dir, vae_key,
                               "images", log)
    examples, cut = latent_examples([c for _, c in pairs], mean, std, tokenizer)
    fmt = "image-folder" if Path(path).is_dir() else "image-jsonl"
    ds = Dataset(examples, "diffusion", str(path), fmt, total_rows=len(pairs))
    if class_data:
        if class_prompt is None and Path(class_data).is_dir() and not any(Path(class_data).glob("*.txt")):
            raise DataError(f"--class-data {class_data}: give --class-prompt (the class images have no captions)")
        class_pairs = read_image_captions(class_data, class_prompt)
        c_mean, c_std = encode_latents(vae, [p for p, _ in class_pairs], resolution, device, batch_size, cache_dir,
                                       vae_key, "class-images", log)
        priors, c_cut = latent_examples([c for _, c in class_pairs], c_mean, c_std, tokenizer)
        for i, ex in enumerate(ds.examples):
            ex["prior"] = priors[i % len(priors)]
        cut += c_cut
    if cut:
        log(f"{cut} captions are longer than the text encoder's {tokenizer.model_max_length} tokens: cut there")
    return ds
