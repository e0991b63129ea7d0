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
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTokenizer

from python_backend import images, prompts, schedulers
from python_backend.engines import Engines
from python_backend.request import GenerationRequest, InvalidInput
from python_backend.shapes import PIPELINE_MANIFEST, VAE_SCALE, PipelineManifest

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


def generate(request: GenerationRequest, engines: Engines, assets: PipelineAssets) -> GenerationResult:
    """Run one request. Raises `InvalidInput` (naming the field) before any engine is called."""
    # 1. Check inputs.
    choice = request.validate(assets.manifest.profile, assets.max_steps) or assets.default_scheduler
    first_seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
    seeds = [first_seed + i for i in range(request.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    guided = request.guidance_scale > 1.0
    warnings: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    init_image = None
    if request.image is not None:
        profile = assets.manifest.profile
        picture = images.decode_image(
            request.image,
            "image",
            max_side=max(profile.width[2], profile.height[2]),
            max_pixels=profile.width[2] * profile.height[2],
        )
        init_image = images.to_model_input(
            images.resize(picture, request.width, request.height, request.resize_mode)
        )

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

    # 3. Timesteps, from a scheduler of this request's own; img2img skips the first (1 - strength).
    scheduler = schedulers.build(choice, assets.scheduler_config)
    scheduler.set_timesteps(request.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if init_image is not None:
        skipped = (
            request.num_inference_steps - int(request.num_inference_steps * request.strength)
        ) * scheduler.order
        timesteps = timesteps[skipped:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skipped)
    accepts = schedulers.step_accepts(choice.diffusers_class)
    step_kwargs = {"generator": generators} if "generator" in accepts else {}

    # 4. Initial latents: image i from its own CPU generator, whatever the device.
    geometry = assets.manifest.geometry
    shape = (
        request.num_images,
        geometry.latent_channels,
        request.height // VAE_SCALE,
        request.width // VAE_SCALE,
    )
    if init_image is None:
        latents = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
    else:
        # As diffusers' img2img: a VAE sample per image (its generator's first draw), scaled, then
        # noised to the first kept timestep (the second draw).
        mean, std = engines.encode_image(init_image.to(device))
        samples = [mean + std * randn_tensor(mean.shape, generator=g, device=device) for g in generators]
        image_latents = torch.cat(samples) * geometry.vae_scaling_factor
        noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(request.num_images))

    # 5. Denoise.
    denoise_started = time.perf_counter()
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        timestep = torch.full((model_input.shape[0], 1), float(t), dtype=torch.float32, device=device)
        noise = engines.predict_noise(model_input.contiguous(), timestep, text_embeddings)
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + request.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
    timings["denoise"] = _ms_since(denoise_started)

    # 6. Decode and convert to uint8 exactly as diffusers' image processor does.
    decode_started = time.perf_counter()
    decoded = engines.decode_latents((latents / geometry.vae_scaling_factor).contiguous())
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    rgb = (pixels * 255).round().astype(np.uint8)
    timings["decode"] = _ms_since(decode_started)
    timings["total"] = _ms_since(started)

    info = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seeds": seeds,
        "scheduler": choice.name,
        "sampler": choice.a1111,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "model": assets.manifest.model_name,
        **(
            {"strength": request.strength, "resize_mode": request.resize_mode}
            if init_image is not None
            else {}
        ),
        "timings_ms": timings,
        "warnings": warnings,
    }
    return GenerationResult(images=rgb, info=info)


def _chunks(assets: PipelineAssets, text: str, field: str) -> prompts.PromptChunks:
    try:
        return prompts.tokenize_chunks(assets.tokenizer, text, assets.manifest.profile.max_prompt_chunks)
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
