"""The denoising core's named stages: what they hand each other, and the hooks features plug into.

`pipeline.generate` runs the stages in order — check inputs, conditioning, timesteps, initial latents,
the denoising loop (per-step model inputs), decode and paste back, info — as diffusers' pipelines read.
What a request adds to plain text to image (img2img, inpainting, variation seeds, the hires fix) is a
`Feature` in python_backend/features/: an object whose hooks those stages call, so the loop and its
neighbours never learn about any one feature.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from python_backend import schedulers
from python_backend.engines import Engines
from python_backend.request import GenerationRequest
from python_backend.shapes import VAE_SCALE, ModelGeometry


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: a seed gives the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@dataclass(frozen=True)
class Run:
    """One request as every stage sees it: the request, the engines and model, the scheduler it asked
    for, and its images' seeds."""

    request: GenerationRequest
    engines: Engines
    geometry: ModelGeometry
    scheduler: schedulers.SchedulerChoice
    scheduler_config: dict[str, Any]  # the checkpoint's, each pass's scheduler is built from
    seeds: list[int]  # image i's: the request's seed + i
    generators: list[torch.Generator]  # seeded from `seeds`; every draw of the first pass comes from these

    @classmethod
    def begin(
        cls,
        request: GenerationRequest,
        engines: Engines,
        geometry: ModelGeometry,
        scheduler: schedulers.SchedulerChoice,
        scheduler_config: dict[str, Any],
    ) -> Run:
        first_seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
        seeds = [first_seed + i for i in range(request.num_images)]
        return cls(request, engines, geometry, scheduler, scheduler_config, seeds, seeded_generators(seeds))

    @property
    def device(self) -> torch.device:
        return self.engines.device

    @property
    def num_images(self) -> int:
        return self.request.num_images

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: each UNet call carries an unconditional row beside each image's."""
        return self.request.guidance_scale > 1.0

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (self.num_images, self.geometry.latent_channels, height // VAE_SCALE, width // VAE_SCALE)

    def vae_sample(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents of [1, 3, H, W] pixels in [-1, 1]: one draw from the VAE's distribution, scaled."""
        mean, std = self.engines.encode_image(image.to(self.device))
        sample = mean + std * randn_tensor(mean.shape, generator=generator, device=self.device)
        return sample * self.geometry.vae_scaling_factor


@dataclass(frozen=True)
class DenoisingPass:
    """A scheduler of its own and the timesteps it runs, at one size: the first pass, or a hires fix's
    second. Nothing mutable is shared between passes or requests."""

    scheduler: Any
    timesteps: torch.Tensor
    generators: list[torch.Generator]  # what the pass's noise and its scheduler's random steps draw from
    width: int
    height: int

    @classmethod
    def plan(
        cls,
        run: Run,
        steps: int,
        size: tuple[int, int],
        generators: list[torch.Generator] | None = None,
        strength: float | None = None,
    ) -> DenoisingPass:
        """`generators`: the pass's own (default: the request's). `strength`: for a pass that starts from
        an image, the share of `steps` it runs (the first are skipped, as diffusers' img2img does); None for
        one from pure noise, which runs them all."""
        scheduler = schedulers.build(run.scheduler, run.scheduler_config)
        scheduler.set_timesteps(steps, device=run.device)
        timesteps = scheduler.timesteps
        if strength is not None:
            skipped = (steps - int(steps * strength)) * scheduler.order
            timesteps = timesteps[skipped:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skipped)
        return cls(scheduler, timesteps, run.generators if generators is None else generators, *size)

    @property
    def step_kwargs(self) -> dict[str, Any]:
        """The scheduler's `step` arguments besides the model output, timestep and latents."""
        accepts = schedulers.step_accepts(type(self.scheduler).__name__)
        return {"generator": self.generators} if "generator" in accepts else {}


@dataclass(frozen=True)
class Step:
    """One step of a pass, as the per-step hooks see it."""

    denoising: DenoisingPass
    index: int  # 0-based within the pass, of len(denoising.timesteps)

    @property
    def next_timestep(self) -> torch.Tensor | None:
        """The timestep the latents are at after this step ([1]); None after the pass's last."""
        following = self.denoising.timesteps[self.index + 1 : self.index + 2]
        return following if len(following) else None


@dataclass(frozen=True)
class UNetInputs:
    """One UNet call's inputs, rows [unconditional..., conditional...] under guidance. Per-step hooks
    replace fields (dataclasses.replace); an input the UNet takes only for some requests (ControlNet's
    residuals) belongs here, so the loop stays as it is."""

    sample: torch.Tensor  # the latents scaled for this timestep
    timestep: torch.Tensor  # float32 [rows, 1]: per row, so the UNet's dynamic batcher can merge requests
    text_embeddings: torch.Tensor
    lora: str  # the UNet's LoRA set (python_backend.adapters.encode_set; "" for none)
    residuals: tuple[torch.Tensor, ...] = ()  # ControlNet's, scaled and summed (python_backend.shapes)


class Feature:
    """A request feature's part in the stages. A stage calls its hook on each of the request's features in
    turn; a hook a feature does not override hands its input on unchanged."""

    def noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial latents: the first pass's noise, [N, C, h, w], one image per row."""
        return noise

    def unet_inputs(self, step: Step, inputs: UNetInputs) -> UNetInputs:
        """Per-step model inputs: what the UNet is called with at `step`."""
        return inputs

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """The latents the scheduler's step gave, before the next step (or decoding) sees them."""
        return latents

    def paste_back(self, images: np.ndarray) -> np.ndarray:
        """The decoded images, uint8 [N, H, W, 3]."""
        return images

    def info(self) -> dict[str, Any]:
        """What the feature adds to the response's info (A1111's infotext fields)."""
        return {}


@dataclass(frozen=True)
class InitialNoise:
    """The first pass's noise, drawn when the start asks for it, at the point diffusers draws it: each
    generator's draws (VAE samples, noise, latent fills) interleave, and their order is what makes a seed
    give diffusers' image."""

    run: Run
    shape: tuple[int, int, int, int]
    features: Sequence[Feature]

    def draw(self) -> torch.Tensor:
        """Image i's noise from its own generator, then through each feature's `noise`."""
        noise = randn_tensor(
            self.shape, generator=self.run.generators, device=self.run.device, dtype=torch.float32
        )
        for feature in self.features:
            noise = feature.noise(noise)
        return noise


class Start(Feature, ABC):
    """Where the first pass's latents start from: pure noise (text to image), an image (img2img), or an
    image and a mask (inpainting). A request has exactly one."""

    # What a 9-channel UNet sees beside the latents (None: an empty image, all to be painted).
    image: torch.Tensor | None  # [1, 3, H, W] in [-1, 1], at the request's size
    mask: torch.Tensor | None  # [1, 1, H, W], 1 = repaint

    @abstractmethod
    def initial_latents(self, run: Run, denoising: DenoisingPass, noise: InitialNoise) -> torch.Tensor:
        """The latents the first step denoises."""


class TextToImage(Start):
    image = None
    mask = None

    def initial_latents(self, run: Run, denoising: DenoisingPass, noise: InitialNoise) -> torch.Tensor:
        return noise.draw() * denoising.scheduler.init_noise_sigma
