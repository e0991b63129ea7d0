"""The denoising core on in-process ONNX Runtime engines: parity with diffusers and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from build_engines import repository
from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import Cancelled, GenerationResult, Progress, generate
from python_backend.request import REQUEST_INPUTS, GenerationRequest, InvalidInput, request_from_inputs
from python_backend.shapes import ENGINE_NAMES
from tests.parity import TOLERANCE, diffusers_images, max_pixel_diff, png_bytes, smooth_picture

PROMPT = "a photo of a cat"


@pytest.mark.parametrize(
    ("scheduler", "diffusers_class"),
    [
        ("pndm", "PNDMScheduler"),
        ("DDIM", "DDIMScheduler"),
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
        ("unipc", "UniPCMultistepScheduler"),
    ],
)
@pytest.mark.parametrize(("width", "height", "num_images", "guidance"), [(64, 64, 1, 7.5), (96, 64, 2, 4.0)])
def test_matches_diffusers(
    engines, assets, tiny_checkpoint, scheduler, diffusers_class, width, height, num_images, guidance
):
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt="blurry",
        width=width,
        height=height,
        num_inference_steps=5,
        num_images=num_images,
        guidance_scale=guidance,
        seed=1234,
        scheduler=scheduler,
    )
    result = generate(request, engines, assets)
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        negative_prompt="blurry",
        width=width,
        height=height,
        steps=5,
        guidance_scale=guidance,
        seed=1234,
        scheduler=diffusers_class,
        num_images=num_images,
    )
    assert result.images.shape == (num_images, height, width, 3)
    assert max_pixel_diff(result.images, expected) <= TOLERANCE
    assert result.info["seeds"] == [1234 + i for i in range(num_images)]


def test_guidance_one_skips_the_unconditional_half(engines, assets, tiny_checkpoint):
    calls = []

    class Recording(type(engines)):
        def run(self, engine, inputs, lora=""):
            calls.append((engine, {k: v.shape for k, v in inputs.items()}))
            return engines.run(engine, inputs)

    recording = Recording.__new__(Recording)
    request = GenerationRequest(
        prompt=PROMPT, width=64, height=64, num_inference_steps=3, guidance_scale=1.0, seed=7
    )
    result = generate(request, recording, assets)
    unet_batches = {shapes["sample"][0] for engine, shapes in calls if engine == "unet"}
    assert unet_batches == {1}
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        width=64,
        height=64,
        steps=3,
        guidance_scale=1.0,
        seed=7,
        scheduler="PNDMScheduler",
    )
    assert max_pixel_diff(result.images, expected) <= TOLERANCE


def test_seed_decides_the_image(engines, assets):
    def run(seed: int) -> np.ndarray:
        request = GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=3, seed=seed)
        return generate(request, engines, assets).images

    assert np.array_equal(run(5), run(5))
    # Parity within 2/255 means something only if another seed moves pixels much further.
    assert max_pixel_diff(run(5), run(6)) > 40


def test_random_seed_is_drawn_and_reported(engines, assets):
    request = GenerationRequest(
        prompt=PROMPT, width=64, height=64, num_inference_steps=2, num_images=2, seed=-1
    )
    first, second = generate(request, engines, assets), generate(request, engines, assets)
    assert first.info["seeds"][1] == first.info["seeds"][0] + 1
    assert first.info["seeds"] != second.info["seeds"]
    assert not np.array_equal(first.images, second.images)
    replay = generate(
        GenerationRequest(**{**request.__dict__, "seed": first.info["seeds"][0]}), engines, assets
    )
    assert np.array_equal(replay.images, first.images)


def test_info_reports_the_request(engines, assets):
    request = GenerationRequest(
        prompt=PROMPT,
        width=96,
        height=64,
        num_inference_steps=2,
        seed=3,
        guidance_scale=5.0,
        scheduler="Euler a",
    )
    info = generate(request, engines, assets).info
    assert info["scheduler"] == "euler_a" and info["sampler"] == "Euler a"
    assert (info["width"], info["height"], info["steps"], info["guidance_scale"]) == (96, 64, 2, 5.0)
    assert set(info["timings_ms"]) == {"text_encode", "denoise", "decode", "total"}
    assert info["warnings"] == []


def test_default_scheduler_is_the_checkpoints(engines, assets):
    request = GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=2, seed=3)
    assert generate(request, engines, assets).info["scheduler"] == "pndm"


def test_long_prompts_are_encoded_in_chunks(engines, assets):
    def run(prompt: str) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, width=64, height=64, num_inference_steps=2, seed=3)
        return generate(request, engines, assets).images

    long_prompt = " ".join(["cat"] * 100)  # two chunks
    assert max_pixel_diff(run(long_prompt), run(" ".join(["cat"] * 75))) > 0  # the second chunk counts
    with pytest.raises(
        InvalidInput, match=r"prompt: is 300 tokens in 4 chunks; the engines accept at most 3"
    ):
        run(" ".join(["cat"] * 300))


@pytest.mark.parametrize("hr_upscaler", ["Latent", "Lanczos"])  # Lanczos re-encodes: the VAE encoder too
def test_the_largest_request_fits_every_engine_config(engines, assets, model_repository, hr_upscaler):
    """Triton refuses a call with more rows than the model's max_batch_size (INTERNAL to the client): the
    largest request the profile admits (most images, longest prompts, guided, hires fix) must fit."""
    profile = assets.manifest.profile
    limits = {name: repository.read_config(model_repository / name).max_batch_size for name in ENGINE_NAMES}
    rows: dict[str, set[int]] = {name: set() for name in ENGINE_NAMES}

    class Recording(type(engines)):
        def run(self, engine, inputs, lora=""):
            rows[engine].update(t.shape[0] for t in inputs.values())
            return engines.run(engine, inputs)

    longest = " ".join(["cat"] * 75 * profile.max_prompt_chunks)
    request = GenerationRequest(
        prompt=longest,
        negative_prompt=longest,
        width=64,
        height=64,
        num_inference_steps=2,
        num_images=profile.max_batch,
        guidance_scale=7.5,
        seed=5,
        enable_hr=True,
        hr_upscaler=hr_upscaler,
    )
    generate(request, Recording.__new__(Recording), assets)
    assert rows["text_encoder"] == {2 * profile.max_prompt_chunks}  # one call, whatever the image count
    assert rows["unet"] == {2 * profile.max_batch}
    for name, seen in rows.items():
        assert all(r <= limits[name] for r in seen), (name, seen, limits[name])


def test_attention_syntax_weights_the_prompt(engines, assets):
    def run(prompt: str) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, width=64, height=64, num_inference_steps=2, seed=3)
        return generate(request, engines, assets).images

    assert np.array_equal(run("(a photo:1.0) of a cat"), run(PROMPT))
    assert max_pixel_diff(run("a photo of a (cat:1.6)"), run(PROMPT)) > 0


BAD_REQUESTS = [
    ("width", {"width": 100}),  # not a multiple of 8
    ("width", {"width": 56}),  # below the profile's 64
    ("height", {"height": 264}),  # above the profile's 256
    ("num_inference_steps", {"num_inference_steps": 0}),
    ("num_inference_steps", {"num_inference_steps": 1001}),
    ("num_images", {"num_images": 0}),
    ("num_images", {"num_images": 5}),
    ("guidance_scale", {"guidance_scale": math.nan}),
    ("guidance_scale", {"guidance_scale": math.inf}),
    ("guidance_scale", {"guidance_scale": -math.inf}),
    ("guidance_scale", {"guidance_scale": -0.5}),
    ("seed", {"seed": -2}),
    ("scheduler", {"scheduler": "warp drive"}),
]


@pytest.mark.parametrize(("field", "change"), BAD_REQUESTS)
def test_bad_input_names_the_field(engines, assets, field, change):
    request = GenerationRequest(**{"prompt": PROMPT, "width": 64, "height": 64, **change})
    with pytest.raises(InvalidInput) as raised:
        generate(request, engines, assets)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_unknown_scheduler_lists_valid_names(engines, assets):
    with pytest.raises(InvalidInput, match=r"valid names: pndm \(PLMS\), ddim \(DDIM\)"):
        generate(GenerationRequest(prompt=PROMPT, width=64, height=64, scheduler="nope"), engines, assets)


def test_step_limit_comes_from_the_scheduler_config(engines, assets):
    # v1-4's steps_offset=1 leaves 999 usable timesteps; 1000 would index past the schedule.
    assert assets.max_steps == 999
    with pytest.raises(InvalidInput, match=r"num_inference_steps: must be in 1\.\.999"):
        generate(
            GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=1000), engines, assets
        )


def test_request_from_inputs_decodes_tensors():
    request = request_from_inputs(
        {
            "prompt": np.array([b"caf\xc3\xa9"], dtype=np.object_),
            "width": np.array([96], dtype=np.int32),
            "guidance_scale": np.array([3.5], dtype=np.float32),
            "seed": np.array([2**40], dtype=np.int64),
        }
    )
    assert request == GenerationRequest(prompt="café", width=96, guidance_scale=3.5, seed=2**40)
    # Every field is an input, but the ControlNet units: each field of a unit is one (controlnet_{i}_{field}).
    assert set(REQUEST_INPUTS) | {"controlnets"} == set(GenerationRequest.__dataclass_fields__)


def test_request_from_inputs_decodes_controlnet_units():
    from python_backend.control import ControlUnit

    prompt = {"prompt": np.array([b"x"], dtype=np.object_)}
    unit = {
        "controlnet_0_model": np.array([b"canny"], dtype=np.object_),
        "controlnet_0_image": np.array([b"\x89PNG"], dtype=np.object_),
        "controlnet_0_weight": np.array([0.5], dtype=np.float32),
        "controlnet_0_pixel_perfect": np.array([True], dtype=np.bool_),
    }
    request = request_from_inputs({**prompt, **unit})
    assert request.controlnets == (ControlUnit("canny", b"\x89PNG", weight=0.5, pixel_perfect=True),)
    second = {"controlnet_1_model": np.array([b"depth"], dtype=np.object_)}
    with pytest.raises(InvalidInput) as raised:  # a unit needs its image
        request_from_inputs({**prompt, **unit, **second})
    assert raised.value.field == "controlnet_1_image"
    with pytest.raises(InvalidInput) as raised:  # numbered from 0
        request_from_inputs({**prompt, **second, "controlnet_1_image": unit["controlnet_0_image"]})
    assert raised.value.field.startswith("controlnet_1_") and "units are numbered from 0" in str(raised.value)


@pytest.mark.parametrize(
    ("field", "inputs"),
    [
        ("prompt", {}),
        ("prompt", {"prompt": np.array([b"\xff\xfe"], dtype=np.object_)}),
        (
            "width",
            {"prompt": np.array([b"x"], dtype=np.object_), "width": np.array([64, 64], dtype=np.int32)},
        ),
    ],
)
def test_request_from_inputs_rejects_bad_tensors(field, inputs):
    with pytest.raises(InvalidInput) as raised:
        request_from_inputs(inputs)
    assert raised.value.field == field


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (latents and scheduler on the GPU)"
)
@pytest.mark.parametrize(
    ("scheduler", "diffusers_class"),
    [
        ("pndm", "PNDMScheduler"),
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ],
)
def test_core_on_the_gpu_matches_diffusers(
    model_repository, assets, tiny_checkpoint, scheduler, diffusers_class
):
    # The core keeps its tensors on the engines' device (TensorRT engines: the GPU); noise is still drawn
    # by CPU generators, so a seed gives the same image as on the CPU.
    engines = OnnxRuntimeEngines(model_repository, assets.manifest.geometry, device="cuda")
    request = GenerationRequest(
        prompt=PROMPT, width=96, height=64, num_inference_steps=5, num_images=2, seed=77, scheduler=scheduler
    )
    result = generate(request, engines, assets)
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        width=96,
        height=64,
        steps=5,
        guidance_scale=7.5,
        seed=77,
        scheduler=diffusers_class,
        num_images=2,
    )
    assert max_pixel_diff(result.images, expected) <= TOLERANCE


@pytest.mark.parametrize(
    ("scheduler", "diffusers_class"),
    [("pndm", "PNDMScheduler"), ("ddim", "DDIMScheduler"), ("Euler a", "EulerAncestralDiscreteScheduler")],
)
def test_img2img_matches_diffusers(engines, assets, tiny_checkpoint, scheduler, diffusers_class):
    picture = smooth_picture(96, 64)
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt="blurry",
        width=96,
        height=64,
        num_inference_steps=10,
        num_images=2,
        seed=99,
        scheduler=scheduler,
        image=png_bytes(picture),
        strength=0.6,
    )
    result = generate(request, engines, assets)
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        negative_prompt="blurry",
        steps=10,
        guidance_scale=7.5,
        seed=99,
        scheduler=diffusers_class,
        num_images=2,
        pipeline_class="StableDiffusionImg2ImgPipeline",
        image=picture,
        strength=0.6,
    )
    assert result.images.shape == (2, 64, 96, 3)
    assert max_pixel_diff(result.images, expected) <= TOLERANCE
    assert result.info["strength"] == 0.6


def test_img2img_strength_decides_how_much_changes(engines, assets):
    picture = smooth_picture(64, 64)
    original = np.asarray(picture).astype(np.int16)

    def change(strength: float) -> float:
        request = GenerationRequest(
            prompt=PROMPT,
            width=64,
            height=64,
            num_inference_steps=10,
            seed=1,
            image=png_bytes(picture),
            strength=strength,
        )
        return float(np.abs(generate(request, engines, assets).images[0].astype(np.int16) - original).mean())

    assert change(0.2) < change(0.9)


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("strength", {"strength": 1.5}),
        ("strength", {"strength": math.nan}),
        ("strength", {"strength": 0.05, "num_inference_steps": 10}),  # no step left
        ("image", {"image": b"not an image"}),
        ("resize_mode", {"resize_mode": "stretch it"}),
    ],
)
def test_bad_img2img_input_names_the_field(engines, assets, field, change):
    arguments = {
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "image": png_bytes(smooth_picture(64, 64)),
        **change,
    }
    with pytest.raises(InvalidInput) as raised:
        generate(GenerationRequest(**arguments), engines, assets)
    assert raised.value.field == field


def test_clip_skip_uses_an_earlier_clip_layer(engines, assets):
    def run(**fields) -> GenerationResult:
        request = GenerationRequest(
            prompt=PROMPT, width=64, height=64, num_inference_steps=3, seed=4, **fields
        )
        return generate(request, engines, assets)

    last, penultimate = run(), run(clip_skip=2)
    assert max_pixel_diff(last.images, penultimate.images) > 0
    assert penultimate.info["clip_skip"] == 2 and "clip_skip" not in last.info  # A1111 writes it above 1 only
    for bad in (0, assets.manifest.geometry.text_layers + 1):
        with pytest.raises(InvalidInput, match="clip_skip: must be in 1"):
            run(clip_skip=bad)


def test_info_carries_the_model_hash(engines, assets):
    request = GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=1, seed=4)
    model_hash = generate(request, engines, assets).info["model_hash"]
    assert len(model_hash) == 10 and int(model_hash, 16) >= 0
    assert model_hash == assets.manifest.model_hash


def test_progress_is_reported_after_every_step_of_both_passes(engines, assets):
    seen = []
    request = GenerationRequest(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=5,
        seed=1,
        enable_hr=True,
        hr_second_pass_steps=4,
        denoising_strength=0.5,
        scheduler="euler",
    )
    generate(request, engines, assets, on_step=seen.append)
    # A step is a UNet call: Euler's 5, then 2 of the second pass (PNDM's PLMS adds one per pass).
    assert [p.step for p in seen] == list(range(1, 5 + 2 + 1))
    assert {p.total for p in seen} == {7} and seen[-1].latents.shape == (1, 4, 16, 16)


def test_a_callback_cancels_between_steps(engines, assets):
    seen = []

    def stop_at_two(progress: Progress) -> None:
        seen.append(progress.step)
        if progress.step == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate(
            GenerationRequest(prompt=PROMPT, width=64, height=64, num_inference_steps=20, seed=1),
            engines,
            assets,
            on_step=stop_at_two,
        )
    assert seen == [1, 2]
