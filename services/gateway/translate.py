"""A1111 request fields to the pipeline's inputs, and the pipeline's results to A1111's response.

Everything here is pure (no I/O), so each rule is testable without a server. The rules follow A1111
v1.10's processing code: where A1111 silently falls back (an unknown sampler, an unknown
`override_settings.sd_model_checkpoint`) we fall back too and say so in `info["warnings"]`; fields we cannot
honour (restore_faces, tiling, styles, scripts, ...) are accepted and reported there as well.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from client.api import ControlNetUnit, GenerateOptions, GenerationResult
from client.infotext import save_png
from python_backend import schedulers
from python_backend.control import CONTROL_MODES
from python_backend.request import InvalidInput
from python_backend.shapes import PIPELINE
from services.gateway.models import Img2ImgRequest, Txt2ImgRequest

A1111_VERSION = "v1.10.1"  # what `info.version` reports: clients branch on A1111's, not on ours
MAX_SEED = 4294967294  # A1111 draws random seeds in [0, 4294967294)

# Schedule types (A1111's `scheduler`) by name and label, lowercased. Only Karras changes what we run: the
# pipeline's schedulers are the plain ones plus " Karras" variants.
SCHEDULE_TYPES = {"automatic": "Automatic", "karras": "Karras"}
# Schedule labels A1111 strips from a legacy combined sampler name ("DPM++ 2M Karras").
_LEGACY_SUFFIXES = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "Uniform", "Simple", "Normal")
# A1111's latent upscale modes: all run as our one "Latent" (bilinear on latents).
LATENT_UPSCALE_MODES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
# A1111's inpainting_fill / resize_mode numbers as the pipeline's names.
INPAINTING_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")

# Pipeline input (or generate() argument) -> the A1111 field a client sent it as, for error messages.
A1111_FIELDS = {
    "num_inference_steps": "steps",
    "steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "image": "init_images",
    "strength": "denoising_strength",
    "scheduler": "sampler_name",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint the server hosts, with the names A1111 gives a checkpoint, and its pipeline model."""

    model: str
    model_hash: str
    pipeline: str = PIPELINE  # the Triton model that generates with it
    vae: str = ""  # the VAE it was built with (build-engines --vae); "" for its own
    # Textual inversions its text encoder knows (build-engines --embeddings): name → {vectors, shape, hash}.
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    controlnets: list[str] = field(
        default_factory=list
    )  # its ControlNet engines (build-engines --controlnet)

    @classmethod
    def from_parameter(cls, pipeline: str, found: dict[str, Any]) -> Checkpoint:
        """From the pipeline model's `checkpoint` config parameter (build-engines writes it)."""
        return cls(
            str(found["model"]),
            str(found.get("model_hash", "")),
            pipeline,
            str(found.get("vae", "")),
            dict(found.get("embeddings", {})),
            [str(name) for name in found.get("controlnets", [])],
        )

    @property
    def title(self) -> str:
        return f"{self.model} [{self.model_hash}]" if self.model_hash else self.model

    def matches(self, name: str) -> bool:
        """A1111 finds a checkpoint by title, model name, file name (with or without extension) or hash."""
        name = name.strip()
        stem = re.sub(r"\.(safetensors|ckpt)$", "", name.split(" [")[0])
        return name in (self.title, self.model, self.model_hash) or stem == self.model

    def listing(self) -> dict[str, Any]:
        """Its /sdapi/v1/sd-models entry."""
        return {
            "title": self.title,
            "model_name": self.model,
            "hash": self.model_hash or None,
            "sha256": None,  # the pipeline knows only the short hash
            "filename": self.model,
            "config": None,
        }


def find_checkpoint(served: Sequence[Checkpoint], name: str) -> Checkpoint | None:
    """The checkpoint `name` names (any of A1111's aliases, `Checkpoint.matches`); the first if several do."""
    return next((c for c in served if c.matches(name)), None)


@dataclass
class Plan:
    """What one A1111 request becomes: generate() calls (one per `n_iter`) to `checkpoint`'s pipeline and
    what to report."""

    calls: list[GenerateOptions]
    checkpoint: Checkpoint
    warnings: list[str] = field(default_factory=list)
    sampler_name: str | None = None  # A1111's sampler label, without the schedule type
    schedule_type: str = "Automatic"
    seed: int = -1
    subseed: int = -1


