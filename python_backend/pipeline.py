"""The denoising core: request → images + info, over any `Engines`.

It follows diffusers' StableDiffusionPipeline step for step (so a seed gives the same image), but
builds a fresh scheduler per request and draws every image's noise from its own CPU generator
(seed + i), which makes a seed reproducible on any hardware. It imports neither Triton nor
onnxruntime.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTokenizer

from python_backend import extra_networks, images, lora, prompts, schedulers
from python_backend.engines import Engines
from python_backend.lora_library import AppliedLoras, LoraLibrary, apply_tags
from python_backend.request import GenerationRequest, InvalidInput
from python_backend.shapes import PIPELINE_MANIFEST, VAE_SCALE, PipelineManifest, Profile

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
    # 1. Check inputs.
    choice = (
        request.validate(assets.manifest.profile, assets.max_steps, assets.manifest.geometry.text_layers)
        or assets.default_scheduler
    )
    inputs = prepare_image_inputs(request, assets.manifest.profile)
    prompt_text, loras = _loras(assets, request.prompt)
    first_seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
    seeds = [first_seed + i for i in range(request.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    guided = request.guidance_scale > 1.0
    warnings: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 2. Encode the prompt; the unconditional (negative) half goes first, as in diffusers. A1111's
    # syntax: (emphasis:1.2) weights, and prompts of several 77-token chunks, encoded chunk by chunk.
    # The prompt's LoRAs apply to both halves, as A1111's merged weights do.
    device = engines.device
    texts = {"negative_prompt": request.negative_prompt, "prompt": prompt_text}
    fields = ["negative_prompt", "prompt"] if guided else ["prompt"]
    chunks = [_chunks(assets, texts[f], f) for f in fields]
    if guided:
        chunks = list(prompts.pad_to_same_length(*chunks))
    ids = torch.from_numpy(np.concatenate([c.ids for c in chunks])).to(device)
    encoded = engines.encode_text(ids, request.clip_skip, loras.text_encoder)
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

    # 4. Initial latents: image i from its own CPU generator, whatever the device.
    geometry = assets.manifest.geometry
    n = request.num_images
    shape = (n, geometry.latent_channels, request.height // VAE_SCALE, request.width // VAE_SCALE)

    def vae_sample(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = engines.encode_image(image.to(device))
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=device)
        return sample * geometry.vae_scaling_factor

    first_subseed = request.subseed if request.subseed >= 0 else secrets.randbelow(2**32)

    def initial_noise() -> torch.Tensor:
        """Each image's noise from its seed, moved toward its variation seed's by slerp (A1111)."""
        noise = randn_tensor(shape, generator=generators, device=device, dtype=torch.float32)
        if request.subseed_strength == 0:
            return noise
        subgenerators = [torch.Generator("cpu").manual_seed(first_subseed + i) for i in range(n)]
        subnoise = randn_tensor(shape, generator=subgenerators, device=device, dtype=torch.float32)
        return torch.stack(
            [_slerp(request.subseed_strength, a, b) for a, b in zip(noise, subnoise, strict=True)]
        )

    first_t = timesteps[:1].repeat(n)
    image_latents = blend_mask = None
    if inputs is None:
        latents = initial_noise() * scheduler.init_noise_sigma
    elif inputs.mask is None:
        # As diffusers' img2img: a VAE sample per image (its generator's first draw), noised to the
        # first kept timestep (the second draw).
        image_latents = torch.cat([vae_sample(inputs.init_image, g) for g in generators])
        noise = initial_noise()
        latents = scheduler.add_noise(image_latents, noise, first_t)
    else:
        # As diffusers' inpainting: one VAE sample (the first generator's), noise per image.
        full_strength = request.strength == 1.0
        if geometry.unet_in_channels == 4:
            sampled = vae_sample(inputs.init_image, generators[0]).repeat(n, 1, 1, 1)
            noise = initial_noise()
            # diffusers also samples the masked image's latents, which a 4-channel UNet never reads;
            # the same draw keeps the first generator's later noise (ancestral steps) identical.
            randn_tensor((1, *shape[1:]), generator=generators[0])
            blend_mask = F.interpolate(inputs.mask, size=shape[-2:]).to(device)
            image_latents = _latent_fill(inputs.fill, sampled, blend_mask, generators)
        else:
            if not full_strength:
                image_latents = vae_sample(inputs.init_image, generators[0]).repeat(n, 1, 1, 1)
            noise = initial_noise()
        if full_strength:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, first_t)

    def conditioning_for(inputs: ImageInputs | None, width: int, height: int) -> torch.Tensor:
        """9-channel UNet input beside the latents: mask and masked-image latents; without a mask,
        everything is to be painted (A1111's text to image with inpainting models)."""
        mask = (
            inputs.mask if inputs is not None and inputs.mask is not None else torch.ones(1, 1, height, width)
        )
        image = inputs.init_image if inputs is not None else torch.zeros(1, 3, height, width)
        masked = vae_sample(image * (mask < 0.5), generators[0]).repeat(n, 1, 1, 1)
        mask_latents = F.interpolate(mask, size=(height // VAE_SCALE, width // VAE_SCALE)).to(device)
        both = torch.cat([mask_latents.repeat(n, 1, 1, 1), masked], dim=1)
        return torch.cat([both, both]) if guided else both

    conditioning = None
    if geometry.unet_in_channels == 9:
        conditioning = conditioning_for(inputs, request.width, request.height)

    # The hires fix's second pass: its own scheduler and timesteps (set up now, to count all steps).
    hr_timesteps = timesteps[:0]
    if request.enable_hr:
        hr_scheduler = schedulers.build(choice, assets.scheduler_config)
        hr_steps = request.hr_second_pass_steps or request.num_inference_steps
        hr_scheduler.set_timesteps(hr_steps, device=device)
        hr_skipped = (hr_steps - int(hr_steps * request.denoising_strength)) * hr_scheduler.order
        hr_timesteps = hr_scheduler.timesteps[hr_skipped:]
        if hasattr(hr_scheduler, "set_begin_index"):
            hr_scheduler.set_begin_index(hr_skipped)

    steps_done = 0
    total_steps = len(timesteps) + len(hr_timesteps)
    interrupted = False

    def report(latents: torch.Tensor) -> bool:
        """One UNet step done: tell `on_step` (which may raise Cancelled). False once it interrupted."""
        nonlocal steps_done, interrupted
        steps_done += 1
        if on_step is not None:
            try:
                on_step(Progress(steps_done, total_steps, time.perf_counter() - started, latents))
            except Interrupted:
                interrupted = True
        return not interrupted

    # 5. Denoise.
    def denoise(
        scheduler: Any,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        conditioning: torch.Tensor | None,
    ) -> torch.Tensor:
        step_kwargs = {"generator": generators} if "generator" in accepts else {}
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if conditioning is not None:
                model_input = torch.cat([model_input, conditioning], dim=1)
            timestep = torch.full((model_input.shape[0], 1), float(t), dtype=torch.float32, device=device)
            model_input = model_input.contiguous()
            noise_pred = engines.predict_noise(model_input, timestep, text_embeddings, loras.unet)
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
            if not report(latents):
                break
        return latents

    denoise_started = time.perf_counter()
    latents = denoise(scheduler, timesteps, latents, generators, conditioning)
    timings["denoise"] = _ms_since(denoise_started)

    # 6. Hires fix (A1111): upscale the first pass, then redraw it as img2img at the larger size.
    hires = request.enable_hr and not interrupted
    if hires:
        hires_started = time.perf_counter()
        hr_width, hr_height = request.hires_size()
        hr_shape = (n, geometry.latent_channels, hr_height // VAE_SCALE, hr_width // VAE_SCALE)
        if request.hr_upscaler.lower() == "latent":
            upscaled = F.interpolate(latents, size=hr_shape[-2:], mode="bilinear")
        else:
            first = _to_rgb(engines.decode_latents((latents / geometry.vae_scaling_factor).contiguous()))
            resized = [
                images.to_model_input(
                    Image.fromarray(a).resize((hr_width, hr_height), Image.Resampling.LANCZOS)
                )
                for a in first
            ]
            upscaled = torch.cat([vae_sample(x, g) for x, g in zip(resized, generators, strict=True)])
        # The second pass draws from generators seeded afresh, so it depends on the seeds alone.
        hr_generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        hr_noise = randn_tensor(hr_shape, generator=hr_generators, device=device, dtype=torch.float32)
        latents = hr_scheduler.add_noise(upscaled, hr_noise, hr_timesteps[:1].repeat(n))
        hr_conditioning = conditioning_for(None, hr_width, hr_height) if conditioning is not None else None
        latents = denoise(hr_scheduler, hr_timesteps, latents, hr_generators, hr_conditioning)
        timings["hires"] = _ms_since(hires_started)

    # 7. Decode and convert to uint8 exactly as diffusers' image processor does.
    decode_started = time.perf_counter()
    rgb = _to_rgb(engines.decode_latents((latents / geometry.vae_scaling_factor).contiguous()))
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
        "model_hash": assets.manifest.model_hash,
        "timings_ms": timings,
        "warnings": warnings,
    }
    used = {e.name: e.hash for c in chunks for e in c.embeddings}
    if used:  # A1111's "TI hashes"
        info.update(embeddings=dict(sorted(used.items())))
    if loras.hashes:  # A1111's "Lora hashes"
        info.update(loras=loras.hashes)
    if assets.manifest.vae_name:  # a VAE other than the checkpoint's (build-engines --vae)
        info.update(vae=assets.manifest.vae_name, vae_hash=assets.manifest.vae_hash)
    if inputs is not None:
        info.update(strength=request.strength, resize_mode=request.resize_mode)
    if request.clip_skip > 1:  # A1111 writes "Clip skip" only then
        info.update(clip_skip=request.clip_skip)
    if request.subseed_strength > 0:
        info.update(subseeds=[first_subseed + i for i in range(n)], subseed_strength=request.subseed_strength)
    if interrupted:
        info.update(interrupted=True)
        warnings.append(f"interrupted after step {steps_done} of {total_steps}: its latents decoded")
    if hires:
        info.update(
            hr_scale=request.hr_scale,
            hr_upscaler=request.hr_upscaler,
            hr_second_pass_steps=request.hr_second_pass_steps,
            denoising_strength=request.denoising_strength,
            first_pass_width=request.width,
            first_pass_height=request.height,
        )
    if inputs is not None and inputs.mask is not None:
        info.update(
            mask_blur=request.mask_blur,
            inpainting_fill=inputs.fill.value,
            inpaint_full_res=request.inpaint_full_res,
            inpaint_full_res_padding=request.inpaint_full_res_padding,
        )
    return GenerationResult(images=rgb, info=info)


def _slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two [C, H, W] noises, normalised along dim 1 as A1111's `slerp`."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: A1111 mixes linearly (with its weights this way round)
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin_omega).unsqueeze(1) * low + (
        torch.sin(t * omega) / sin_omega
    ).unsqueeze(1) * high


def _to_rgb(decoded: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1] → uint8 [N, H, W, 3], rounded as diffusers' image processor does."""
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


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


# A transformers tokenizer sets its backend's truncation/padding state on every call: one call at a time
# (requests are generated in several threads of one process).
_TOKENIZER_LOCK = threading.Lock()


def _loras(assets: PipelineAssets, prompt: str) -> tuple[str, AppliedLoras]:
    """The prompt without its `<lora:...>` tags, and the LoRAs they ask for. Only the prompt's: A1111 reads
    no tags in the negative prompt (there a tag is text)."""
    try:
        text, tags = extra_networks.parse_extra_networks(prompt)
        return text, apply_tags(assets.loras, tags)
    except ValueError as e:  # LoraError is one
        raise InvalidInput("prompt", str(e)) from None


def _chunks(assets: PipelineAssets, text: str, field: str) -> prompts.PromptChunks:
    try:
        with _TOKENIZER_LOCK:
            return prompts.tokenize_chunks(
                assets.tokenizer, text, assets.manifest.profile.max_prompt_chunks, assets.embeddings
            )
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
