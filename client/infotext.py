"""A1111-style generation parameters ("infotext"), as stored in a PNG's `parameters` text chunk.

The text is the prompt, an optional `Negative prompt: ...` part, and a last line of `Key: value` pairs:

    a castle, at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model: sd-v1-4

Other tools (A1111, its forks, civitai) read this text, so writing and parsing follow A1111's rules,
including their limits: every prompt line is stripped of surrounding whitespace, and a prompt line that
starts with `Negative prompt:` starts the negative prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` pair of the params line, as A1111 matches it: a value is either a JSON string
# (which may hold commas) or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111 takes the last line for the params line only when it holds this many pairs, so that a prompt
# line such as "style: anime" stays part of the prompt.
_MIN_PARAMS = 3
_SIZE = re.compile(r"(\d+)x(\d+)")
# Params that map one to one onto `StableDiffusionClient.generate` arguments.
_NUMERIC_PARAMS = {
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Mask blur": ("mask_blur", int),
    "Masked area padding": ("inpaint_full_res_padding", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Clip skip": ("clip_skip", int),
}
# A1111 writes these for a hires fix request only (and "Hires upscale" or "Hires resize" always).
_HIRES_PARAMS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")
# The pipeline's `inpainting_fill` names and A1111's "Masked content" labels for them.
INPAINTING_FILL_LABELS = {
    "fill": "fill",
    "original": "original",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}
_FILLS_BY_LABEL = {label: name for name, label in INPAINTING_FILL_LABELS.items()}
# A1111's "Inpaint area" choices, as `inpaint_full_res`.
_INPAINT_AREAS = {"Whole picture": False, "Only masked": True}


# A ControlNet unit's settings in its `ControlNet N` param, as sd-webui-controlnet writes them: label →
# (the unit's field, its type). The value is itself a `Key: value, ...` list, quoted.
def _flag(text: str) -> bool:
    return text == "True"


CONTROLNET_LABELS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Module": ("module", str),
    "Model": ("model", str),
    "Weight": ("weight", float),
    "Resize Mode": ("resize_mode", str),
    "Processor Res": ("processor_res", int),
    "Threshold A": ("threshold_a", float),
    "Threshold B": ("threshold_b", float),
    "Guidance Start": ("guidance_start", float),
    "Guidance End": ("guidance_end", float),
    "Pixel Perfect": ("pixel_perfect", _flag),
    "Control Mode": ("control_mode", str),
}
_CONTROLNET_PARAM = re.compile(r"ControlNet (\d+)")


def controlnet_params(units: list[Mapping[str, Any]]) -> dict[str, str]:
    """The `ControlNet N` params of a response's units (its info's `controlnets`)."""
    return {
        f"ControlNet {i}": ", ".join(
            f"{label}: {unit[field]}" for label, (field, _) in CONTROLNET_LABELS.items() if field in unit
        )
        for i, unit in enumerate(units)
    }


def _controlnet_settings(params: Mapping[str, str]) -> list[dict[str, Any]]:
    """The units' settings from `ControlNet N` params, in N order; ValueError names a bad one."""
    units: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        match = _CONTROLNET_PARAM.fullmatch(key)
        if match is None:
            continue
        settings: dict[str, Any] = {}
        for label, text in _PARAM.findall(value):
            if label in CONTROLNET_LABELS:
                field, kind = CONTROLNET_LABELS[label]
                try:
                    settings[field] = kind(unquote(text).strip())
                except ValueError:
                    raise ValueError(f"{key}: {label}: cannot read {text!r}") from None
        units[int(match[1])] = settings
    return [units[i] for i in sorted(units)]


def quote(value: str) -> str:
    """A value as it goes into the params line: JSON-quoted where it would not parse back as is.

    A1111 quotes values holding `,`, `:` or a newline. We also quote values that a reader would
    otherwise alter: one wrapped in double quotes (it would be JSON-decoded), one with surrounding
    whitespace (it would be stripped) and the empty one (A1111 drops it). A1111 reads all of these back.
    """
    wrapped = len(value) >= 2 and value[0] == value[-1] == '"'
    if not value or wrapped or value != value.strip() or any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # A1111 keeps values that only look quoted
    return value