def decode_image(value: str, field: str) -> bytes:
    """A base64 image or data: URL as file bytes (A1111 takes both)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "expected a base64 image or a data: URL, got an empty value")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(field, f"not base64: {exc}") from None


CONTROLNET_SCRIPT = "controlnet"  # A1111 matches alwayson_scripts keys to script titles case-insensitively
# The extension's resize modes by their API index.
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_MODEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # "control_v11p_sd15_canny [d14c016b]"


def controlnet_units(scripts: dict[str, Any], warnings: list[str]) -> tuple[ControlNetUnit, ...]:
    """The enabled units of an `alwayson_scripts.ControlNet.args` list, as sd-webui-controlnet's API takes
    them (webuiapi's ControlNetUnit.to_dict and the extension's examples); InvalidInput names a bad one."""
    script = next((v for k, v in scripts.items() if k.lower() == CONTROLNET_SCRIPT), None)
    if script is None:
        return ()
    # webuiapi sends {"args": []} when the server lists ControlNet among its scripts: no units.
    args = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidInput("alwayson_scripts.ControlNet.args", "expected a list of ControlNet units")
    units = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.ControlNet.args[{i}]"
        if not isinstance(unit, dict):
            raise InvalidInput(where, f"expected a ControlNet unit (an object), got {type(unit).__name__}")
        if not unit.get("enabled", True):
            continue
        image = unit.get("image", unit.get("input_image"))
        if isinstance(image, dict):  # {"image": ..., "mask": ...}
            if image.get("mask"):
                warnings.append(f"{where}: a unit's mask is not supported; ignored")
            image = image.get("image")
        if not image:
            raise InvalidInput(f"{where}.image", "a unit needs a control image (base64 or data: URL)")
        fields: dict[str, Any] = {}
        for name in (
            "weight",
            "guidance_start",
            "guidance_end",
            "processor_res",
            "threshold_a",
            "threshold_b",
        ):
            if unit.get(name) is not None:
                fields[name] = unit[name]
        for name, choices in (("control_mode", CONTROL_MODES), ("resize_mode", CONTROL_RESIZE_MODES)):
            value = unit.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < len(choices):
                    raise InvalidInput(
                        f"{where}.{name}", f"must be 0..{len(choices) - 1} or a name, got {value}"
                    )
                value = choices[value]
            if value is not None:
                fields[name] = str(value)
        if unit.get("pixel_perfect") is not None:
            fields["pixel_perfect"] = bool(unit["pixel_perfect"])
        model = _MODEL_HASH.sub("", str(unit.get("model") or ""))
        module = str(unit.get("module") or "none")
        units.append(ControlNetUnit(model, decode_image(image, f"{where}.image"), module=module, **fields))
    return tuple(units)


def resolve_sampler(
    sampler_name: str | None, scheduler: str | None, warnings: list[str]
) -> tuple[str | None, str]:
    """(our scheduler label or None for the checkpoint's own, A1111's schedule type label).

    As A1111's `get_sampler_and_scheduler`: a legacy name carries its schedule ("DPM++ 2M Karras"), the
    schedule type is matched by name or label, an unknown sampler falls back to the default."""
    if not sampler_name:
        return None, "Automatic"
    name = sampler_name.strip()
    schedule = (scheduler or "automatic").strip()
    for suffix in _LEGACY_SUFFIXES:
        if name.lower().endswith(" " + suffix.lower()):
            name, schedule = name[: -len(suffix) - 1].strip(), suffix
            break
    schedule_label = SCHEDULE_TYPES.get(schedule.lower())
    if schedule_label is None:
        # SillyTavern's default "normal" among them: the plain schedule is the closest we have.
        warnings.append(f"scheduler {schedule!r} is not available; used Automatic")
        schedule_label = "Automatic"
    try:
        base = schedulers.lookup(name)
    except schedulers.UnknownScheduler:
        warnings.append(f"sampler {sampler_name!r} is not available; used the checkpoint's default")
        return None, "Automatic"
    if schedule_label == "Karras" and not base.a1111.endswith(" Karras"):
        try:
            return schedulers.lookup(f"{base.a1111} Karras").a1111, "Karras"
        except schedulers.UnknownScheduler:
            warnings.append(f"sampler {base.a1111!r} has no Karras schedule here; used Automatic")
            return base.a1111, "Automatic"
    return base.a1111, "Karras" if base.a1111.endswith(" Karras") else schedule_label


def a1111_samplers() -> list[dict[str, Any]]:
    """/sdapi/v1/samplers: A1111's names (the Karras variants are the `karras` schedule type)."""
    seen: list[dict[str, Any]] = []
    for s in schedulers.SCHEDULERS:
        if s.a1111.endswith(" Karras"):
            continue
        seen.append({"name": s.a1111, "aliases": [s.name], "options": {}})
    return seen


