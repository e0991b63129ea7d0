"""Inpainting: redraw where the mask is white, as diffusers' StableDiffusionInpaintPipeline and A1111 do.

Its stages: the mask and image prepared as A1111's (blur, "only masked" crop, fill); initial latents
from the image, with A1111's latent fills; a 4-channel UNet gets the unmasked area put back after every
step, a 9-channel (inpainting) UNet the mask and masked image as inputs beside the latents (in every
mode, as A1111 does); "only masked" is pasted back into the whole image after decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from python_backend import images
from python_backend.request import GenerationRequest
from python_backend.shapes import VAE_SCALE
from python_backend.stages import DenoisingPass, Feature, InitialNoise, Run, Start, Step, UNetInputs


@dataclass(frozen=True)
class OnlyMasked:
    """A1111's "Inpaint area: Only masked": the generated crop goes back into `original` at `region`,
    through the (blurred) mask."""

    original: Image.Image
    region: images.Region
    mask: Image.Image

    def paste_back(self, generated: np.ndarray) -> np.ndarray:
        return np.asarray(
            images.paste_back(self.original, Image.fromarray(generated), self.region, self.mask)
        )


@dataclass(frozen=True)
class KeptArea:
    """4-channel UNet: the image's latents, and the noise that brings them to any timestep, kept where the
    latent-sized mask is 0."""

    latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor


@dataclass
class Inpainting(Start):
    """Starts from the image where the mask keeps it; its `kept` area is set with the initial latents."""

    request: GenerationRequest
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1] at the request's size, masked area filled per `fill`
    mask: torch.Tensor  # [1, 1, H, W], 1 = repaint
    fill: images.InpaintingFill
    only_masked: OnlyMasked | None
    kept: KeptArea | None = None  # 4-channel UNet only

    @classmethod
    def prepare(
        cls, request: GenerationRequest, picture: Image.Image, mask: Image.Image, fill: images.InpaintingFill
    ) -> Inpainting:
        """The decoded image and mask blurred, cropped, resized and filled as A1111 does."""
        if request.mask_blur:
            mask = images.blur_mask(mask, request.mask_blur)
        size = (request.width, request.height)
        only_masked = None
        if request.inpaint_full_res and (box := images.crop_region(mask, request.inpaint_full_res_padding)):
            region = images.expand_to_aspect(box, *size, picture.size)
            only_masked = OnlyMasked(picture, region, mask)
            picture, mask = picture.crop(region), mask.crop(region)
        picture = images.resize(picture, *size, request.resize_mode)
        mask = images.resize(mask, *size, request.resize_mode)
        if fill.fills_image:
            picture = images.fill_masked_image(picture, mask)
        return cls(request, images.to_model_input(picture), images.mask_to_tensor(mask), fill, only_masked)

    def initial_latents(self, run: Run, denoising: DenoisingPass, noise: InitialNoise) -> torch.Tensor:
        # As diffusers: one VAE sample (the first generator's), noise per image.
        n, first_generator = run.num_images, run.generators[0]
        full_strength = self.request.strength == 1.0
        image_latents = None
        if run.geometry.unet_in_channels == 4:
            sampled = run.vae_sample(self.image, first_generator).repeat(n, 1, 1, 1)
            drawn = noise.draw()
            # diffusers also samples the masked image's latents, which a 4-channel UNet never reads;
            # the same draw keeps the first generator's later noise (ancestral steps) identical.
            randn_tensor((1, *noise.shape[1:]), generator=first_generator)
            mask = F.interpolate(self.mask, size=noise.shape[-2:]).to(run.device)
            image_latents = _latent_fill(self.fill, sampled, mask, run.generators)
            self.kept = KeptArea(image_latents, drawn, mask)
        else:
            if not full_strength:
                image_latents = run.vae_sample(self.image, first_generator).repeat(n, 1, 1, 1)
            drawn = noise.draw()
        if full_strength:
            return drawn * denoising.scheduler.init_noise_sigma
        return denoising.scheduler.add_noise(image_latents, drawn, denoising.timesteps[:1].repeat(n))

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            return latents
        # Keep the unmasked area on the original, noised to the next step.
        known = self.kept.latents
        if (following := step.next_timestep) is not None:
            known = step.denoising.scheduler.add_noise(known, self.kept.noise, following)
        return (1 - self.kept.mask) * known + self.kept.mask * latents

    def paste_back(self, generated: np.ndarray) -> np.ndarray:
        if self.only_masked is None:
            return generated
        return np.stack([self.only_masked.paste_back(image) for image in generated])

    def info(self) -> dict[str, Any]:
        request = self.request
        return {
            "strength": request.strength,
            "resize_mode": request.resize_mode,
            "mask_blur": request.mask_blur,
            "inpainting_fill": self.fill.value,
            "inpaint_full_res": request.inpaint_full_res,
            "inpaint_full_res_padding": request.inpaint_full_res_padding,
        }


@dataclass(frozen=True)
class MaskConditioning(Feature):
    """A 9-channel UNet's inputs beside the latents: the mask and the masked image's latents, at one
    pass's size."""

    channels: torch.Tensor  # [rows, 5, h, w]

    def unet_inputs(self, step: Step, inputs: UNetInputs) -> UNetInputs:
        return replace(inputs, sample=torch.cat([inputs.sample, self.channels], dim=1))


def unet_conditioning(
    run: Run, denoising: DenoisingPass, image: torch.Tensor | None, mask: torch.Tensor | None
) -> list[Feature]:
    """What a 9-channel UNet needs at every step of `denoising` ([] for a 4-channel UNet). Without a mask,
    everything is to be painted (A1111's text to image and img2img with inpainting models)."""
    if run.geometry.unet_in_channels != 9:
        return []
    width, height, n = denoising.width, denoising.height, run.num_images
    mask = mask if mask is not None else torch.ones(1, 1, height, width)
    image = image if image is not None else torch.zeros(1, 3, height, width)
    masked = run.vae_sample(image * (mask < 0.5), run.generators[0]).repeat(n, 1, 1, 1)
    mask_latents = F.interpolate(mask, size=(height // VAE_SCALE, width // VAE_SCALE)).to(run.device)
    both = torch.cat([mask_latents.repeat(n, 1, 1, 1), masked], dim=1)
    return [MaskConditioning(torch.cat([both, both]) if run.guided else both)]


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
