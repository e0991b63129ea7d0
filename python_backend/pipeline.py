"""The denoising core: request → images + info, over any `Engines`.

`generate` is a numbered sequence of stages, as diffusers' pipelines read (python_backend/stages.py says
what they hand each other); what a request adds to text to image is a feature (python_backend/features/)
whose hooks those stages call. It follows diffusers' StableDiffusionPipeline step for step (so a seed
gives the same image), but builds a fresh scheduler per request and draws every image's noise from its
own CPU generator (seed + i), which makes a seed reproducible on any hardware. It imports neither Triton
nor onnxruntime.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPTokenizer

from python_backend import conditioning, images, lora, prompts, schedulers
from python_backend.conditioning import Conditioning
from python_backend.engines import Engines
from python_backend.features import inpainting
from python_backend.features.controlnet import ControlNets, ZeroResiduals
from python_backend.features.hires import HiresFix
from python_backend.features.img2img import ImageToImage
from python_backend.features.inpainting import Inpainting
from python_backend.features.variations import VariationSeeds
from python_backend.lora_library import LoraLibrary
from python_backend.request import GenerationRequest
from python_backend.shapes import PIPELINE_MANIFEST, PipelineManifest, Profile
from python_backend.stages import (
    DenoisingPass,
    Feature,
    InitialNoise,
    Run,
    Start,
    Step,
    TextToImage,
    UNetInputs,
)

TOKENIZER_DIR = "tokenizer"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
EMBEDDINGS_FILE = "embeddings.json"  # textual inversions the text encoder knows (build-engines --embeddings)
# The engines' LoRA branch layers and their base weight shapes, {component: {path: shape}}: written by
# build-engines when the text encoder and UNet have LoRA branches.
LORA_TARGETS_FILE = "lora_targets.json"


@dataclass(frozen=True)
class PipelineAssets:
    """Everything besides the engines that a checkpoint contributes, read once at start-up."""

    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    manifest: PipelineManifest
    embeddings: prompts.EmbeddingIndex | None = None
    loras: LoraLibrary | None = None  # None: the engines have no LoRA branches

    @classmethod
    def load(cls, folder: Path, lora_dir: Path | None = None) -> PipelineAssets:
        """`lora_dir`: the LoRA folder (sd-serve --lora-dir), for a repository whose engines take LoRAs."""
        table = folder / EMBEDDINGS_FILE
        embeddings = json.loads(table.read_text()) if table.exists() else None
        targets = folder / LORA_TARGETS_FILE
        manifest = PipelineManifest.read(folder / PIPELINE_MANIFEST)
        loras = None
        if targets.exists():
            shapes = {
                lora.Target(component, path): tuple(shape)
                for component, layers in json.loads(targets.read_text()).items()
                for path, shape in layers.items()
            }
            loras = LoraLibrary(lora_dir, shapes, manifest.lora_max_rank)
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(folder / TOKENIZER_DIR),
            scheduler_config=json.loads((folder / SCHEDULER_CONFIG).read_text()),
            manifest=manifest,
            embeddings=None if embeddings is None else prompts.EmbeddingIndex.from_table(embeddings),
            loras=loras,
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


@dataclass(frozen=True)
class Progress:
    """Passed to `generate`'s `on_step` after every denoising step."""

    step: int  # 1-based, over both passes of a hires fix
    total: int
    elapsed_s: float
    latents: torch.Tensor


class Cancelled(Exception):
    """Raised by an `on_step` callback to stop a request between steps; it answers no images."""


class Interrupted(Exception):
    """Raised by an `on_step` callback to stop denoising at that step and answer with the images its
    latents decode to (A1111's interrupt and skip); a hires fix's second pass not begun is left out."""


def generate(
    request: GenerationRequest,
    engines: Engines,
    assets: PipelineAssets,
    on_step: Callable[[Progress], None] | None = None,
) -> GenerationResult:
    """Run one request. Raises `InvalidInput` (naming the field) before any engine is called.

    Text to image, img2img (`image`) and inpainting (`image` + `mask`) follow diffusers'
    StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline; a
    9-channel (inpainting) UNet is conditioned on the mask and masked image in every mode, as A1111 does.
    """
    # 1. Check inputs; choose where the latents start and the features the request adds.
    geometry = assets.manifest.geometry
    choice = (
        request.validate(assets.manifest.profile, assets.max_steps, geometry.text_layers)
        or assets.default_scheduler
    )
    start = _image_start(request, assets.manifest.profile) or TextToImage()
    prompt, loras = conditioning.resolve_loras(assets, request.prompt)
    run = Run.begin(request, engines, geometry, choice, assets.scheduler_config)
    features: list[Feature] = [start]
    if variations := VariationSeeds.for_request(request):
        features.append(variations)
    if request.controlnets:
        features.append(ControlNets.for_request(run, assets.manifest))
    if assets.manifest.controlnets:  # the UNet takes residuals: zeros when no unit acts (last of all)
        features.append(ZeroResiduals(geometry))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 2. Conditioning: the prompts' embeddings.
    text = conditioning.encode_prompts(run, assets, prompt, loras)
    timings["text_encode"] = _ms_since(started)

    # 3. Timesteps, from a scheduler of this request's own; a start from an image skips the first
    # (1 - strength) of them. The hires fix's second pass is set up now, to count all steps.
    strength = request.strength if start.image is not None else None
    first = DenoisingPass.plan(
        run, request.num_inference_steps, (request.width, request.height), strength=strength
    )
    hires = HiresFix.plan(run) if request.enable_hr else None
    total = len(first.timesteps) + (len(hires.second_pass.timesteps) if hires else 0)
    steps = _Steps(on_step, total, started)

    # 4. Initial latents: where the start has them begin, from each image's own noise.
    shape = run.latent_shape(first.width, first.height)
    latents = start.initial_latents(run, first, InitialNoise(run, shape, tuple(features)))

    # 5. Denoise, each feature taking part in every step.
    per_step = [*features, *inpainting.unet_conditioning(run, first, start.image, start.mask)]
    denoise_started = time.perf_counter()
    latents = _denoise(run, first, latents, text, per_step, steps)
    timings["denoise"] = _ms_since(denoise_started)

    # 6. Hires fix: the first pass upscaled, then redrawn at the larger size (not once interrupted).
    if hires is not None and not steps.interrupted:
        hires_started = time.perf_counter()
        latents = hires.initial_latents(run, latents, decode=partial(_decode, run))
        second_pass = hires.second_pass
        per_step = [*features, *inpainting.unet_conditioning(run, second_pass, None, None)]
        latents = _denoise(run, second_pass, latents, text, per_step, steps)
        features = [*features, hires]  # its info: the images are the second pass's
        timings["hires"] = _ms_since(hires_started)

    # 7. Decode, and paste back what was generated for a part of the image.
    decode_started = time.perf_counter()
    rgb = _decode(run, latents)
    for feature in features:
        rgb = feature.paste_back(rgb)
    timings["decode"] = _ms_since(decode_started)
    timings["total"] = _ms_since(started)

    # 8. Info, for the images' infotext.
    return GenerationResult(rgb, _info(run, assets, text, features, steps, rgb, timings))