def _unsupported(req: Txt2ImgRequest, options: dict[str, Any], warnings: list[str]) -> None:
    """Warn for every field that asks for something the pipeline cannot do."""
    if req.restore_faces:
        warnings.append("restore_faces is not supported; ignored")
    if req.tiling:
        warnings.append("tiling is not supported; ignored")
    if req.styles:
        warnings.append(f"styles are not supported; ignored {req.styles}")
    if req.script_name:
        warnings.append(f"scripts are not supported; ignored script_name {req.script_name!r}")
    others = sorted(name for name in req.alwayson_scripts or {} if name.lower() != CONTROLNET_SCRIPT)
    if others:
        warnings.append(f"scripts are not supported; ignored alwayson_scripts {others}")
    if req.refiner_checkpoint:
        warnings.append("refiner_checkpoint is not supported; ignored")
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        if (getattr(req, name) or 0) > 0:
            warnings.append(f"{name} is not supported; ignored")
    for key in sorted(options):
        if key not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format", "sd_vae"):
            warnings.append(f"override_settings.{key} is not supported; ignored")


def plan_generation(
    req: Txt2ImgRequest,
    served: Sequence[Checkpoint],
    current: Checkpoint,
    defaults: dict[str, Any],
) -> Plan:
    """The generate() calls for an A1111 txt2img or img2img request.

    `served`: the checkpoints the server hosts, of which `override_settings.sd_model_checkpoint` picks one
    for this request; else `current`, the one /sdapi/v1/options set. `defaults`: the gateway's options, of
    which CLIP_stop_at_last_layers applies when `override_settings` doesn't set it."""
    warnings: list[str] = []
    overrides = dict(req.override_settings or {})
    _unsupported(req, overrides, warnings)
    checkpoint = current
    wanted = overrides.get("sd_model_checkpoint")
    if wanted:
        found = find_checkpoint(served, str(wanted))
        if found is None:
            # A1111 drops an unknown override checkpoint silently and keeps the current model.
            warnings.append(f"checkpoint {wanted!r} is not served here; used {current.title!r}")
        else:
            checkpoint = found

    sampler, schedule_type = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler, warnings)
    batch_size = 1 if req.batch_size is None else req.batch_size
    n_iter = 1 if req.n_iter is None else req.n_iter
    if n_iter < 1:
        raise InvalidInput("n_iter", f"must be at least 1, got {n_iter}")
    if n_iter > 100:  # A1111's slider maximum; bounds the work one request can queue
        raise InvalidInput("n_iter", f"must be at most 100, got {n_iter}")

    # Seeds are drawn here, not by the client, so that every batch of n_iter continues the one sequence:
    # A1111's all_seeds[i] = seed + i.
    seed = -1 if req.seed is None else req.seed
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED)
    subseed_strength = req.subseed_strength or 0.0
    subseed = -1 if req.subseed is None else req.subseed
    if subseed == -1:
        subseed = secrets.randbelow(MAX_SEED)

    clip_skip = overrides.get("CLIP_stop_at_last_layers", defaults.get("CLIP_stop_at_last_layers"))
    common: dict[str, Any] = {
        "prompt": req.prompt or "",
        "negative_prompt": req.negative_prompt or "",
        "steps": 50 if req.steps is None else req.steps,
        "guidance_scale": 7.0 if req.cfg_scale is None else req.cfg_scale,
        "scheduler": sampler,
        "width": 512 if req.width is None else req.width,
        "height": 512 if req.height is None else req.height,
        "num_images": batch_size,
        "clip_skip": None if clip_skip is None else _int_option("CLIP_stop_at_last_layers", clip_skip),
    }
    if subseed_strength > 0:
        common["subseed_strength"] = subseed_strength
    if isinstance(req, Img2ImgRequest):
        common.update(_img2img_inputs(req, warnings))
    else:
        common.update(_hires_inputs(req, warnings))
    if units := controlnet_units(req.alwayson_scripts or {}, warnings):
        common["controlnets"] = units

    for name in ("prompt", "negative_prompt", "hr_upscaler"):
        # JSON may carry lone surrogates ("\ud800"): Python takes them, UTF-8 (Triton's BYTES) cannot.
        text = common.get(name)
        if isinstance(text, str) and not _is_utf8(text):
            raise InvalidInput(name, "holds a lone UTF-16 surrogate, not valid Unicode text")
    calls = []
    for i in range(n_iter):
        batch = dict(common, seed=seed + i * batch_size)
        if subseed_strength > 0:
            batch["subseed"] = subseed + i * batch_size
        calls.append(GenerateOptions(**batch))
    return Plan(calls, checkpoint, warnings, sampler, schedule_type, seed, subseed)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int_option(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"override_settings.{name}", f"expected an integer, got {value!r}")
    return int(value)


