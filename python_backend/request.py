"""A generation request: its fields, their defaults (stable-diffusion-v1-4's) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from python_backend import schedulers
from python_backend.shapes import VAE_SCALE, Profile

if TYPE_CHECKING:
    from python_backend.control import ControlUnit

MAX_SEED = 2**63 - 1

# The pipeline model's inputs, each one value (Triton dims [1]); all but `prompt` optional.
# Names are GenerationRequest's field names; np.object_ is Triton's BYTES (UTF-8 text).
REQUEST_INPUTS: dict[str, type[np.generic]] = {
    "prompt": np.object_,
    "negative_prompt": np.object_,
    "width": np.int32,
    "height": np.int32,
    "num_inference_steps": np.int32,
    "num_images": np.int32,
    "guidance_scale": np.float32,
    "seed": np.int64,
    "scheduler": np.object_,
    "image": np.object_,
    "strength": np.float32,
    "resize_mode": np.object_,
    "mask": np.object_,
    "mask_blur": np.int32,
    "inpainting_fill": np.object_,
    "inpaint_full_res": np.bool_,
    "inpaint_full_res_padding": np.int32,
    "subseed": np.int64,
    "subseed_strength": np.float32,
    "enable_hr": np.bool_,
    "hr_scale": np.float32,
    "hr_upscaler": np.object_,
    "hr_second_pass_steps": np.int32,
    "denoising_strength": np.float32,
    "clip_skip": np.int32,
}
HR_UPSCALERS = ("Latent", "Lanczos")
# Inputs only the streaming model (`pipeline_stream`) takes: a preview PNG every k steps (0 = none).
STREAM_INPUTS: dict[str, type[np.generic]] = {"preview_every": np.int32}
# Inputs of both pipeline models that steer a request rather than describe it: `job_id` names it for
# `pipeline_control`'s interrupt and skip (python_backend.jobs).
CONTROL_INPUTS: dict[str, type[np.generic]] = {"job_id": np.object_}
# BYTES inputs that carry files (PNG/JPEG/WebP), not text.
BINARY_INPUTS = frozenset({"image", "mask"})
MAX_MASK_BLUR = 64  # A1111's slider range
MAX_INPAINT_PADDING = 256


class InvalidInput(ValueError):
    """A request field with a bad value; the message names the field (Triton: INVALID_ARG)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    num_inference_steps: int = 50
    num_images: int = 1
    guidance_scale: float = 7.5
    seed: int = -1  # -1: draw a random one
    scheduler: str | None = None  # None: the checkpoint's own
    image: bytes | None = None  # img2img: the initial image (PNG/JPEG/WebP)
    strength: float = 0.75  # img2img: how much of the image is redrawn (A1111's denoising strength)
    resize_mode: str = "just_resize"  # img2img: how the image is fitted to width x height
    mask: bytes | None = None  # inpainting: white = repaint (needs `image`)
    mask_blur: int = 4  # inpainting: Gaussian blur radius of the mask, pixels (A1111's default)
    inpainting_fill: str = "original"  # inpainting: what the masked area starts from
    inpaint_full_res: bool = False  # inpainting "only masked": generate the masked area at full size
    inpaint_full_res_padding: int = 32  # ... with this many pixels of context around it
    subseed: int = -1  # variation seed (-1: random); image i uses subseed + i
    subseed_strength: float = 0.0  # how far the noise moves toward the variation seed's (slerp)
    enable_hr: bool = False  # hires fix: a first pass at width x height, upscaled, then redrawn
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"  # "Latent" (bilinear on latents) or "Lanczos" (on the decoded image)
    hr_second_pass_steps: int = 0  # 0: num_inference_steps
    denoising_strength: float = 0.7  # of the second pass
    clip_skip: int = 1  # A1111's "Clip skip": 1 = CLIP's last layer, 2 = the penultimate (diffusers' 1)
    controlnets: tuple[ControlUnit, ...] = ()  # inputs controlnet_{i}_{field} (python_backend.control)

    def hires_size(self) -> tuple[int, int]:
        """A1111's int(side x hr_scale), down to a multiple of the VAE's 8."""
        return tuple(int(side * self.hr_scale) // VAE_SCALE * VAE_SCALE for side in (self.width, self.height))  # type: ignore[return-value]

    def _validate_hires(self, profile: Profile, max_steps: int) -> None:
        if self.image is not None:
            raise InvalidInput("enable_hr", "hires fix is for text to image; send no image with it")
        _in_range("hr_scale", self.hr_scale, 1.0, 4.0)
        width, height = self.hires_size()
        if not (
            profile.width[0] <= width <= profile.width[2] and profile.height[0] <= height <= profile.height[2]
        ):
            raise InvalidInput(
                "hr_scale",
                f"{self.hr_scale} makes {width}x{height}, outside the engines' profile "
                f"({profile.width[0]}..{profile.width[2]} x {profile.height[0]}..{profile.height[2]})",
            )
        if self.hr_upscaler.lower() not in {u.lower() for u in HR_UPSCALERS}:
            raise InvalidInput(
                "hr_upscaler", f"must be one of {', '.join(HR_UPSCALERS)}, got {self.hr_upscaler!r}"
            )
        _in_range("hr_second_pass_steps", self.hr_second_pass_steps, 0, max_steps)
        _in_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
        steps = self.hr_second_pass_steps or self.num_inference_steps
        if int(steps * self.denoising_strength) < 1:
            raise InvalidInput(
                "denoising_strength", f"{self.denoising_strength} x {steps} steps leaves no second-pass step"
            )

    def validate(
        self, profile: Profile, max_steps: int, text_layers: int
    ) -> schedulers.SchedulerChoice | None:
        """Raise InvalidInput for the first bad field; return the requested scheduler, if any.

        text_layers: the text encoder's layer count (`ModelGeometry.text_layers`), clip_skip's maximum."""
        for name, value, (low, _, high) in (
            ("width", self.width, profile.width),
            ("height", self.height, profile.height),
        ):
            if value % VAE_SCALE or not low <= value <= high:
                allowed = f"{low}" if low == high else f"a multiple of {VAE_SCALE} in {low}..{high}"
                raise InvalidInput(name, f"must be {allowed} (the engines' profile), got {value}")
        if not 1 <= self.num_inference_steps <= max_steps:
            raise InvalidInput(
                "num_inference_steps", f"must be in 1..{max_steps}, got {self.num_inference_steps}"
            )
        if not 1 <= self.num_images <= profile.max_batch:
            raise InvalidInput("num_images", f"must be in 1..{profile.max_batch}, got {self.num_images}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise InvalidInput("guidance_scale", f"must be a finite number >= 0, got {self.guidance_scale}")
        if not -1 <= self.seed <= MAX_SEED - self.num_images:
            raise InvalidInput(
                "seed", f"must be -1 (random) or in 0..{MAX_SEED - self.num_images}, got {self.seed}"
            )
        if not math.isfinite(self.strength) or not 0 <= self.strength <= 1:
            raise InvalidInput("strength", f"must be in 0..1, got {self.strength}")
        if self.image is not None and int(self.num_inference_steps * self.strength) < 1:
            raise InvalidInput(
                "strength",
                f"{self.strength} x {self.num_inference_steps} steps leaves no denoising step; raise either",
            )
        if self.mask is not None and self.image is None:
            raise InvalidInput("mask", "needs an image to inpaint (the image input)")
        if not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise InvalidInput("mask_blur", f"must be in 0..{MAX_MASK_BLUR}, got {self.mask_blur}")
        if not 0 <= self.inpaint_full_res_padding <= MAX_INPAINT_PADDING:
            raise InvalidInput(
                "inpaint_full_res_padding",
                f"must be in 0..{MAX_INPAINT_PADDING}, got {self.inpaint_full_res_padding}",
            )
        if not -1 <= self.subseed <= MAX_SEED - self.num_images:
            raise InvalidInput(
                "subseed", f"must be -1 (random) or in 0..{MAX_SEED - self.num_images}, got {self.subseed}"
            )
        if not math.isfinite(self.subseed_strength) or not 0 <= self.subseed_strength <= 1:
            raise InvalidInput("subseed_strength", f"must be in 0..1, got {self.subseed_strength}")
        if self.enable_hr:
            self._validate_hires(profile, max_steps)
        _in_range("clip_skip", self.clip_skip, 1, text_layers)
        if self.scheduler is None:
            return None
        try:
            return schedulers.lookup(self.scheduler)
        except schedulers.UnknownScheduler as e:
            raise InvalidInput("scheduler", str(e)) from None


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidInput(name, f"must be in {low}..{high}, got {value}")


def request_from_inputs(inputs: dict[str, np.ndarray]) -> GenerationRequest:
    """A request from the pipeline model's input tensors (absent optional inputs keep defaults)."""
    from python_backend.control import UNIT_FIELDS, unit_field, units_from_values

    if "prompt" not in inputs:
        raise InvalidInput("prompt", "is required")
    values: dict[str, object] = {}
    unit_values: dict[str, object] = {}
    for name, array in inputs.items():
        field = unit_field(name)
        if name not in REQUEST_INPUTS and field is None:
            raise InvalidInput(name, f"unknown input; expected one of {', '.join(REQUEST_INPUTS)}")
        if array.size != 1:
            raise InvalidInput(name, f"expected exactly one value, got shape {list(array.shape)}")
        value = array.reshape(-1)[0]
        if field is None:
            values[name] = _typed(name, value, REQUEST_INPUTS[name], binary=name in BINARY_INPUTS)
        else:
            unit_values[name] = _typed(name, value, UNIT_FIELDS[field], binary=field == "image")
    if unit_values:
        values["controlnets"] = units_from_values(unit_values)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def _typed(name: str, value: Any, kind: type[np.generic], binary: bool) -> object:
    """One input's value as the request field's Python type."""
    if binary:
        return bytes(value)
    if kind is np.object_:
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise InvalidInput(name, "is not valid UTF-8") from None
    return float(value) if kind is np.float32 else bool(value) if kind is np.bool_ else int(value)
