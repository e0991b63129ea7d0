"""ControlNet units of a request (issue 16): their fields as the pipeline models take them, defaults and
validation, as A1111's sd-webui-controlnet extension names them.

A request carries up to `max_units` units (build-engines --controlnet-units), each as pipeline inputs
`controlnet_{i}_{field}` (one value each, like every other pipeline input), so that Triton's config lists
them with their types and a bad one is an INVALID_ARG naming unit and field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np

from python_backend.request import InvalidInput

DEFAULT_MAX_UNITS = 3
BALANCED, PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT = (
    "Balanced",
    "My prompt is more important",
    "ControlNet is more important",
)
CONTROL_MODES = (BALANCED, PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT)  # the extension's 0, 1, 2
MAX_WEIGHT = 2.0  # the extension's slider range


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: which ControlNet, its control image and how it steers."""

    model: str  # the ControlNet engine's name (build-engines --controlnet NAME=PATH)
    image: bytes  # PNG/JPEG/WebP: a control map (module "none") or a picture for the preprocessor
    weight: float = 1.0  # the residuals' scale (diffusers' controlnet_conditioning_scale)
    guidance_start: float = 0.0  # share of the steps before the unit takes part
    guidance_end: float = 1.0  # share of the steps after which it stops
    control_mode: str = BALANCED
    resize_mode: str = "Crop and Resize"  # how the control image is fitted to the image size
    module: str = "none"  # the preprocessor
    processor_res: int = -1  # the preprocessor's resolution (-1: its default)
    threshold_a: float = -1.0  # the preprocessor's parameters (-1: its defaults; canny: low, high)
    threshold_b: float = -1.0
    pixel_perfect: bool = False  # processor_res from the image size, as the extension's pixel perfect

    def validate(self, index: int, models: tuple[str, ...]) -> None:
        """InvalidInput naming the unit's field (`controlnet_{index}_{field}`)."""
        name = f"controlnet_{index}_"
        if self.model not in models:
            known = (
                ", ".join(models) if models else "none (build the engines with build-engines --controlnet)"
            )
            raise InvalidInput(name + "model", f"unknown ControlNet {self.model!r}; this server has: {known}")
        if not math.isfinite(self.weight) or not 0 <= self.weight <= MAX_WEIGHT:
            raise InvalidInput(name + "weight", f"must be in 0..{MAX_WEIGHT}, got {self.weight}")
        for field in ("guidance_start", "guidance_end"):
            value = getattr(self, field)
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise InvalidInput(name + field, f"must be in 0..1, got {value}")
        if self.guidance_start > self.guidance_end:
            raise InvalidInput(
                name + "guidance_start",
                f"{self.guidance_start} is after guidance_end {self.guidance_end}: the unit would never act",
            )
        if self.control_mode not in CONTROL_MODES:
            raise InvalidInput(
                name + "control_mode", f"must be one of {', '.join(CONTROL_MODES)}, got {self.control_mode!r}"
            )


# The pipeline inputs of one unit: field → Triton type (BYTES for text and the image).
UNIT_FIELDS: dict[str, type[np.generic]] = {
    "model": np.object_,
    "image": np.object_,
    "weight": np.float32,
    "guidance_start": np.float32,
    "guidance_end": np.float32,
    "control_mode": np.object_,
    "resize_mode": np.object_,
    "module": np.object_,
    "processor_res": np.int32,
    "threshold_a": np.float32,
    "threshold_b": np.float32,
    "pixel_perfect": np.bool_,
}
assert set(UNIT_FIELDS) == {f.name for f in fields(ControlUnit)}
_UNIT_INPUT = re.compile(r"controlnet_(\d+)_([a-z_]+)")


def unit_inputs(max_units: int) -> dict[str, type[np.generic]]:
    """The pipeline model's inputs for `max_units` units."""
    return {f"controlnet_{i}_{field}": kind for i in range(max_units) for field, kind in UNIT_FIELDS.items()}


def unit_field(name: str) -> str | None:
    """The field a `controlnet_{i}_{field}` input names; None for any other name."""
    match = _UNIT_INPUT.fullmatch(name)
    return match[2] if match is not None and match[2] in UNIT_FIELDS else None


def units_from_values(values: dict[str, object]) -> tuple[ControlUnit, ...]:
    """The units from `controlnet_{i}_{field}` values (already typed), in index order: numbered from 0, each
    with its model and image (InvalidInput names the first input that breaks that)."""
    per_unit: dict[int, dict[str, object]] = {}
    for name, value in values.items():
        match = _UNIT_INPUT.fullmatch(name)
        assert match is not None and match[2] in UNIT_FIELDS, name
        per_unit.setdefault(int(match[1]), {})[match[2]] = value
    units: list[ControlUnit] = []
    for index in sorted(per_unit):
        given = per_unit[index]
        if index != len(units):
            raise InvalidInput(
                f"controlnet_{index}_{next(iter(given))}",
                f"unit {index} without unit {len(units)}: units are numbered from 0",
            )
        for required in ("model", "image"):
            if required not in given:
                raise InvalidInput(f"controlnet_{index}_{required}", "is required for a ControlNet unit")
        units.append(ControlUnit(**given))  # type: ignore[arg-type]
    return tuple(units)