def _hires_inputs(req: Txt2ImgRequest, warnings: list[str]) -> dict[str, Any]:
    if not req.enable_hr:
        return {}  # A1111 ignores the hr_* fields (and denoising_strength) without it
    upscaler = req.hr_upscaler or "Latent"
    if upscaler in LATENT_UPSCALE_MODES:
        if upscaler != "Latent":
            warnings.append(f"hr_upscaler {upscaler!r} runs as 'Latent' (bilinear)")
        upscaler = "Latent"
    scale = req.hr_scale if req.hr_scale is not None else 2.0
    resize_x, resize_y = req.hr_resize_x or 0, req.hr_resize_y or 0
    if resize_x or resize_y:
        # A1111's "resize to": the pipeline takes a scale, so only a resize of the same aspect ratio works.
        width, height = req.width or 512, req.height or 512
        scales = {side / first for side, first in ((resize_x, width), (resize_y, height)) if side}
        if len(scales) != 1:
            raise InvalidInput("hr_resize_x", f"{resize_x}x{resize_y} is not {width}x{height} scaled")
        scale = scales.pop()
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
        value = getattr(req, name)
        if value and value not in (req.prompt, req.negative_prompt, req.sampler_name, req.scheduler):
            warnings.append(f"{name} is not supported; the second pass used the first pass's")
    return {
        "enable_hr": True,
        "hr_scale": scale,
        "hr_upscaler": upscaler,
        "hr_second_pass_steps": req.hr_second_pass_steps or 0,
        "denoising_strength": 0.75 if req.denoising_strength is None else req.denoising_strength,
    }


def _img2img_inputs(req: Img2ImgRequest, warnings: list[str]) -> dict[str, Any]:
    if not req.init_images:
        raise InvalidInput("init_images", "needs one image (base64 or data: URL)")
    if len(req.init_images) > 1:
        warnings.append(f"only the first of {len(req.init_images)} init_images is used")
    inputs: dict[str, Any] = {
        "image": decode_image(req.init_images[0], "init_images"),
        "strength": 0.75 if req.denoising_strength is None else req.denoising_strength,
        "resize_mode": _choice("resize_mode", req.resize_mode or 0, RESIZE_MODES),
    }
    if req.mask:
        mask = decode_image(req.mask, "mask")
        if req.inpainting_mask_invert:
            mask = _inverted_mask(mask)
        blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x or 0, req.mask_blur_y or 0)
        inputs.update(
            mask=mask,
            mask_blur=blur,
            inpainting_fill=_choice("inpainting_fill", req.inpainting_fill or 0, INPAINTING_FILLS),
            inpaint_full_res=bool(req.inpaint_full_res),
            inpaint_full_res_padding=req.inpaint_full_res_padding or 0,
        )
    return inputs


