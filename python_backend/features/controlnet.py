"""ControlNet units (issue 16): at each step, each unit's ControlNet engine turns the UNet rows' latents and
the unit's control map into residuals, scaled per residual as the unit's control mode says, summed over the
units, and added by the UNet to its skip connections and middle block.

The scaling happens here, per request, so that the engines stay free of per-request state: requests with
different ControlNets, weights, windows and modes, and requests without any (`ZeroResiduals`), share UNet
runs. Semantics (sources: ../shared/research/lora_controlnet.md §7):

- window: diffusers' `control_guidance_start/end`: at step i of T the unit acts unless i/T < start or
  (i + 1)/T > end;
- Balanced: every residual × weight, on both halves of a guided batch (diffusers' default);
- ControlNet is more important: diffusers' guess mode: under guidance the ControlNet sees only the
  conditional rows, the unconditional ones get no residuals, and residual k of n is scaled by
  10^(k/(n-1) - 1) × weight (the extension's 0.825^(n-1-k) is the same curve within 0.6%);
- My prompt is more important: the extension's soft injection, 0.825^(n-1-k) × weight on both halves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from python_backend import control_images, images
from python_backend.control import BALANCED, CONTROLNET_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, ControlUnit
from python_backend.request import InvalidInput
from python_backend.shapes import ModelGeometry, PipelineManifest, control_residuals, with_scaled_latents
from python_backend.stages import Feature, Run, Step, UNetInputs

SOFT_INJECTION = 0.825  # sd-webui-controlnet's per-residual decay for the soft control modes

# (unit index, width, height) → the unit's control map at that size, uint8 [H, W, 3]
MapMaker = Callable[[int, int, int], np.ndarray]


def residual_scales(mode: str, weight: float, count: int) -> list[float]:
    """Each of `count` residuals' scale for a unit of `weight` in control mode `mode`."""
    if mode == BALANCED:
        return [weight] * count
    if mode == CONTROLNET_MORE_IMPORTANT:  # diffusers' torch.logspace(-1, 0, count)
        return [weight * 10 ** (k / (count - 1) - 1) for k in range(count)]
    if mode == PROMPT_MORE_IMPORTANT:
        return [weight * SOFT_INJECTION ** (count - 1 - k) for k in range(count)]
    raise ValueError(f"unknown control mode {mode!r}")


def in_window(unit: ControlUnit, index: int, steps: int) -> bool:
    """Whether the unit acts at step `index` of `steps` (diffusers' control_guidance_start/end)."""
    return not (index / steps < unit.guidance_start or (index + 1) / steps > unit.guidance_end)


