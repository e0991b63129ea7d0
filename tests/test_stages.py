"""The stages' interface that features plug into (python_backend/stages.py): passes and their timesteps,
steps, the hooks' defaults, and what the per-step hooks see and may change."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from python_backend import schedulers
from python_backend.conditioning import Conditioning
from python_backend.features import inpainting
from python_backend.features.variations import VariationSeeds
from python_backend.pipeline import _denoise, _Steps
from python_backend.request import GenerationRequest
from python_backend.stages import DenoisingPass, Feature, Run, Step, UNetInputs

SIZE = (64, 64)


def _run(engines, assets, **fields) -> Run:
    request = GenerationRequest(prompt="a cat", width=64, height=64, seed=3, **fields)
    return Run.begin(
        request, engines, assets.manifest.geometry, schedulers.lookup("euler"), assets.scheduler_config
    )


def test_a_hook_left_alone_hands_its_input_on(engines, assets):
    feature, latents = Feature(), torch.randn(1, 4, 8, 8)
    inputs = UNetInputs(latents, torch.zeros(1, 1), torch.zeros(1, 77, 32), "")
    step = Step(DenoisingPass.plan(_run(engines, assets), 2, SIZE), 0)
    assert feature.noise(latents) is latents and feature.after_step(step, latents) is latents
    assert feature.unet_inputs(step, inputs) is inputs and feature.info() == {}
    images = np.zeros((1, 64, 64, 3), np.uint8)
    assert feature.paste_back(images) is images


def test_a_pass_from_an_image_runs_the_last_strength_of_its_steps(engines, assets):
    run = _run(engines, assets)
    full = DenoisingPass.plan(run, 10, SIZE)
    partial = DenoisingPass.plan(run, 10, SIZE, strength=0.3)
    assert len(full.timesteps) == 10 and torch.equal(partial.timesteps, full.timesteps[-3:])
    assert partial.generators is run.generators  # the request's unless the pass has its own
    assert Step(partial, 0).next_timestep == partial.timesteps[1]
    assert Step(partial, len(partial.timesteps) - 1).next_timestep is None


class _Recorder(Feature):
    """A per-step feature as ControlNet will be one: it sees every step and may change the UNet's inputs."""

    def __init__(self, blank_text: bool) -> None:
        self.blank_text = blank_text
        self.seen: list[tuple[int, int]] = []

    def unet_inputs(self, step: Step, inputs: UNetInputs) -> UNetInputs:
        self.seen.append((step.index, len(step.denoising.timesteps)))
        return replace(inputs, text_embeddings=inputs.text_embeddings * 0) if self.blank_text else inputs


def test_per_step_hooks_see_every_step_and_change_what_the_unet_gets(engines, assets):
    run = _run(engines, assets, guidance_scale=1.0)
    latents = torch.randn(run.latent_shape(*SIZE))
    text = Conditioning(torch.randn(1, 77, run.geometry.text_hidden_size), "", {}, {}, 1)

    def denoise(features: list[Feature]) -> torch.Tensor:
        return _denoise(run, DenoisingPass.plan(run, 3, SIZE), latents, text, features, _Steps(None, 3, 0.0))

    plain, watcher, blanker = denoise([]), _Recorder(blank_text=False), _Recorder(blank_text=True)
    assert torch.equal(denoise([watcher]), plain)
    assert not torch.equal(denoise([blanker]), plain)
    assert watcher.seen == blanker.seen == [(0, 3), (1, 3), (2, 3)]


def test_variation_seeds_are_a_feature_only_when_asked_for():
    assert VariationSeeds.for_request(GenerationRequest(prompt="x")) is None
    variation = VariationSeeds.for_request(
        GenerationRequest(prompt="x", num_images=2, subseed=5, subseed_strength=0.5)
    )
    assert variation is not None and variation.info() == {"subseeds": [5, 6], "subseed_strength": 0.5}


def test_a_4_channel_unet_gets_no_mask_inputs(engines, assets):
    run = _run(engines, assets)
    assert inpainting.unet_conditioning(run, DenoisingPass.plan(run, 2, SIZE), None, None) == []
