"""Variation seeds (A1111's subseed / subseed_strength) and hires fix, in the core."""

from __future__ import annotations

import numpy as np
import pytest

from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest, InvalidInput
from tests.parity import max_pixel_diff

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def setup(model_repository):
    assets = PipelineAssets.load(model_repository / "pipeline" / "1")
    return OnnxRuntimeEngines(model_repository, assets.manifest.geometry), assets


def run(setup, **fields):
    engines, assets = setup
    arguments = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 4, "seed": 10, **fields}
    return generate(GenerationRequest(**arguments), engines, assets)


def test_variation_strength_moves_from_the_seed_to_the_subseed(setup):
    seed_only = run(setup).images
    subseed_image = run(setup, seed=20).images
    assert np.array_equal(run(setup, subseed=20, subseed_strength=0.0).images, seed_only)
    assert max_pixel_diff(run(setup, subseed=20, subseed_strength=1.0).images, subseed_image) <= 1
    halfway = run(setup, subseed=20, subseed_strength=0.5)
    assert (
        max_pixel_diff(halfway.images, seed_only) > 10 and max_pixel_diff(halfway.images, subseed_image) > 10
    )
    assert halfway.info["subseeds"] == [20] and halfway.info["subseed_strength"] == 0.5


def test_variation_seeds_count_up_per_image(setup):
    result = run(setup, num_images=2, subseed=-1, subseed_strength=0.3)
    first = result.info["subseeds"][0]
    assert result.info["subseeds"] == [first, first + 1]
    again = run(setup, num_images=2, subseed=first, subseed_strength=0.3)
    assert np.array_equal(again.images, result.images)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_upscales_then_redraws(setup, upscaler):
    result = run(setup, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler, hr_second_pass_steps=3)
    assert result.images.shape == (1, 128, 128, 3)
    assert (result.info["width"], result.info["height"]) == (128, 128)
    assert (result.info["first_pass_width"], result.info["hr_upscaler"]) == (64, upscaler)
    assert "hires" in result.info["timings_ms"]
    assert np.array_equal(
        run(setup, enable_hr=True, hr_upscaler=upscaler, hr_second_pass_steps=3).images, result.images
    )


def test_hires_strength_decides_how_much_is_redrawn(setup):
    def hires(strength: float) -> np.ndarray:
        return run(setup, enable_hr=True, hr_scale=1.5, denoising_strength=strength).images

    light, heavy = hires(0.3), hires(0.9)
    assert light.shape == (1, 96, 96, 3) and max_pixel_diff(light, heavy) > 0


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("subseed", {"subseed": -5}),
        ("subseed_strength", {"subseed_strength": 1.5}),
        ("hr_scale", {"enable_hr": True, "hr_scale": 8.0}),
        ("hr_scale", {"enable_hr": True, "width": 192, "hr_scale": 1.5}),  # 288 > the profile's 256
        ("hr_upscaler", {"enable_hr": True, "hr_upscaler": "ESRGAN"}),
        ("denoising_strength", {"enable_hr": True, "denoising_strength": -0.1}),
        ("denoising_strength", {"enable_hr": True, "denoising_strength": 0.01}),
        ("hr_second_pass_steps", {"enable_hr": True, "hr_second_pass_steps": -1}),
        ("enable_hr", {"enable_hr": True, "image": b"\x89PNG"}),
    ],
)
def test_bad_values_name_the_field(setup, field, change):
    with pytest.raises(InvalidInput) as raised:
        run(setup, **change)
    assert raised.value.field == field
