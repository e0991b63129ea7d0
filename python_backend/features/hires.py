"""A1111's hires fix: the first pass upscaled (its latents, or its decoded images), then redrawn at the
larger size by a second pass of its own, as img2img at `denoising_strength`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from python_backend import images
from python_backend.request import GenerationRequest
from python_backend.stages import DenoisingPass, Feature, Run, seeded_generators


@dataclass(frozen=True)
class HiresFix(Feature):
    request: GenerationRequest
    second_pass: DenoisingPass

    @classmethod
    def plan(cls, run: Run) -> HiresFix:
        request = run.request
        steps = request.hr_second_pass_steps or request.num_inference_steps
        # The second pass draws from generators seeded afresh, so it depends on the seeds alone.
        generators = seeded_generators(run.seeds)
        second_pass = DenoisingPass.plan(
            run, steps, request.hires_size(), generators, strength=request.denoising_strength
        )
        return cls(request, second_pass)

    def initial_latents(
        self, run: Run, first_pass: torch.Tensor, decode: Callable[[torch.Tensor], np.ndarray]
    ) -> torch.Tensor:
        """The second pass's latents from the first's; `decode` is the core's, for an upscaler of pixels."""
        second = self.second_pass
        shape = run.latent_shape(second.width, second.height)
        if self.request.hr_upscaler.lower() == "latent":
            upscaled = F.interpolate(first_pass, size=shape[-2:], mode="bilinear")
        else:
            resized = [
                images.to_model_input(
                    Image.fromarray(a).resize((second.width, second.height), images.LANCZOS)
                )
                for a in decode(first_pass)
            ]
            upscaled = torch.cat([run.vae_sample(x, g) for x, g in zip(resized, run.generators, strict=True)])
        noise = randn_tensor(shape, generator=second.generators, device=run.device, dtype=torch.float32)
        return second.scheduler.add_noise(upscaled, noise, second.timesteps[:1].repeat(run.num_images))

    def info(self) -> dict[str, Any]:
        request = self.request
        return {
            "hr_scale": request.hr_scale,
            "hr_upscaler": request.hr_upscaler,
            "hr_second_pass_steps": request.hr_second_pass_steps,
            "denoising_strength": request.denoising_strength,
            "first_pass_width": request.width,
            "first_pass_height": request.height,
        }
