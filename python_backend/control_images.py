"""ControlNet control maps, as AUTOMATIC1111's sd-webui-controlnet extension makes them (host side, no model).

A unit's control image (decoded RGB) goes through the unit's preprocessor, then is fitted to the
generation's width x height by the unit's resize mode; the result is the map the ControlNet sees. Only the
preprocessors that are plain image operations are here: the others run a network whose weights this server
does not have. Formulas, defaults, slider ranges, names and list order are the extension's
(Mikubill/sd-webui-controlnet @ 56cec5b2, files named where used); the code is this project's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import cv2
import numpy as np

from python_backend.request import InvalidInput

Image = np.ndarray  # uint8, H x W x 3 RGB

# Preprocessors and resizes upscale by the image's aspect ratio (a 1 x 4096 strip at processor_res 2048 is
# 8M pixels wide); the extension has no bound, a server needs one. Far above any real map (2048 x 16384).
MAX_WORK_PIXELS = 2**25


# --- resize modes (scripts/enums.py ResizeMode; internal_controlnet/args.py, external_code.py) ----------


class ControlResizeMode(Enum):
    """How the map meets width x height; values are the extension's names (its API's `resize_mode`)."""

    JUST_RESIZE = "Just Resize"  # stretch
    CROP_AND_RESIZE = "Crop and Resize"  # INNER_FIT: cover the size, crop the centre (the unit's default)
    RESIZE_AND_FILL = "Resize and Fill"  # OUTER_FIT: fit inside, fill the rest with the border's colour


# Names older versions of the extension used, still accepted (ControlNetUnit.check_resize_mode).
RESIZE_MODE_ALIASES = {
    "Inner Fit (Scale to Fit)": ControlResizeMode.CROP_AND_RESIZE,
    "Outer Fit (Shrink to Fit)": ControlResizeMode.RESIZE_AND_FILL,
    "Scale to Fit (Inner Fit)": ControlResizeMode.CROP_AND_RESIZE,
    "Envelope (Outer Fit)": ControlResizeMode.RESIZE_AND_FILL,
}
# A1111's img2img resize_mode indices (external_code.resize_mode_from_value): a unit without its own image
# uses the img2img image and its mode; 3 is "Just resize (latent upscale)", which is Just Resize here.
RESIZE_MODE_INDICES = (
    ControlResizeMode.JUST_RESIZE,
    ControlResizeMode.CROP_AND_RESIZE,
    ControlResizeMode.RESIZE_AND_FILL,
    ControlResizeMode.JUST_RESIZE,
)


def resize_mode_from_value(value: object) -> ControlResizeMode:
    """The mode a unit's `resize_mode` names: a name, an old alias, or an img2img index 0..3."""
    if isinstance(value, ControlResizeMode):
        return value
    if isinstance(value, str):
        if value in RESIZE_MODE_ALIASES:
            return RESIZE_MODE_ALIASES[value]
        try:
            return ControlResizeMode(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(RESIZE_MODE_INDICES):
        return RESIZE_MODE_INDICES[value]
    names = [mode.value for mode in ControlResizeMode] + list(RESIZE_MODE_ALIASES)
    raise InvalidInput(
        "resize_mode",
        f"must be one of {', '.join(repr(n) for n in names)} or 0..3, got {value!r}",
    )


# --- preprocessors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's settings as the extension exposes it (supported_preprocessor.py)."""

    label: str
    minimum: float
    maximum: float
    value: float  # the default: what -1, or any value outside minimum..maximum, stands for
    step: float = 0.01  # PreprocessorParameter's default step

    def choose(self, requested: float) -> float:
        # ControlNetUnit.bound_check_params: out of range means the default (so A1111 clients that send one
        # set of thresholds for every module, e.g. webuiapi's 64/64, get each module's defaults).
        return self.value if requested < self.minimum or requested > self.maximum else requested

    def api_json(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "value": self.value,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
        }


# Preprocessor.slider_resolution: every preprocessor shows it unless it overrides it (only invert here).
RESOLUTION = Slider("Resolution", 64, 2048, 512, step=8)

# Runs on an H x W x 3 image with the processor resolution and the two thresholds (already defaulted).
Run = Callable[[Image, int, float, float], Image]


@dataclass(frozen=True)
class Preprocessor:
    name: str  # the `module` key the API takes and /controlnet/module_list lists
    label: str  # the UI name, also accepted as `module` (module_list?alias_names=true)
    priority: int  # sorting_priority: higher is listed first
    run: Run
    resolution: Slider | None = RESOLUTION
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.threshold_a, self.threshold_b) if s is not None]