def format_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """The infotext for one image. Params whose value is None are left out; other values go through str().

    Parsing it back needs at least three params (see `_MIN_PARAMS`).
    """
    params_line = ", ".join(
        f"{key}: {quote(str(value))}" for key, value in params.items() if value is not None
    )
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params_line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) from an infotext; param values are unquoted strings."""
    *lines, last = text.strip().split("\n")
    pairs = _PARAM.findall(last)
    if len(pairs) < _MIN_PARAMS:
        lines.append(last)
        pairs = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative_lines and line.startswith(NEGATIVE_PREFIX):
            negative_lines.append(line[len(NEGATIVE_PREFIX) :].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), {key: unquote(value) for key, value in pairs}


def request_from_infotext(text: str) -> dict[str, Any]:
    """`StableDiffusionClient.generate` arguments recorded in an infotext: prompt, negative prompt and
    whichever of steps, scheduler (the Sampler label), guidance_scale, seed, width, height, strength
    (Denoising strength), the inpainting options (Mask blur, Masked content, Inpaint area, Masked area
    padding), subseed and subseed_strength (Variation seed, Variation seed strength) it holds. Hires params
    (Hires upscale or a uniform Hires resize, Hires steps, Hires upscaler) make it enable_hr with hr_scale,
    hr_second_pass_steps and hr_upscaler, and Denoising strength its denoising_strength, as A1111's txt2img
    reads them. `ControlNet N` params give `controlnet_settings`, each unit's settings without its image.
    A param that doesn't read as its type or choices raises ValueError naming it.
    """
    prompt, negative_prompt, params = parse_infotext(text)
    request: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt}
    for key, (name, kind) in _NUMERIC_PARAMS.items():
        if key in params:
            try:
                request[name] = kind(params[key])
            except ValueError:
                expected = "an integer" if kind is int else "a number"
                raise ValueError(f"{key}: expected {expected}, got {params[key]!r}") from None
    if "Size" in params:
        size = _SIZE.fullmatch(params["Size"])
        if size is None:
            raise ValueError(f"Size: expected WIDTHxHEIGHT, got {params['Size']!r}")
        request["width"], request["height"] = int(size[1]), int(size[2])
    if "Sampler" in params:
        # A1111 >= 1.9 writes the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"); our labels
        # carry it ("DPM++ 2M Karras"), so a schedule the server lacks is refused rather than dropped.
        sampler, schedule = params["Sampler"], params.get("Schedule type", "Automatic")
        if schedule not in ("Automatic", "") and not sampler.endswith(schedule):
            sampler = f"{sampler} {schedule}"
        request["scheduler"] = sampler
    if "Masked content" in params:
        request["inpainting_fill"] = _choice(params, "Masked content", _FILLS_BY_LABEL)
    if "Inpaint area" in params:
        request["inpaint_full_res"] = _choice(params, "Inpaint area", _INPAINT_AREAS)
    if controlnets := _controlnet_settings(params):
        request["controlnet_settings"] = controlnets  # no images: the caller pairs them with its units
    if any(key in params for key in _HIRES_PARAMS):
        request["enable_hr"] = True
        if "Hires upscaler" in params:
            request["hr_upscaler"] = params["Hires upscaler"]
        if "Hires resize" in params and "hr_scale" not in request:
            request["hr_scale"] = _hires_resize_scale(params["Hires resize"], request)
        if "strength" in request:
            request["denoising_strength"] = request.pop("strength")
    return request


def _hires_resize_scale(resize: str, request: Mapping[str, Any]) -> float:
    """A1111's "Hires resize: WxH" (a 0 side follows the other) as the one scale of Size it must be: the
    server takes a scale, and A1111 crops a target of another aspect ratio."""
    target = _SIZE.fullmatch(resize)
    if target is None or "width" not in request:
        raise ValueError(f"Hires resize: expected WIDTHxHEIGHT (with a Size), got {resize!r}")
    sides = zip((int(target[1]), int(target[2])), (request["width"], request["height"]), strict=True)
    scales = {side / first_pass for side, first_pass in sides if side and first_pass}
    if len(scales) != 1:
        size = f"{request['width']}x{request['height']}"
        raise ValueError(f"Hires resize: {resize} is not Size {size} scaled (the server takes only a scale)")
    return scales.pop()


def _choice(params: Mapping[str, str], key: str, choices: Mapping[str, Any]) -> Any:
    try:
        return choices[params[key]]
    except KeyError:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {params[key]!r}") from None


def save_png(image: Image.Image, file: str | Path | IO[bytes], infotext: str) -> None:
    """Write `image` as PNG with `infotext` in its `parameters` text chunk."""
    info = PngInfo()
    info.add_text(PNG_KEY, infotext)  # Pillow switches to an iTXt chunk for text beyond Latin-1
    image.save(file, format="PNG", pnginfo=info)


def read_infotext(file: str | Path | IO[bytes]) -> str | None:
    """The `parameters` text of a PNG, or None when it has none."""
    with Image.open(file) as image:
        return getattr(image, "text", {}).get(PNG_KEY)