def _choice(name: str, value: int, choices: Sequence[str]) -> str:
    if not 0 <= value < len(choices):
        raise InvalidInput(name, f"must be in 0..{len(choices) - 1}, got {value}")
    return choices[value]


def _inverted_mask(data: bytes) -> bytes:
    """A1111's "Inpaint not masked": the mask binarized as A1111 does (alpha where it is transparent, else
    grey), then inverted; as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in ("RGBA", "LA") and image.getextrema()[-1][0] < 255:
                grey = image.getchannel("A")
            else:
                grey = image.convert("L")
            inverted = ImageOps.invert(grey)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput("mask", f"not an image: {exc}") from None
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(image: Image.Image, infotext: str) -> str:
    """Raw base64 (no data: prefix, as A1111) of a PNG carrying the infotext in its `parameters` chunk."""
    buffer = io.BytesIO()
    save_png(image, buffer, infotext)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_info(
    req: Txt2ImgRequest,
    plan: Plan,
    results: list[GenerationResult],
    infotexts: list[str],
    clip_skip: int,
) -> dict[str, Any]:
    """A1111's `Processed.js()` for the generated images, plus `warnings`."""
    first = results[0].info
    all_seeds = [seed for r in results for seed in r.info["seeds"]]
    subseeds = [s for r in results for s in r.info.get("subseeds", [])]
    warnings = [*plan.warnings, *(w for r in results for w in r.info.get("warnings", []))]
    count = len(all_seeds)
    strength = first.get("strength", first.get("denoising_strength"))
    return {
        "prompt": first.get("prompt", req.prompt or ""),
        "all_prompts": [first.get("prompt", "")] * count,
        "negative_prompt": first.get("negative_prompt", ""),
        "all_negative_prompts": [first.get("negative_prompt", "")] * count,
        "seed": all_seeds[0],
        "all_seeds": all_seeds,
        "subseed": subseeds[0] if subseeds else plan.subseed,
        "all_subseeds": subseeds or [plan.subseed + i for i in range(count)],
        "subseed_strength": first.get("subseed_strength", 0.0),
        "width": first.get("first_pass_width", first.get("width")),
        "height": first.get("first_pass_height", first.get("height")),
        "sampler_name": _base_label(first.get("sampler")),
        "cfg_scale": req.cfg_scale if req.cfg_scale is not None else 7.0,
        "steps": first.get("steps"),
        "batch_size": len(results[0].images),
        "restore_faces": bool(req.restore_faces),
        "face_restoration_model": None,
        "sd_model_name": first.get("model"),
        "sd_model_hash": first.get("model_hash") or None,
        "sd_vae_name": first.get("vae"),
        "sd_vae_hash": first.get("vae_hash"),
        "seed_resize_from_w": req.seed_resize_from_w if req.seed_resize_from_w is not None else -1,
        "seed_resize_from_h": req.seed_resize_from_h if req.seed_resize_from_h is not None else -1,
        "denoising_strength": strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(req.styles or []),
        "job_timestamp": "",
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": A1111_VERSION,
        "warnings": warnings,
    }


def _base_label(label: str | None) -> str | None:
    """A1111 (1.9 on) reports the sampler without its schedule: "DPM++ 2M", not "DPM++ 2M Karras"."""
    return label.removesuffix(" Karras") if label else label


def infotext_items(text: str | None, other: dict[str, Any]) -> dict[str, Any]:
    """/png-info's `parameters`: A1111's `parse_generation_parameters` keys (Prompt, Negative prompt, each
    param, Size-1/Size-2)."""
    from client.infotext import parse_infotext

    if not text:
        return {}
    prompt, negative, params = parse_infotext(text)
    parsed: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **params}
    size = re.fullmatch(r"(\d+)x(\d+)", params.get("Size", ""))
    if size:
        parsed["Size-1"], parsed["Size-2"] = size[1], size[2]
    return parsed


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
