"""The denoising core: request → images + info, over any `Engines`.

It follows diffusers' StableDiffusionPipeline step for step (so a seed gives the same image), but
builds a fresh scheduler per request and draws every image's noise from its own CPU generator
(seed + i), which makes a seed reproducible on any hardware. It imports neither Triton nor
onnxruntime.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTokenizer

from python_backend import images, prompts, schedulers
from python_backend.engines import Engines
from python_backend.request import GenerationRequest, InvalidInput
from python_backend.shapes import PIPELINE_MANIFEST, VAE_SCALE, PipelineManifest, Profile

TOKENIZER_DIR = "tokenizer"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class PipelineAssets:
    """Everything besides the engines that a checkpoint contributes, read once at start-up."""

    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    manifest: PipelineManifest

    @classmethod
    def load(cls, folder: Path) -> PipelineAssets:
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder / TOKENIZER_DIR),
            scheduler_config=json.loads((folder / SCHEDULER_CONFIG).read_text()),
            manifest=PipelineManifest.read(folder / PIPELINE_MANIFEST),
        )

    @property
    def default_scheduler(self) -> schedulers.SchedulerChoice:
        return schedulers.choice_for_class(self.scheduler_config["_class_name"])

    @property
    def max_steps(self) -> int:
        # With steps_offset (v1-4: 1), 1000 steps would index past the last training timestep.
        return int(self.scheduler_config["num_train_timesteps"]) - int(
            self.scheduler_config.get("steps_offset", 0)
        )


@dataclass
class GenerationResult:
    images: np.ndarray  # uint8 [N, H, W, 3]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageInputs:
    """img2img / inpainting inputs, fitted to the request's size."""

    init_image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [1, 1, H, W], 1 = repaint; None for img2img
    fill: images.InpaintingFill
    # "Only masked": the generated crop is pasted back into `original` at `region` through `mask_image`.
    original: Image.Image | None = None
    region: images.Region | None = None
    mask_image: Image.Image | None = None


def prepare_image_inputs(request: GenerationRequest, profile: Profile) -> ImageInputs | None:
    """Decode, blur, crop and resize the image inputs as A1111 does. InvalidInput names a bad field."""
    if request.image is None:
        return None
    limits = {
        "max_side": max(profile.width[2], profile.height[2]),
        "max_pixels": profile.width[2] * profile.height[2],
    }
    picture = images.decode_image(request.image, "image", **limits)
    fill = images.parse_inpainting_fill(request.inpainting_fill)
    size = (request.width, request.height)
    if request.mask is None:
        return ImageInputs(
            images.to_model_input(images.resize(picture, *size, request.resize_mode)), None, fill
        )
    mask = images.decode_mask(request.mask, "mask", size=picture.size, **limits)
    if request.mask_blur:
        mask = images.blur_mask(mask, request.mask_blur)
    original = region = None
    if request.inpaint_full_res and (box := images.crop_region(mask, request.inpaint_full_res_padding)):
        original, mask_image = picture, mask
        region = images.expand_to_aspect(box, *size, picture.size)
        picture, mask = picture.crop(region), mask.crop(region)
    picture = images.resize(picture, *size, request.resize_mode)
    mask = images.resize(mask, *size, request.resize_mode)
    if fill.fills_image:
        picture = images.fill_masked_image(picture, mask)
    inputs = ImageInputs(images.to_model_input(picture), images.mask_to_tensor(mask), fill)
    if region is not None:
        inputs.original, inputs.region, inputs.mask_image = original, region, mask_image
    return inputs


