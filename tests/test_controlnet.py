"""ControlNet units in the denoising core (issue 16), on the tiny checkpoint with tiny random ControlNets
(build_engines/controlnet.py), against diffusers' ControlNet pipelines with the same weights, seed and
scheduler: one and two ControlNets, weights, guidance windows, "ControlNet is more important" (diffusers'
guess mode), "My prompt is more important" (the extension's soft injection, applied to diffusers' ControlNet
here), img2img; requests without a unit on a ControlNet-capable UNet; and bad units."""

from __future__ import annotations

import io
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from build_engines import cli as build_cli
from build_engines.controlnet import write_tiny_controlnet
from python_backend.control import ControlUnit
from python_backend.engines import OnnxRuntimeEngines
from python_backend.features.controlnet import SOFT_INJECTION
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest, InvalidInput
from tests.conftest import PROFILE_ARGS
from tests.parity import max_pixel_diff

SIZE, STEPS, SEED, PROMPT = 64, 6, 11, "a house by a lake"
SCHEDULER = ("Euler", "EulerDiscreteScheduler")


@pytest.fixture(scope="module")
def controlnets(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("controlnets")
    return {
        name: write_tiny_controlnet(folder / name, tiny_checkpoint, seed)
        for name, seed in (("canny", 1), ("depth", 2))
    }


@pytest.fixture(scope="module")
def core(tiny_checkpoint, controlnets, model_repository, tmp_path_factory):
    import shutil

    repo = tmp_path_factory.mktemp("controlnet-repo") / "repo"
    shutil.copytree(model_repository, repo)  # the plain exports are reused
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS]
    units = [a for name, path in controlnets.items() for a in ("--controlnet", f"{name}={path}")]
    assert build_cli.main([*args, *units]) == 0
    assets = PipelineAssets.load(repo / "pipeline" / "1")
    engines = OnnxRuntimeEngines(repo, assets.manifest.geometry, controlnets=assets.manifest.controlnets)
    return engines, assets


def _control_image(seed: int) -> Image.Image:
    """A control map at the request's size: blocky edges, so that a resize would show."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (8, 8, 1)).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(np.kron(blocks, np.ones((8, 8, 1), np.uint8)), 3, axis=2))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ours(core, units: list[ControlUnit], **fields) -> np.ndarray:
    engines, assets = core
    request = GenerationRequest(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        seed=SEED,
        scheduler=SCHEDULER[0],
        controlnets=tuple(units),
        **fields,
    )
    return generate(request, engines, assets).images


def _unit(model: str, seed: int, **fields) -> ControlUnit:
    return ControlUnit(model, _png(_control_image(seed)), resize_mode="Just Resize", **fields)


def _soft_injection(controlnet):
    """A diffusers ControlNet whose residuals get the extension's soft-injection scales (its "My prompt is
    more important"), which diffusers has no option for; still a ControlNetModel, as its pipeline checks."""
    forward = controlnet.forward

    def scaled(*args, **kwargs):
        down, mid = forward(*args, **kwargs)
        count = len(down) + 1
        scales = [SOFT_INJECTION ** (count - 1 - k) for k in range(count)]
        return [d * s for d, s in zip(down, scales, strict=False)], mid * scales[-1]

    controlnet.forward = scaled
    return controlnet


def _diffusers(tiny_checkpoint, controlnets, names, *, soft=False, img2img=None, **kwargs) -> np.ndarray:
    nets = [diffusers.ControlNetModel.from_pretrained(controlnets[n]) for n in names]
    if soft:
        nets = [_soft_injection(n) for n in nets]
    cls = (
        diffusers.StableDiffusionControlNetImg2ImgPipeline
        if img2img
        else diffusers.StableDiffusionControlNetPipeline
    )
    pipe = cls.from_pretrained(
        tiny_checkpoint, controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SCHEDULER[1]).from_config(pipe.scheduler.config)
    extra = (
        {"image": img2img, "control_image": kwargs.pop("image")}
        if img2img
        else {"width": SIZE, "height": SIZE}
    )
    images = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="np",
        **extra,
        **kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)


def test_one_controlnet_matches_diffusers_and_changes_the_image(core, tiny_checkpoint, controlnets):
    ours = _ours(core, [_unit("canny", 1, weight=0.8)])
    expected = _diffusers(
        tiny_checkpoint, controlnets, ["canny"], image=_control_image(1), controlnet_conditioning_scale=0.8
    )
    assert max_pixel_diff(ours, expected) <= 2
    plain = _ours(core, [])
    assert max_pixel_diff(ours, plain) > 2  # it steers


