"""img2img: the first pass starts from the image's latents, noised to the first timestep its strength
keeps (as diffusers' StableDiffusionImg2ImgPipeline; A1111's "denoising strength")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from python_backend import images
from python_backend.request import GenerationRequest
from python_backend.stages import DenoisingPass, InitialNoise, Run, Start


@dataclass(frozen=True)
class ImageToImage(Start):
    request: GenerationRequest
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1], fitted to the request's size
    mask = None  # a 9-channel UNet is told to paint it all

    @classmethod
    def prepare(cls, request: GenerationRequest, picture: Image.Image) -> ImageToImage:
        fitted = images.resize(picture, request.width, request.height, request.resize_mode)
        return cls(request, images.to_model_input(fitted))

    def initial_latents(self, run: Run, denoising: DenoisingPass, noise: InitialNoise) -> torch.Tensor:
        # As diffusers: a VAE sample per image (its generator's first draw), then its noise (the second).
        image_latents = torch.cat([run.vae_sample(self.image, g) for g in run.generators])
        first = denoising.timesteps[:1].repeat(run.num_images)
        return denoising.scheduler.add_noise(image_latents, noise.draw(), first)

    def info(self) -> dict[str, Any]:
        return {"strength": self.request.strength, "resize_mode": self.request.resize_mode}