def _image_start(request: GenerationRequest, profile: Profile) -> Start | None:
    """img2img or inpainting from the request's image, if it has one. InvalidInput names a bad field."""
    if request.image is None:
        return None
    limits = {
        "max_side": max(profile.width[2], profile.height[2]),
        "max_pixels": profile.width[2] * profile.height[2],
    }
    picture = images.decode_image(request.image, "image", **limits)
    fill = images.parse_inpainting_fill(request.inpainting_fill)  # checked with any image, mask or not
    if request.mask is None:
        return ImageToImage.prepare(request, picture)
    mask = images.decode_mask(request.mask, "mask", size=picture.size, **limits)
    return Inpainting.prepare(request, picture, mask, fill)


@dataclass
class _Steps:
    """The steps of both passes so far, each reported to `on_step`; whether it interrupted."""

    on_step: Callable[[Progress], None] | None
    total: int
    started: float
    done: int = 0
    interrupted: bool = False

    def report(self, latents: torch.Tensor) -> bool:
        """One step done: tell `on_step` (which may raise Cancelled). False once it interrupted."""
        self.done += 1
        if self.on_step is not None:
            try:
                self.on_step(Progress(self.done, self.total, time.perf_counter() - self.started, latents))
            except Interrupted:
                self.interrupted = True
        return not self.interrupted


def _denoise(
    run: Run,
    denoising: DenoisingPass,
    latents: torch.Tensor,
    text: Conditioning,
    features: list[Feature],
    steps: _Steps,
) -> torch.Tensor:
    """One pass of the loop with classifier-free guidance, until its last step or an interrupt."""
    scheduler = denoising.scheduler
    for i, t in enumerate(denoising.timesteps):
        step = Step(denoising, i)
        sample = torch.cat([latents, latents]) if run.guided else latents
        sample = scheduler.scale_model_input(sample, t)
        timestep = torch.full((sample.shape[0], 1), float(t), dtype=torch.float32, device=run.device)
        inputs = UNetInputs(sample, timestep, text.embeddings, text.unet_lora)
        for feature in features:
            inputs = feature.unet_inputs(step, inputs)
        noise_pred = run.engines.predict_noise(
            inputs.sample.contiguous(), inputs.timestep, inputs.text_embeddings, inputs.lora, inputs.residuals
        )
        if run.guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + run.request.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, **denoising.step_kwargs, return_dict=False)[0]
        for feature in features:
            latents = feature.after_step(step, latents)
        if not steps.report(latents):
            break
    return latents


def _decode(run: Run, latents: torch.Tensor) -> np.ndarray:
    return _to_rgb(run.engines.decode_latents((latents / run.geometry.vae_scaling_factor).contiguous()))


def _to_rgb(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1] → uint8 [N, H, W, 3], rounded as diffusers' image processor does."""
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


def _info(
    run: Run,
    assets: PipelineAssets,
    text: Conditioning,
    features: list[Feature],
    steps: _Steps,
    rgb: np.ndarray,
    timings: dict[str, float],
) -> dict[str, Any]:
    request, manifest = run.request, assets.manifest
    warnings = []
    if steps.interrupted:
        warnings.append(f"interrupted after step {steps.done} of {steps.total}: its latents decoded")
    info: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seeds": run.seeds,
        "scheduler": run.scheduler.name,
        "sampler": run.scheduler.a1111,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": rgb.shape[2],
        "height": rgb.shape[1],
        "model": manifest.model_name,
        "model_hash": manifest.model_hash,
        "timings_ms": timings,
        "warnings": warnings,
        **text.info(),
    }
    if manifest.vae_name:  # a VAE other than the checkpoint's (build-engines --vae)
        info.update(vae=manifest.vae_name, vae_hash=manifest.vae_hash)
    for feature in features:
        info.update(feature.info())
    if steps.interrupted:
        info.update(interrupted=True)
    return info


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