def generate(request: GenerationRequest, engines: Engines, assets: PipelineAssets) -> GenerationResult:
    """Run one request. Raises `InvalidInput` (naming the field) before any engine is called.

    Text to image, img2img (`image`) and inpainting (`image` + `mask`) follow diffusers'
    StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline; a
    9-channel (inpainting) UNet is conditioned on the mask and masked image in every mode, as A1111 does.
    """
    # 1. Check inputs.
    choice = request.validate(assets.manifest.profile, assets.max_steps) or assets.default_scheduler
    inputs = prepare_image_inputs(request, assets.manifest.profile)
    first_seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
    seeds = [first_seed + i for i in range(request.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    guided = request.guidance_scale > 1.0
    warnings: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 2. Encode the prompt; the unconditional (negative) half goes first, as in diffusers. A1111's
    # syntax: (emphasis:1.2) weights, and prompts of several 77-token chunks, encoded chunk by chunk.
    device = engines.device
    fields = ["negative_prompt", "prompt"] if guided else ["prompt"]
    chunks = [_chunks(assets, getattr(request, f), f) for f in fields]
    if guided:
        chunks = list(prompts.pad_to_same_length(*chunks))
    encoded = engines.encode_text(torch.from_numpy(np.concatenate([c.ids for c in chunks])).to(device))
    per_prompt = encoded.split([c.count for c in chunks])
    weighted = [
        prompts.apply_weights(e, torch.from_numpy(c.weights).to(device))
        for e, c in zip(per_prompt, chunks, strict=True)
    ]
    text_embeddings = torch.cat(weighted).repeat_interleave(request.num_images, dim=0)
    timings["text_encode"] = _ms_since(started)

    # 3. Timesteps, from a scheduler of this request's own; an image input skips the first (1 - strength).
    scheduler = schedulers.build(choice, assets.scheduler_config)
    scheduler.set_timesteps(request.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if inputs is not None:
        kept = int(request.num_inference_steps * request.strength)
        skipped = (request.num_inference_steps - kept) * scheduler.order
        timesteps = timesteps[skipped:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skipped)
    accepts = schedulers.step_accepts(choice.diffusers_class)
    step_kwargs = {"generator": generators} if "generator" in accepts else {}

    # 4. Initial latents: image i from its own CPU generator, whatever the device.
    geometry = assets.manifest.geometry
    n = request.num_images
    shape = (n, geometry.latent_channels, request.height // VAE_SCALE, request.width // VAE_SCALE)

    def vae_sample(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = engines.encode_image(image.to(device))
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=device)
        return sample * geometry.vae_scaling_factor

    first_t = timesteps[:1].repeat(n)
    image_latents = blend_mask = None
    if inputs is None:
        latents = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
    elif inputs.mask is None:
        # As diffusers' img2img: a VAE sample per image (its generator's first draw), noised to the
        # first kept timestep (the second draw).
        image_latents = torch.cat([vae_sample(inputs.init_image, g) for g in generators])
        noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        latents = scheduler.add_noise(image_latents, noise, first_t)
    else:
        # As diffusers' inpainting: one VAE sample (the first generator's), noise per image.
        full_strength = request.strength == 1.0
        if geometry.unet_in_channels == 4 or not full_strength:
            image_latents = vae_sample(inputs.init_image, generators[0]).repeat(n, 1, 1, 1)
        noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        if geometry.unet_in_channels == 4:
            # diffusers also samples the masked image's latents, which a 4-channel UNet never reads;
            # the same draw keeps the first generator's later noise (ancestral steps) identical.
            randn_tensor((1, *shape[1:]), generator=generators[0])
            blend_mask = F.interpolate(inputs.mask, size=shape[-2:]).to(device)
            image_latents = _latent_fill(inputs.fill, image_latents, blend_mask, generators)
        if full_strength:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, first_t)

    conditioning = None
    if geometry.unet_in_channels == 9:
        # Mask and masked-image latents; without a mask, everything is to be painted (A1111's txt2img).
        height, width = request.height, request.width
        mask = (
            inputs.mask if inputs is not None and inputs.mask is not None else torch.ones(1, 1, height, width)
        )
        image = inputs.init_image if inputs is not None else torch.zeros(1, 3, height, width)
        masked = vae_sample(image * (mask < 0.5), generators[0]).repeat(n, 1, 1, 1)
        mask_latents = F.interpolate(mask, size=shape[-2:]).to(device).repeat(n, 1, 1, 1)
        conditioning = torch.cat([mask_latents, masked], dim=1)
        conditioning = torch.cat([conditioning, conditioning]) if guided else conditioning

    # 5. Denoise.
    denoise_started = time.perf_counter()
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if conditioning is not None:
            model_input = torch.cat([model_input, conditioning], dim=1)
        timestep = torch.full((model_input.shape[0], 1), float(t), dtype=torch.float32, device=device)
        noise_pred = engines.predict_noise(model_input.contiguous(), timestep, text_embeddings)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + request.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        if blend_mask is not None and image_latents is not None:
            # 4-channel UNet: keep the unmasked area on the original, noised to the next step.
            known = image_latents
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            latents = (1 - blend_mask) * known + blend_mask * latents
    timings["denoise"] = _ms_since(denoise_started)

    # 6. Decode and convert to uint8 exactly as diffusers' image processor does.
    decode_started = time.perf_counter()
    decoded = engines.decode_latents((latents / geometry.vae_scaling_factor).contiguous())
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    rgb = (pixels * 255).round().astype(np.uint8)
    if inputs is not None and inputs.region is not None:
        rgb = np.stack([np.asarray(_paste_back(inputs, Image.fromarray(generated))) for generated in rgb])
    timings["decode"] = _ms_since(decode_started)
    timings["total"] = _ms_since(started)

    info: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seeds": seeds,
        "scheduler": choice.name,
        "sampler": choice.a1111,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": rgb.shape[2],
        "height": rgb.shape[1],
        "model": assets.manifest.model_name,
        "timings_ms": timings,
        "warnings": warnings,
    }
    if inputs is not None:
        info.update(strength=request.strength, resize_mode=request.resize_mode)
    if inputs is not None and inputs.mask is not None:
        info.update(
            mask_blur=request.mask_blur,
            inpainting_fill=inputs.fill.value,
            inpaint_full_res=request.inpaint_full_res,
            inpaint_full_res_padding=request.inpaint_full_res_padding,
        )
    return GenerationResult(images=rgb, info=info)


def _latent_fill(
    fill: images.InpaintingFill, latents: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """A1111's "latent noise" / "latent nothing": the masked area starts from noise or from zero."""
    if fill is images.InpaintingFill.LATENT_NOTHING:
        return latents * (1 - mask)
    if fill is images.InpaintingFill.LATENT_NOISE:
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        return latents * (1 - mask) + noise * mask
    return latents


def _paste_back(inputs: ImageInputs, generated: Image.Image) -> Image.Image:
    assert inputs.original is not None and inputs.region is not None and inputs.mask_image is not None
    return images.paste_back(inputs.original, generated, inputs.region, inputs.mask_image)


def _chunks(assets: PipelineAssets, text: str, field: str) -> prompts.PromptChunks:
    try:
        return prompts.tokenize_chunks(assets.tokenizer, text, assets.manifest.profile.max_prompt_chunks)
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
