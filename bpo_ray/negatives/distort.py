"""Image weakening: pure functions on float tensors ``[C, H, W]`` in [0, 1]. No Ray here.

The paper's distortion is the diffusion forward process (as in VCD): a 1000-step sigmoid beta schedule,
``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε``, default step 900. The authors apply it to the processor-normalised
pixel tensor; we apply it in DDPM's own [-1, 1] pixel space, at the size the processor feeds the model
(``models.vision``), and return a real image, so any engine (vLLM, an HTTP endpoint) can take it. Gaussian noise, blur, random crop and random mask are the
other, milder weakenings; all compose, in config order, with one seeded generator per sample.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bpo_ray.models.vision import ModelInputSize, fit

NUM_STEPS = 1000


@lru_cache(maxsize=1)
def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t for t in [0, 999]: betas = sigmoid(linspace(-6, 6, 1000)) · (5e-3 − 1e-5) + 1e-5."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def noise_level(step: int) -> float:
    """Std of the noise at ``step`` (sqrt(1-ᾱ_t)); the signal keeps sqrt(ᾱ_t)."""
    return float(torch.sqrt(1.0 - alphas_cumprod()[step]))


def diffusion_forward(x0: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """q(x_t | x_0) on any tensor (no clipping): the textbook forward process."""
    if not 0 <= step < NUM_STEPS:
        raise ValueError(f"diffusion step must be in [0, {NUM_STEPS - 1}], got {step}")
    abar = alphas_cumprod()[step].to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def diffusion(image: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    x0 = image * 2 - 1  # DDPM's data range
    return ((diffusion_forward(x0, step, generator) + 1) / 2).clamp(0, 1)


def gaussian(image: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (image + std * torch.randn(image.shape, generator=generator, dtype=image.dtype)).clamp(0, 1)


def blur(image: torch.Tensor, radius: float) -> torch.Tensor:
    """Separable gaussian blur with sigma = radius (pixels)."""
    if radius <= 0:
        return image
    half = max(1, int(3 * radius))
    x = torch.arange(-half, half + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * radius**2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = image.unsqueeze(0)
    out = F.conv2d(F.pad(out, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(F.pad(out, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out.squeeze(0)


def _box(h: int, w: int, fraction: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random box covering ~fraction of the area, aspect kept: (top, left, height, width)."""
    scale = float(np.sqrt(min(max(fraction, 0.0), 1.0)))
    bh, bw = max(1, round(h * scale)), max(1, round(w * scale))
    top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
    return top, left, bh, bw


def crop(image: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Keep a random window of (1 - fraction) of the area, resized back: part of the scene goes missing."""
    _, h, w = image.shape
    top, left, bh, bw = _box(h, w, 1.0 - fraction, generator)
    window = image[:, top:top + bh, left:left + bw].unsqueeze(0)
    return F.interpolate(window, size=(h, w), mode="bilinear", align_corners=False).squeeze(0)


def mask(image: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Grey out a random box covering ``fraction`` of the area."""
    _, h, w = image.shape
    top, left, bh, bw = _box(h, w, fraction, generator)
    out = image.clone()
    out[:, top:top + bh, left:left + bw] = 0.5
    return out


def apply(image: torch.Tensor, distortions: list[dict], seed: int) -> torch.Tensor:
    """Compose distortions (dicts with ``kind``, ``step``, ``strength``) with one generator per sample."""
    generator = torch.Generator().manual_seed(seed)
    for spec in distortions:
        kind = spec["kind"]
        if kind == "diffusion":
            image = diffusion(image, int(spec["step"]), generator)
        elif kind == "gaussian":
            image = gaussian(image, float(spec["strength"]), generator)
        elif kind == "blur":
            image = blur(image, float(spec["strength"]))
        elif kind == "crop":
            image = crop(image, float(spec["strength"]), generator)
        elif kind == "mask":
            image = mask(image, float(spec["strength"]), generator)
        else:
            raise ValueError(f"unknown distortion {kind!r}")
    return image


def describe(distortions: list[dict]) -> str:
    """The parameters that matter per kind, as JSON: what the pairs table records."""
    keep = {"diffusion": ("step",), "gaussian": ("strength",), "blur": ("strength",), "crop": ("strength",),
            "mask": ("strength",)}
    return json.dumps([{"kind": d["kind"], **{k: d[k] for k in keep[d["kind"]]}} for d in distortions])


# --------------------------------------------------------------------------------------- image ↔ tensor
def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def weaken_bytes(data: bytes, distortions: list[dict], seed: int, size: ModelInputSize | None = None) -> bytes:
    """Encoded image → weakened PNG (lossless, so the weakening is exactly what the model sees). ``size``: the
    model's input size (``models.vision``), at which the weakening is applied, so its strength does not
    depend on the source's resolution."""
    with Image.open(io.BytesIO(data)) as img:
        source = fit(img.convert("RGB"), size) if size is not None else img
        weakened = to_image(apply(to_tensor(source), distortions, seed))
    buf = io.BytesIO()
    weakened.save(buf, format="PNG")
    return buf.getvalue()
