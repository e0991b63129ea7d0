"""Inpainting in the core, on in-process ONNX Runtime engines: parity with diffusers'
StableDiffusionInpaintPipeline for 4- and 9-channel UNets, and A1111's mask options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest, InvalidInput
from tests.parity import TOLERANCE, diffusers_images, max_pixel_diff, png_bytes, smooth_picture

PROMPT = "a photo of a cat"


def _mask(
    width: int = 96, height: int = 64, box: tuple[int, int, int, int] = (24, 16, 72, 48)
) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _setup(repository: Path) -> tuple[OnnxRuntimeEngines, PipelineAssets]:
    assets = PipelineAssets.load(repository / "pipeline" / "1")
    return OnnxRuntimeEngines(repository, assets.manifest.geometry), assets


@pytest.fixture(scope="module")
def standard(model_repository):
    return _setup(model_repository)


@pytest.fixture(scope="module")
def inpainting(inpainting_repository):
    return _setup(inpainting_repository)


CASES = [
    ("pndm", "PNDMScheduler", 1.0),
    ("pndm", "PNDMScheduler", 0.7),
    ("Euler a", "EulerAncestralDiscreteScheduler", 0.7),
]


@pytest.mark.parametrize("unet", ["4-channel", "9-channel"])
@pytest.mark.parametrize(("scheduler", "diffusers_class", "strength"), CASES)
def test_inpainting_matches_diffusers(
    request, tiny_checkpoint, tiny_inpainting_checkpoint, unet, scheduler, diffusers_class, strength
):
    engines, assets = request.getfixturevalue("standard" if unet == "4-channel" else "inpainting")
    checkpoint = tiny_checkpoint if unet == "4-channel" else tiny_inpainting_checkpoint
    picture, mask = smooth_picture(), _mask()
    ours = generate(
        GenerationRequest(
            prompt=PROMPT,
            negative_prompt="blurry",
            width=96,
            height=64,
            num_inference_steps=8,
            num_images=2,
            seed=5,
            scheduler=scheduler,
            image=png_bytes(picture),
            mask=png_bytes(mask),
            mask_blur=0,
            strength=strength,
        ),
        engines,
        assets,
    )
    expected = diffusers_images(
        checkpoint,
        PROMPT,
        negative_prompt="blurry",
        steps=8,
        guidance_scale=7.5,
        seed=5,
        num_images=2,
        scheduler=diffusers_class,
        pipeline_class="StableDiffusionInpaintPipeline",
        image=picture,
        mask_image=mask,
        strength=strength,
        width=96,
        height=64,
    )
    assert max_pixel_diff(ours.images, expected) <= TOLERANCE
    assert ours.info["inpainting_fill"] == "original" and ours.info["mask_blur"] == 0


def test_only_masked_keeps_the_original_size_and_outside_pixels(standard):
    engines, assets = standard
    picture = smooth_picture(192, 128)
    mask = _mask(192, 128, (96, 64, 127, 95))
    result = generate(
        GenerationRequest(
            prompt=PROMPT,
            width=64,
            height=64,
            num_inference_steps=4,
            seed=1,
            image=png_bytes(picture),
            mask=png_bytes(mask),
            mask_blur=2,
            inpaint_full_res=True,
            inpaint_full_res_padding=8,
        ),
        engines,
        assets,
    )
    assert result.images.shape == (1, 128, 192, 3)
    assert (result.info["width"], result.info["height"]) == (192, 128)
    outside = np.asarray(picture)[:40, :]  # far from the (blurred, padded) mask
    assert np.array_equal(result.images[0][:40, :], outside)
    inside = result.images[0][70:90, 100:120].astype(np.int16)
    assert np.abs(inside - np.asarray(picture)[70:90, 100:120]).mean() > 5


@pytest.mark.parametrize("fill", ["fill", "latent noise", "latent_nothing", "0", "original"])
def test_fill_modes_run_and_change_the_result(standard, fill):
    engines, assets = standard

    def run(mode: str) -> np.ndarray:
        return generate(
            GenerationRequest(
                prompt=PROMPT,
                width=96,
                height=64,
                num_inference_steps=4,
                seed=1,
                image=png_bytes(smooth_picture()),
                mask=png_bytes(_mask()),
                inpainting_fill=mode,
                strength=0.8,
            ),
            engines,
            assets,
        ).images

    if fill == "original":
        assert np.array_equal(run(fill), run("original"))
    else:
        assert max_pixel_diff(run(fill), run("original")) > 0


def test_nine_channel_unet_serves_text_to_image_too(inpainting):
    engines, assets = inpainting
    result = generate(
        GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=3, seed=2), engines, assets
    )
    assert result.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("mask", {"image": None}),
        ("mask", {"mask": b"garbage"}),
        ("mask_blur", {"mask_blur": -1}),
        ("mask_blur", {"mask_blur": 65}),
        ("inpainting_fill", {"inpainting_fill": "sand"}),
        ("inpaint_full_res_padding", {"inpaint_full_res_padding": 1000}),
    ],
)
def test_bad_inpainting_input_names_the_field(standard, field, change):
    engines, assets = standard
    arguments = {
        "prompt": PROMPT,
        "width": 96,
        "height": 64,
        "image": png_bytes(smooth_picture()),
        "mask": png_bytes(_mask()),
        **change,
    }
    with pytest.raises(InvalidInput) as raised:
        generate(GenerationRequest(**arguments), engines, assets)
    assert raised.value.field == field