def _resize_with_pad(image: Image, resolution: float) -> tuple[Image, int, int]:
    """utils.resize_image_with_pad: shortest side to `resolution`, then edge-padded to multiples of 64.

    Returns the padded image and the unpadded height and width: the filters run on the padded image (what
    they see past the border changes the result near it) and their output is cropped back.
    """
    raw_h, raw_w = image.shape[:2]
    k = float(resolution) / float(min(raw_h, raw_w))
    height, width = round(raw_h * k), round(raw_w * k)
    _check_work_size(height, width)
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(resized, [[0, -height % 64], [0, -width % 64], [0, 0]], mode="edge")
    return padded, height, width


def _check_work_size(height: int, width: int) -> None:
    if height < 1 or width < 1 or height * width > MAX_WORK_PIXELS:
        raise InvalidInput(
            "image",
            f"its aspect ratio makes the preprocessing work on {width}x{height} pixels; "
            f"the limit is 1..{MAX_WORK_PIXELS} pixels",
        )


def _gray_to_rgb(gray: np.ndarray) -> Image:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _none(image: Image, resolution: int, a: float, b: float) -> Image:
    return image


def _invert(image: Image, resolution: int, a: float, b: float) -> Image:
    return 255 - image


def _canny(image: Image, resolution: int, low: float, high: float) -> Image:
    padded, height, width = _resize_with_pad(image, resolution)
    # OpenCV's Canny on all three channels (largest gradient), at integer thresholds as the extension's int().
    edges = cv2.Canny(padded, int(low), int(high))
    return _gray_to_rgb(edges[:height, :width])


def _threshold(image: Image, resolution: int, level: float, b: float) -> Image:
    padded, height, width = _resize_with_pad(image, resolution)
    white = np.min(padded, axis=2) > level  # a pixel is white only where all three channels pass
    return _gray_to_rgb(np.where(white, 255, 0).astype(np.uint8)[:height, :width])


def _blur_gaussian(image: Image, resolution: int, sigma: float, b: float) -> Image:
    padded, height, width = _resize_with_pad(image, resolution)
    # Cropped before blurring (unlike the edge filters): the blur sees the image's own border.
    return cv2.GaussianBlur(np.ascontiguousarray(padded[:height, :width]), (0, 0), float(sigma))


def _scribble_xdog(image: Image, resolution: int, level: float, b: float) -> Image:
    padded, height, width = _resize_with_pad(image, resolution)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    # The extension doubles in uint8, so responses above 127 wrap around (mod 256); kept, to match its maps.
    doubled = (255 - dog) * np.uint8(2)
    return _gray_to_rgb(np.where(doubled > level, 255, 0).astype(np.uint8)[:height, :width])


def _lineart_standard(image: Image, resolution: int, a: float, b: float) -> Image:
    padded, height, width = _resize_with_pad(image, resolution)
    x = padded.astype(np.float32)
    # Dark lines on a light background: how much darker each pixel is than its surroundings.
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    # max(16, median of nothing) is 16 in the extension (NaN loses the comparison).
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 0.0)
    lines = (intensity * 127).clip(0, 255).astype(np.uint8)
    return _gray_to_rgb(lines[:height, :width])