def test_two_controlnets_with_their_weights_and_windows(core, tiny_checkpoint, controlnets):
    units = [
        _unit("canny", 1, weight=1.2, guidance_start=0.2, guidance_end=0.8),
        _unit("depth", 2, weight=0.5, guidance_end=0.5),
    ]
    expected = _diffusers(
        tiny_checkpoint,
        controlnets,
        ["canny", "depth"],
        image=[_control_image(1), _control_image(2)],
        controlnet_conditioning_scale=[1.2, 0.5],
        control_guidance_start=[0.2, 0.0],
        control_guidance_end=[0.8, 0.5],
    )
    assert max_pixel_diff(_ours(core, units), expected) <= 2


def test_controlnet_is_more_important_is_diffusers_guess_mode(core, tiny_checkpoint, controlnets):
    ours = _ours(core, [_unit("canny", 1, weight=0.9, control_mode="ControlNet is more important")])
    expected = _diffusers(
        tiny_checkpoint,
        controlnets,
        ["canny"],
        image=_control_image(1),
        controlnet_conditioning_scale=0.9,
        guess_mode=True,
    )
    assert max_pixel_diff(ours, expected) <= 2


def test_my_prompt_is_more_important_is_the_extensions_soft_injection(core, tiny_checkpoint, controlnets):
    ours = _ours(core, [_unit("canny", 1, control_mode="My prompt is more important")])
    expected = _diffusers(tiny_checkpoint, controlnets, ["canny"], soft=True, image=_control_image(1))
    assert max_pixel_diff(ours, expected) <= 2


def test_img2img_with_a_controlnet(core, tiny_checkpoint, controlnets):
    start = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    ours = _ours(core, [_unit("depth", 2, weight=0.7)], image=_png(start), strength=0.6)
    expected = _diffusers(
        tiny_checkpoint,
        controlnets,
        ["depth"],
        img2img=start,
        image=_control_image(2),
        strength=0.6,
        controlnet_conditioning_scale=0.7,
    )
    assert max_pixel_diff(ours, expected) <= 2


def test_inpainting_with_a_controlnet(core, tiny_checkpoint, controlnets):
    from tests.parity import smooth_picture
    from tests.test_inpainting import _mask

    picture, mask = smooth_picture(SIZE, SIZE), _mask(SIZE, SIZE, (16, 16, 48, 48))
    fields = {"image": _png(picture), "mask": _png(mask), "mask_blur": 0, "strength": 0.8}
    ours = _ours(core, [_unit("canny", 1, weight=0.9)], **fields)
    nets = diffusers.ControlNetModel.from_pretrained(controlnets["canny"])
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        tiny_checkpoint, controlnet=nets, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SCHEDULER[1]).from_config(pipe.scheduler.config)
    expected = pipe(
        PROMPT,
        image=picture,
        mask_image=mask,
        control_image=_control_image(1),
        strength=0.8,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.9,
        width=SIZE,
        height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="np",
    ).images
    assert max_pixel_diff(ours, (expected * 255).round().astype(np.uint8)) <= 2


def test_the_hires_fix_second_pass_is_controlled_at_its_own_size(core):
    """The extension applies a unit to both passes; the second pass's map is made at its size (a map of the
    first pass's size would not fit the ControlNet's latent)."""
    fields = {"enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.6}
    plain = _ours(core, [], **fields)
    controlled = _ours(core, [_unit("canny", 1)], **fields)
    first_only = _ours(core, [_unit("canny", 1)])
    assert controlled.shape == (1, 2 * SIZE, 2 * SIZE, 3) and max_pixel_diff(controlled, plain) > 2
    assert first_only.shape == (1, SIZE, SIZE, 3)


def test_a_request_without_units_is_the_plain_image(core, model_repository, assets, engines):
    """On a UNet that takes residuals, zeros: the image of the repository without ControlNets."""
    request = GenerationRequest(
        PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, seed=SEED, scheduler=SCHEDULER[0]
    )
    assert np.array_equal(_ours(core, []), generate(request, engines, assets).images)


@pytest.mark.parametrize(
    ("unit", "field", "message"),
    [
        (
            ControlUnit("openpose", b"x"),
            "controlnet_0_model",
            "unknown ControlNet 'openpose'; this server has: canny, depth",
        ),
        (ControlUnit("canny", b"not an image"), "controlnet_0_image", ""),
        # wider than the profile's largest side (256): refused before its pixels are decoded
        (ControlUnit("canny", _png(Image.new("RGB", (512, 8)))), "controlnet_0_image", "512"),
        (ControlUnit("canny", b"x", weight=float("nan")), "controlnet_0_weight", "must be in 0..2.0"),
        (
            ControlUnit("canny", b"x", guidance_start=0.6, guidance_end=0.4),
            "controlnet_0_guidance_start",
            "after guidance_end",
        ),
        (
            ControlUnit("canny", b"x", control_mode="Loud"),
            "controlnet_0_control_mode",
            "must be one of Balanced",
        ),
    ],
)
def test_bad_units_name_their_field(core, unit, field, message):
    with pytest.raises(InvalidInput) as refused:
        _ours(core, [unit])
    assert refused.value.field == field and message in str(refused.value)
