"""Image weakening math: the diffusion schedule and forward process, and the milder distortions."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from bpo_ray.negatives import distort


def test_schedule_is_the_papers_sigmoid_schedule():
    abar = distort.alphas_cumprod()
    assert abar.shape == (1000,)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    assert betas[0].item() == pytest.approx(torch.sigmoid(torch.tensor(-6.0, dtype=torch.float64)).item()
                                            * (5e-3 - 1e-5) + 1e-5, rel=1e-9)
    assert betas[-1].item() == pytest.approx(torch.sigmoid(torch.tensor(6.0, dtype=torch.float64)).item()
                                             * (5e-3 - 1e-5) + 1e-5, rel=1e-9)
    assert torch.all(abar[1:] < abar[:-1])  # monotone: more steps, less signal
    assert 0.05 < abar[900].item() < 0.3  # step 900 keeps a faint trace of the image


@pytest.mark.parametrize("step", [100, 500, 900, 999])
def test_forward_noise_level_matches_sqrt_one_minus_abar(step):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((3, 256, 256), 0.5, dtype=torch.float64)
    xt = distort.diffusion_forward(x0, step, g)
    abar = distort.alphas_cumprod()[step].item()
    assert xt.std().item() == pytest.approx((1 - abar) ** 0.5, rel=0.02)
    assert xt.mean().item() == pytest.approx(abar**0.5 * 0.5, abs=0.01)
    assert distort.noise_level(step) == pytest.approx((1 - abar) ** 0.5)


def test_step_zero_is_near_identity_and_noise_grows_with_step():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    errors = [(distort.diffusion(image, step, torch.Generator().manual_seed(2)) - image).abs().mean().item()
              for step in (0, 300, 600, 900)]
    assert errors[0] < 0.01
    assert errors == sorted(errors) and errors[-1] > 0.2


def test_same_seed_same_output_other_seed_differs():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    specs = [{"kind": "diffusion", "step": 900, "strength": 0.5}, {"kind": "mask", "step": 0, "strength": 0.2}]
    a, b, c = (distort.apply(image, specs, seed) for seed in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_blur_crop_mask():
    g = torch.Generator().manual_seed(4)
    image = torch.rand(3, 48, 48, generator=g)
    noisy = distort.gaussian(torch.full((3, 48, 48), 0.5), 0.1, g)
    assert noisy.std().item() == pytest.approx(0.1, rel=0.1)
    blurred = distort.blur(image, 2.0)
    assert blurred.shape == image.shape and blurred.std() < 0.5 * image.std()
    assert blurred.mean().item() == pytest.approx(image.mean().item(), abs=0.01)
    assert torch.equal(distort.blur(image, 0.0), image)
    cropped = distort.crop(image, 0.5, g)
    assert cropped.shape == image.shape and not torch.equal(cropped, image)
    masked = distort.mask(image, 0.25, g)
    grey = (masked == 0.5).all(dim=0).float().mean().item()
    assert grey == pytest.approx(0.25, abs=0.05)


def test_invalid_step():
    with pytest.raises(ValueError, match="diffusion step"):
        distort.diffusion_forward(torch.zeros(1), 1000, torch.Generator())


def test_weaken_bytes_returns_a_real_image_of_the_same_size():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    out = distort.weaken_bytes(buf.getvalue(), [{"kind": "diffusion", "step": 900}], seed=1)
    with Image.open(io.BytesIO(out)) as img:
        assert img.size == (40, 30) and img.format == "PNG"
    assert distort.describe([{"kind": "diffusion", "step": 900, "strength": 0.5}]) == '[{"kind": "diffusion", "step": 900}]'


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_weakening_strength_does_not_depend_on_the_source_resolution(tiny_models, arch):
    """Noise over signal in what the processor feeds the model, for one scene at its native size and at
    1600×1200: equal when the noise is added at the model's input size; averaged away by the processor's
    downsizing when it is added to the large source."""
    import numpy as np

    from bpo_ray.data.synthetic import generate as shapes
    from bpo_ray.models.loader import load_processor
    from bpo_ray.models.vision import model_input_size

    processor = load_processor(str(tiny_models[arch])).image_processor
    size = model_input_size(processor)
    scene = next(shapes(1, seed=2, image_size=64)).image.convert("RGB")
    step = [{"kind": "diffusion", "step": 900}]

    def noise_over_signal(source: Image.Image, fitted: bool) -> float:
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        with Image.open(io.BytesIO(distort.weaken_bytes(buf.getvalue(), step, 1, size if fitted else None))) as weak:
            weak_pixels = np.asarray(processor(weak.convert("RGB"))["pixel_values"], dtype=np.float64)
        clean = np.asarray(processor(source)["pixel_values"], dtype=np.float64)
        return float((weak_pixels - clean).std() / clean.std())

    large = scene.resize((1600, 1200), Image.Resampling.BICUBIC)
    native = noise_over_signal(scene, fitted=True)
    assert noise_over_signal(large, fitted=True) == pytest.approx(native, rel=0.15)
    assert noise_over_signal(large, fitted=False) < 0.6 * native  # without fitting: the old, weaker noise (0.48x)