def _tile_resample(image: Image, resolution: int, rate: float, b: float) -> Image:
    if rate < 1.1:  # the extension's cut-off: below it the image passes unchanged
        return image
    height, width = int(image.shape[0] / rate), int(image.shape[1] / rate)
    if height < 1 or width < 1:
        raise InvalidInput("threshold_a", f"a down sampling rate of {rate} leaves no pixels of the image")
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _color_grid(image: Image, resolution: int, a: float, b: float) -> Image:
    # annotator/color: shortest side to `resolution` (INTER_AREA even upwards), then 64x64-pixel cells.
    raw_h, raw_w = image.shape[:2]
    if raw_h < raw_w:
        height, width = resolution, round(raw_w / raw_h * resolution)
    else:
        height, width = round(raw_h / raw_w * resolution), resolution
    _check_work_size(height, width)
    if min(height, width) < 64:  # only pixel_perfect goes below the slider's 64
        raise InvalidInput("processor_res", f"t2ia_color_grid needs at least 64 pixels, got {resolution}")
    scaled = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(scaled, (width // 64, height // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)


# Model-free ones from scripts/preprocessor/model_free_preprocessors.py and, for the legacy ones,
# scripts/preprocessor/legacy/{preprocessor_compiled.py (settings), processor.py (code)}. Left out though
# weight-free: shuffle (random), recolor_* and tile_colorfix* (the extension also post-processes the
# generated image or hooks the sampler), reference_* / inpaint* (no control map); binary was
# removed upstream (a57a8f71).
PREPROCESSORS = (
    Preprocessor("none", "none", 10, _none),
    Preprocessor(
        "canny",
        "canny",
        100,
        _canny,
        threshold_a=Slider("Low Threshold", 1, 255, 100, step=1),
        threshold_b=Slider("High Threshold", 1, 255, 200, step=1),
    ),
    Preprocessor("invert", "invert (from white bg & black line)", 20, _invert, resolution=None),
    Preprocessor(
        "blur_gaussian", "blur_gaussian", 0, _blur_gaussian, threshold_a=Slider("Sigma", 0.01, 64.0, 9.0)
    ),
    Preprocessor(
        "scribble_xdog", "scribble_xdog", 0, _scribble_xdog, threshold_a=Slider("XDoG Threshold", 1, 64, 32)
    ),
    Preprocessor(
        "threshold", "threshold", 0, _threshold, threshold_a=Slider("Binarization Threshold", 0, 255, 127)
    ),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", 100, _lineart_standard),
    Preprocessor(
        "tile_resample",
        "tile_resample",
        100,
        _tile_resample,
        threshold_a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0),
    ),
    Preprocessor("color", "t2ia_color_grid", 0, _color_grid),
)


def _listed_order() -> list[Preprocessor]:
    # Preprocessor.get_sorted_preprocessors: "none", then by zero-padded priority + label, descending.
    rest = [p for p in PREPROCESSORS if p.name != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    return [p for p in PREPROCESSORS if p.name == "none"] + rest


def find_preprocessor(module: object) -> Preprocessor:
    """The preprocessor `module` names: by UI label first, then by name (Preprocessor.get_preprocessor)."""
    if isinstance(module, str):
        for key in ("label", "name"):
            for preprocessor in PREPROCESSORS:
                if getattr(preprocessor, key) == module:
                    return preprocessor
    names = ", ".join(p.name for p in _listed_order())
    raise InvalidInput(
        "module",
        f"unknown preprocessor {module!r}: this server runs the preprocessors that need no model "
        f"weights: {names}",
    )


def module_list(alias_names: bool = False) -> dict[str, Any]:
    """The body of GET /controlnet/module_list (scripts/api.py; external_code.get_modules(_detail))."""
    listed = _listed_order()
    keys = [p.label if alias_names else p.name for p in listed]
    return {
        "module_list": keys,
        "module_detail": {
            # model_free is the extension's "the unit needs no ControlNet model" (reference_only); every
            # preprocessor here feeds one.
            key: {"model_free": False, "sliders": [s.api_json() for s in p.sliders()]}
            for key, p in zip(keys, listed, strict=True)
        },
    }


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(field, f"must be a finite number, got {value!r}")
    return float(value)


def detect(
    image: Image,
    module: str,
    processor_res: float = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
) -> Image:
    """The preprocessor's map at its own size (what /controlnet/detect returns): H' x W' x 3 uint8.

    processor_res and the thresholds take -1 (or anything outside the slider's range) for the default.
    """
    preprocessor = find_preprocessor(module)
    _check_image(image)
    resolution, a, b = _settings(preprocessor, processor_res, threshold_a, threshold_b)
    return preprocessor.run(image, resolution, a, b)


def _settings(
    preprocessor: Preprocessor, processor_res: object, threshold_a: object, threshold_b: object
) -> tuple[int, float, float]:
    """The unit's processor_res and thresholds with the preprocessor's defaults put in."""
    requested = (
        _number("processor_res", processor_res),
        _number("threshold_a", threshold_a),
        _number("threshold_b", threshold_b),
    )
    if not requested[0].is_integer():
        raise InvalidInput("processor_res", f"must be a whole number of pixels, got {processor_res!r}")
    resolution, a, b = (
        value if slider is None else slider.choose(value)  # a hidden slider's value is never used
        for slider, value in zip(
            (preprocessor.resolution, preprocessor.threshold_a, preprocessor.threshold_b),
            requested,
            strict=True,
        )
    )
    return int(resolution), a, b


def _check_image(image: object) -> None:
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and image.shape[0] > 0
        and image.shape[1] > 0
    ):
        described = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InvalidInput("image", f"must be an H x W x 3 uint8 RGB array, got {described}")


# --- fitting the map to the generation's size (scripts/controlnet.py Script.detectmap_proc) ---------------


def pixel_perfect_resolution(image: Image, width: int, height: int, resize_mode: ControlResizeMode) -> int:
    """external_code.pixel_perfect_resolution: the processor_res at which the map needs no rescaling.

    The shortest side times the scale the resize mode will apply: the smaller of the two side ratios for
    Resize and Fill (the whole image fits), the larger otherwise (the size is covered).
    """
    raw_h, raw_w = image.shape[:2]
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if resize_mode is ControlResizeMode.RESIZE_AND_FILL else max(k_h, k_w)
    return round(k * min(raw_h, raw_w))


def high_quality_resize(control: Image, width: int, height: int) -> Image:
    """The extension's map resize: keeps segmentation colours exact and one-pixel edges one pixel wide.

    Maps of 3..199 colours (segmentation, colour grids) use nearest neighbour; others area when shrinking
    and cubic when enlarging. Two-colour black-and-white maps are re-binarised (Otsu) after the resize and,
    when mostly one-pixel lines (canny, scribbles), thinned back to one-pixel lines.
    """
    if control.shape[:2] == (height, width):
        return control
    smaller = width * height < control.shape[0] * control.shape[1]
    bigger = width * height > control.shape[0] * control.shape[1]
    colour_count = len(np.unique(control.reshape(-1, 3), axis=0))
    binary = colour_count == 2 and int(control.min()) < 16 and int(control.max()) > 240
    one_pixel_edges = False
    if binary:
        opened = cv2.dilate(cv2.erode(control, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        # Counted per channel value, as the extension counts: lines an opening removes are thin.
        one_pixel_edges = np.count_nonzero(opened < control) * 2 > np.count_nonzero(control > 127)
    if 2 < colour_count < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    resized = cv2.resize(control, (width, height), interpolation=interpolation)
    if not binary:
        return resized
    gray = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edges:
        gray = _thin(_otsu(_edge_nms(gray)), prune=bigger)
    else:
        gray = _otsu(gray)
    return _gray_to_rgb(gray)


def _otsu(gray: np.ndarray) -> np.ndarray:
    return cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def _edge_nms(gray: np.ndarray) -> np.ndarray:
    """lvminthin.nake_nms: keep a pixel where it is the maximum along any of the four line directions."""
    kept = np.zeros_like(gray)
    for line in _NMS_LINES:
        np.putmask(kept, cv2.dilate(gray, kernel=line) == gray, gray)
    return kept


_NMS_LINES = [
    np.array(k, dtype=np.uint8)
    for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    )
]


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    # lvminthin.py's order: every kernel at 0 degrees, then every one at 90, 180, 270 (order changes results).
    return [np.rot90(np.array(k, dtype=np.int32), turns) for turns in range(4) for k in kernels]


# Hit-or-miss patterns (1: set, -1: clear, 0: either) of lvminthin.py: a pixel matching one is removed.
_THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _thin_once(lines: np.ndarray, kernels: list[np.ndarray]) -> bool:
    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(lines, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            lines[hits] = 0  # in place: the next pattern sees this one's removals
            changed = True
    return changed


def _thin(lines: np.ndarray, prune: bool) -> np.ndarray:
    """lvminthin.lvmin_thin: thin to one-pixel lines (at most 32 passes), then, upscaling, cut off spurs."""
    lines = lines.copy()
    for _ in range(32):
        if not _thin_once(lines, _THINNING):
            break
    if prune:
        _thin_once(lines, _PRUNING)
    return lines


def resize_control_map(control: Image, width: int, height: int, resize_mode: ControlResizeMode) -> Image:
    """The map at height x width as the resize mode fits it (Script.detectmap_proc)."""
    if resize_mode is ControlResizeMode.JUST_RESIZE:
        return high_quality_resize(control, width, height)
    old_h, old_w = control.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    if resize_mode is ControlResizeMode.RESIZE_AND_FILL:
        k = min(k_h, k_w)
        borders = np.concatenate([control[0], control[-1], control[:, 0], control[:, -1]], axis=0)
        # Per channel median of the outermost pixels, truncated to uint8 (astype) as in the extension.
        fill = np.median(borders, axis=0).astype(np.uint8)
        scaled = high_quality_resize(control, round(old_w * k), round(old_h * k))
        new_h, new_w = scaled.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        result = np.tile(fill, (height, width, 1))
        result[top : top + new_h, left : left + new_w] = scaled
        return result
    k = max(k_h, k_w)
    scaled_w, scaled_h = round(old_w * k), round(old_h * k)
    _check_work_size(scaled_h, scaled_w)
    scaled = high_quality_resize(control, scaled_w, scaled_h)
    top, left = max(0, (scaled_h - height) // 2), max(0, (scaled_w - width) // 2)
    return np.ascontiguousarray(scaled[top : top + height, left : left + width])


# --- the entry point ----------------------------------------------------------------------------------------


def control_map(
    image: Image,
    module: str,
    width: int,
    height: int,
    resize_mode: object = ControlResizeMode.CROP_AND_RESIZE,
    processor_res: float = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
    pixel_perfect: bool = False,
) -> Image:
    """A unit's control map at height x width x 3 (uint8 RGB), as the extension feeds its ControlNet.

    image: the decoded control image, H x W x 3 uint8 RGB (transparency already flattened onto white).
    module: a preprocessor name or label (module_list()); resize_mode: a name, old alias or index 0..3.
    processor_res, threshold_a, threshold_b: -1 (or out of the slider's range) for the default; with
    pixel_perfect, processor_res is computed from the image and the size instead.
    Raises InvalidInput (a ValueError naming the field) for a bad value.
    """
    preprocessor = find_preprocessor(module)
    _check_image(image)
    for field, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise InvalidInput(field, f"must be a positive whole number of pixels, got {side!r}")
    mode = resize_mode_from_value(resize_mode)
    if not isinstance(pixel_perfect, bool):
        raise InvalidInput("pixel_perfect", f"must be true or false, got {pixel_perfect!r}")
    resolution, a, b = _settings(preprocessor, processor_res, threshold_a, threshold_b)
    if pixel_perfect:
        # Replaces processor_res after the range check, as in the extension: it may leave the slider's range.
        resolution = pixel_perfect_resolution(image, width, height, mode)
    return resize_control_map(preprocessor.run(image, resolution, a, b), width, height, mode)


def control_tensor(control: Image) -> np.ndarray:
    """The map as a ControlNet's conditioning input: float32 [3, H, W], RGB in 0..1.

    What diffusers' ControlNet pipelines feed (prepare_image: VaeImageProcessor with do_normalize=False,
    pixels / 255) and what the extension feeds (get_pytorch_control); batch and CFG copies are the caller's.
    """
    return np.ascontiguousarray(control.transpose(2, 0, 1), dtype=np.float32) / 255.0
