"""The request and response bodies of A1111's /sdapi/v1 API, as lenient as A1111's own.

A1111 builds its request models from its processing classes with every field optional and unknown keys
ignored (pydantic's default), and under pydantic 1 an int field took 12.5 as 12. Clients rely on all three:
SillyTavern leaves its own `url`/`auth` keys in the body, aiyabot sends `denoising_strength: null` and
`hr_second_pass_steps: steps / 2`. Fields keep A1111's names and defaults, so `parameters` echoes them as
A1111 does.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _int_from_number(value: Any) -> Any:
    """A float for an int field truncated, as pydantic 1 (A1111's) did; other values go to pydantic."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return int(value)
    return value


def _seed(value: Any) -> Any:
    """A1111 reads a seed of "" or None as random (-1)."""
    if value is None or value == "":
        return -1
    return _int_from_number(value)


LenientInt = Annotated[int, BeforeValidator(_int_from_number)]
Seed = Annotated[int, BeforeValidator(_seed)]


class _A1111Body(BaseModel):
    # Unknown keys are ignored, as A1111 (pydantic's default, spelled out).
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(_A1111Body):
    """`StableDiffusionProcessingTxt2Img`'s fields as A1111's API takes them (defaults: the API's)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: Seed = -1
    subseed: Seed = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: LenientInt | None = -1
    seed_resize_from_w: LenientInt | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # legacy: a sampler *name*, used when sampler_name is absent
    scheduler: str | None = None
    batch_size: LenientInt | None = 1
    n_iter: LenientInt | None = 1
    steps: LenientInt | None = 50
    cfg_scale: float | None = 7.0
    width: LenientInt | None = 512
    height: LenientInt | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    comments: dict[str, Any] | None = None
    enable_hr: bool | None = False
    firstphase_width: LenientInt | None = 0
    firstphase_height: LenientInt | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: LenientInt | None = 0
    hr_resize_x: LenientInt | None = 0
    hr_resize_y: LenientInt | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    infotext: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """`StableDiffusionProcessingImg2Img`'s fields (A1111's img2img body has no hires fix; the txt2img ones it
    inherits here are ignored, as A1111 ignores unknown keys)."""

    init_images: list[str] | None = None  # base64 or data: URLs
    resize_mode: LenientInt | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: LenientInt | None = 4
    mask_blur_y: LenientInt | None = 4
    mask_blur: LenientInt | None = None
    inpainting_fill: LenientInt | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: LenientInt | None = 0
    inpainting_mask_invert: LenientInt | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    denoising_strength: float | None = 0.75


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs (no data: prefix), each with its infotext chunk")
    parameters: dict[str, Any] = Field(description="the request, echoed")
    info: str = Field(description="JSON string: A1111's Processed.js() keys, plus `warnings`")


class PNGInfoRequest(_A1111Body):
    image: str = Field(description="base64 PNG or a data: URL")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    """A1111's shared.state.dict(): `job` is "" and `job_count` 0 when nothing runs."""

    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 over the job's n_iter calls; 0 when idle")
    eta_relative: float = Field(description="seconds left, estimated from the progress so far")
    state: ProgressState
    current_image: str | None = Field(description="base64 PNG preview of the first image's latents, or null")
    textinfo: str | None = None


class ErrorResponse(BaseModel):
    """A1111's error body (its api_middleware's handle_exception): bad values (422), a body over
    --max-body-mb (413), Triton refusing or unreachable (503), a generation over --timeout (504)."""

    error: str
    detail: str
    body: str
    errors: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """FastAPI's own 422 body, for a body of the wrong shape (a list for an object, text for a number)."""

    detail: list[FieldError]


# The error answers as /openapi.json documents them on every route, so that the schema says what a client gets
# (FastAPI would document only ValidationErrorResponse for 422, and no other status).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Request body over --max-body-mb"},
    422: {"model": ErrorResponse | ValidationErrorResponse, "description": "A bad field, named"},
    503: {"model": ErrorResponse, "description": "Triton unreachable, overloaded or stopping"},
    504: {"model": ErrorResponse, "description": "Generation over --timeout"},
}