@dataclass
class ControlNets(Feature):
    """A request's ControlNet units. `make_map` gives a unit's control map at a pass's size (the first
    pass's, and the hires fix's second), made once per unit and size."""

    run: Run
    units: Sequence[ControlUnit]
    make_map: MapMaker
    _maps: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_request(cls, run: Run, manifest: PipelineManifest) -> ControlNets:
        """The request's units, each checked and its control map made at the request's size (so that a bad
        field fails the request before any engine runs). InvalidInput names the unit and field."""
        profile = manifest.profile
        limits = {
            "max_side": max(profile.width[2], profile.height[2]),
            "max_pixels": profile.width[2] * profile.height[2],
        }
        units = run.request.controlnets
        pictures = []
        for i, unit in enumerate(units):
            unit.validate(i, manifest.controlnets)
            pictures.append(np.asarray(images.decode_image(unit.image, f"controlnet_{i}_image", **limits)))

        def make_map(i: int, width: int, height: int) -> np.ndarray:
            unit = units[i]
            try:
                return control_images.control_map(
                    pictures[i],
                    unit.module,
                    width,
                    height,
                    unit.resize_mode,
                    processor_res=unit.processor_res,
                    threshold_a=unit.threshold_a,
                    threshold_b=unit.threshold_b,
                    pixel_perfect=unit.pixel_perfect,
                )
            except InvalidInput as e:  # its field is the unit's
                problem = str(e).removeprefix(f"{e.field}: ")
                raise InvalidInput(f"controlnet_{i}_{e.field}", problem) from None

        controlnets = cls(run, units, make_map)
        controlnets.prepare(run.request.width, run.request.height)
        return controlnets

    def prepare(self, width: int, height: int) -> None:
        """Make every unit's control map at this size now (a bad unit fails before any engine runs)."""
        for i in range(len(self.units)):
            self._map(i, width, height)

    def unet_inputs(self, step: Step, inputs: UNetInputs) -> UNetInputs:
        total: list[torch.Tensor] | None = None
        steps = len(step.denoising.timesteps)
        for i, unit in enumerate(self.units):
            if not in_window(unit, step.index, steps):
                continue
            residuals = self._residuals(i, unit, step, inputs)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals, strict=True)]
        return inputs if total is None else replace(inputs, residuals=tuple(total))

    def _residuals(self, i: int, unit: ControlUnit, step: Step, inputs: UNetInputs) -> list[torch.Tensor]:
        latents = inputs.sample[:, : self.run.geometry.latent_channels]  # an inpainting UNet's too
        rows = slice(None)
        guess = unit.control_mode == CONTROLNET_MORE_IMPORTANT and self.run.guided
        if guess:  # the conditional half only; the unconditional rows get nothing
            rows = slice(len(latents) // 2, None)
        image = self._map(i, step.denoising.width, step.denoising.height)
        latents = latents[rows]
        residuals = self.run.engines.control(
            unit.model,
            latents.contiguous(),
            inputs.timestep[rows],
            inputs.text_embeddings[rows].contiguous(),
            image.expand(len(latents), -1, -1, -1).contiguous(),
        )
        scales = residual_scales(unit.control_mode, unit.weight, len(residuals))
        scaled = [r * s for r, s in zip(residuals, scales, strict=True)]
        if guess:
            scaled = [torch.cat([torch.zeros_like(r), r]) for r in scaled]
        return scaled

    def _map(self, i: int, width: int, height: int) -> torch.Tensor:
        """[1, 3, H, W] float32 in [0, 1] on the engines' device, as diffusers feeds a control image."""
        key = (i, width, height)
        if key not in self._maps:
            pixels = self.make_map(i, width, height)
            tensor = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
            self._maps[key] = tensor.to(self.run.device)
        return self._maps[key]

    def info(self) -> dict[str, object]:
        return {"controlnets": [_unit_info(unit) for unit in self.units]}


def _unit_info(unit: ControlUnit) -> dict[str, object]:
    return {
        "module": unit.module,
        "model": unit.model,
        "weight": unit.weight,
        "resize_mode": unit.resize_mode,
        "processor_res": unit.processor_res,
        "threshold_a": unit.threshold_a,
        "threshold_b": unit.threshold_b,
        "guidance_start": unit.guidance_start,
        "guidance_end": unit.guidance_end,
        "pixel_perfect": unit.pixel_perfect,
        "control_mode": unit.control_mode,
    }


@dataclass
class ZeroResiduals(Feature):
    """For a UNet that takes ControlNet residuals (build-engines --controlnet): zeros for a call whose rows
    have none, so that it can share the UNet's runs with requests that do. Runs after every other feature."""

    geometry: ModelGeometry
    _zeros: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def unet_inputs(self, step: Step, inputs: UNetInputs) -> UNetInputs:
        if inputs.residuals:
            return inputs
        rows, _, height, width = inputs.sample.shape
        key = (rows, height, width)
        if key not in self._zeros:
            sizes = with_scaled_latents(
                {"guided_batch": rows, "latent_height": height, "latent_width": width}
            )
            self._zeros[key] = tuple(
                torch.zeros(
                    tuple(sizes[d] if isinstance(d, str) else d for d in t.dims), device=inputs.sample.device
                )
                for t in control_residuals(self.geometry)
            )
        return replace(inputs, residuals=self._zeros[key])
