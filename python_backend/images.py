"""Image inputs for img2img and inpainting, as pure functions over Pillow images, numpy and torch.

Decoding is bounded (sizes are checked from the header before any pixel is decoded). Resizing and mask
handling follow AUTOMATIC1111's stable-diffusion-webui (`modules/images.py`, `modules/masking.py`,
`StableDiffusionProcessingImg2Img.init` in `modules/processing.py`); the tensors handed to the engines
equal what diffusers' `VaeImageProcessor` and `StableDiffusionInpaintPipeline` make.
"""

from __future__ import annotations

import io
import warnings
from enum import Enum
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from python_backend.request import InvalidInput

# (x1, y1, x2, y2): left, top, right and bottom edges in pixels, right and bottom exclusive (Pillow's box).
Region = tuple[int, int, int, int]

DECODED_FORMATS = ("PNG", "JPEG", "WEBP")
BACKGROUND = (255, 255, 255)  # transparency is flattened onto A1111's default img2img_background_color
LANCZOS = Image.Resampling.LANCZOS
VAE_SCALE = 8  # pixels per latent; image tensors must be whole latents (diffusers would resize otherwise)


# --- decoding -----------------------------------------------------------------------------------------


def decode_image(data: bytes, field: str, *, max_side: int, max_pixels: int) -> Image.Image:
    """PNG/JPEG/WebP bytes as an RGB image, EXIF orientation applied, transparency flattened onto white.

    Raises InvalidInput(field, ...) for anything that is not such an image, and for one wider or taller
    than `max_side` or with more than `max_pixels` pixels (checked before its pixels are decoded).
    """
    image = _decode_bounded(data, field, max_side, max_pixels)
    if _has_alpha(image):
        # A1111's images.flatten: composite onto the background colour instead of dropping the alpha.
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image.paste(rgba, mask=rgba)
    return image.convert("RGB")


def decode_mask(
    data: bytes, field: str, *, size: tuple[int, int], max_side: int, max_pixels: int
) -> Image.Image:
    """A mask ("L": 255 repaints, 0 keeps) from image bytes, at `size` (the decoded image's (width, height)).

    As A1111's create_binary_mask: a mask with transparency is its alpha channel, rounded at 128 (what a
    painted layer over a transparent one gives); any other mask is its luminance. A mask of another size
    is stretched to `size` (Lanczos), as A1111 resizes a mask that does not match its image.
    """
    image = _decode_bounded(data, field, max_side, max_pixels)
    alpha = image.convert("RGBA").getchannel("A") if _has_alpha(image) else None
    if alpha is not None and alpha.getextrema() != (255, 255):
        mask = alpha.point([0] * 129 + [255] * 127)
    else:
        mask = image.convert("L")
    return mask if mask.size == size else mask.resize(size, LANCZOS)


def _decode_bounded(data: bytes, field: str, max_side: int, max_pixels: int) -> Image.Image:
    formats = "/".join(DECODED_FORMATS)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its two bomb limits; refuse those images too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(field, f"image too large to decode ({e})") from None
    except Exception as e:  # Pillow raises many types for malformed input; all mean "not an image"
        raise InvalidInput(field, f"not a decodable {formats} image ({type(e).__name__}: {e})") from None
    width, height = image.size
    if width > max_side or height > max_side or width * height > max_pixels:
        raise InvalidInput(
            field,
            f"image is {width}x{height}; at most {max_side} pixels a side and {max_pixels} pixels in all",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as e:
        raise InvalidInput(
            field, f"cannot decode the {image.format} image ({type(e).__name__}: {e})"
        ) from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


# --- names: ours, A1111's labels and A1111's indices ---------------------------------------------------


class ResizeMode(Enum):
    """How an image meets the requested size; in A1111's order (its `resize_mode` 0..2)."""

    JUST_RESIZE = "just_resize"  # stretch to the size
    CROP_AND_RESIZE = "crop_and_resize"  # scale to cover the size, keep the centre, crop the overflow
    RESIZE_AND_FILL = "resize_and_fill"  # scale to fit inside, centre, fill the borders from the edges


class InpaintingFill(Enum):
    """What the masked area starts from (A1111's "Masked content", `inpainting_fill` 0..3)."""

    FILL = "fill"  # the image's surrounding colours (fill_masked_image)
    ORIGINAL = "original"  # the image as it is
    LATENT_NOISE = "latent_noise"  # masked latents replaced by noise (done by the pipeline)
    LATENT_NOTHING = "latent_nothing"  # masked latents zeroed (done by the pipeline)

    @property
    def fills_image(self) -> bool:
        """Whether the image is passed through fill_masked_image before encoding.

        A1111 does so for every choice but "original": the latent choices start from the filled image too.
        """
        return self is not InpaintingFill.ORIGINAL


A1111_LABELS: dict[Enum, str] = {
    ResizeMode.JUST_RESIZE: "Just resize",
    ResizeMode.CROP_AND_RESIZE: "Crop and resize",
    ResizeMode.RESIZE_AND_FILL: "Resize and fill",
    InpaintingFill.FILL: "fill",
    InpaintingFill.ORIGINAL: "original",
    InpaintingFill.LATENT_NOISE: "latent noise",
    InpaintingFill.LATENT_NOTHING: "latent nothing",
}

E = TypeVar("E", bound=Enum)


def _lookup(choices: type[E], value: str, field: str) -> E:
    """A member by our name, A1111's label or A1111's index (as text); case and outer spaces ignored."""
    key = value.strip().lower()
    for index, member in enumerate(choices):
        if key in (member.value, A1111_LABELS[member].lower(), str(index)):
            return member
    valid = ", ".join(f"{m.value} ({A1111_LABELS[m]!r}, {i})" for i, m in enumerate(choices))
    raise InvalidInput(field, f"unknown value {value!r}; expected one of: {valid}")


def parse_resize_mode(value: str) -> ResizeMode:
    return _lookup(ResizeMode, value, "resize_mode")


def parse_inpainting_fill(value: str) -> InpaintingFill:
    return _lookup(InpaintingFill, value, "inpainting_fill")


# --- resizing (A1111's images.resize_image, without its upscalers) ---------------------------------------


def resize(image: Image.Image, width: int, height: int, mode: str | ResizeMode) -> Image.Image:
    """`image` at width x height by a resize mode (a ResizeMode or any name parse_resize_mode accepts)."""
    mode = mode if isinstance(mode, ResizeMode) else parse_resize_mode(mode)
    if mode is ResizeMode.JUST_RESIZE:
        return image.resize((width, height), LANCZOS)
    if mode is ResizeMode.CROP_AND_RESIZE:
        return _crop_and_resize(image, width, height)
    return _resize_and_fill(image, width, height)


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    if width / height > image.width / image.height:  # the target is wider: match widths, crop top and bottom
        scaled = image.resize((width, image.height * width // image.width), LANCZOS)
    else:
        scaled = image.resize((image.width * height // image.height, height), LANCZOS)
    left, top = scaled.width // 2 - width // 2, scaled.height // 2 - height // 2
    return scaled.crop((left, top, left + width, top + height))


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    target_ratio, image_ratio = width / height, image.width / image.height
    # At least one pixel: A1111 fails on a sliver that floors to nothing.
    if target_ratio < image_ratio:  # the image is wider: match widths, bands above and below
        fitted = image.resize((width, max(image.height * width // image.width, 1)), LANCZOS)
    else:
        fitted = image.resize((max(image.width * height // image.height, 1), height), LANCZOS)
    result = Image.new(image.mode, (width, height))
    left, top = width // 2 - fitted.width // 2, height // 2 - fitted.height // 2
    result.paste(fitted, (left, top))
    # A1111 stretches the fitted image's outermost edge over each band (a resize from a zero-width box).
    if target_ratio < image_ratio:
        bottom = top + fitted.height
        _paste_band(result, fitted, (0, 0, width, 0), (0, 0, width, top))
        _paste_band(result, fitted, (0, fitted.height, width, fitted.height), (0, bottom, width, height))
    elif target_ratio > image_ratio:
        right = left + fitted.width
        _paste_band(result, fitted, (0, 0, 0, height), (0, 0, left, height))
        _paste_band(result, fitted, (fitted.width, 0, fitted.width, height), (right, 0, width, height))
    return result


def _paste_band(result: Image.Image, fitted: Image.Image, edge: Region, band: Region) -> None:
    x1, y1, x2, y2 = band
    if x2 > x1 and y2 > y1:
        # Bicubic: A1111 calls resize with Pillow's default resampling here.
        result.paste(fitted.resize((x2 - x1, y2 - y1), Image.Resampling.BICUBIC, box=edge), (x1, y1))


# --- tensors for the engines (diffusers' VaeImageProcessor) --------------------------------------------


def to_model_input(image: Image.Image) -> torch.Tensor:
    """float32 [1, 3, H, W] in [-1, 1]: VaeImageProcessor().preprocess of an image already at its size."""
    _check_whole_latents(image)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    return 2.0 * torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()) - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """float32 [1, 1, H, W] of 0/1 (1 repaints): the inpaint pipeline's mask_processor.preprocess.

    diffusers binarizes value / 255 at 0.5, so 128 and above repaint.
    """
    _check_whole_latents(mask)
    return torch.from_numpy((np.asarray(mask.convert("L")) >= 128).astype(np.float32)[None, None].copy())


def mask_to_latent(mask: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask at latent_size ((height, width), as latents.shape[-2:]), as prepare_mask_latents has it."""
    return torch.nn.functional.interpolate(mask_to_tensor(mask), size=latent_size)  # nearest


def _check_whole_latents(image: Image.Image) -> None:
    if image.width % VAE_SCALE or image.height % VAE_SCALE:
        raise ValueError(f"image is {image.width}x{image.height}; both must be multiples of {VAE_SCALE}")


# --- masks (A1111's mask blur, "only masked" crop and paste back, "fill") --------------------------------


def blur_mask(mask: Image.Image, radius: float, radius_y: float | None = None) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur across (sigma `radius`), then down (`radius_y`, default the same).

    Each pass uses A1111's kernel size, 2 * int(2.5 * sigma + 0.5) + 1, and OpenCV's arithmetic for 8-bit
    images, so the result is cv2's to the bit.
    """
    pixels = np.asarray(mask.convert("L"))
    pixels = _gaussian_blur_8bit(pixels, radius, axis=1)
    pixels = _gaussian_blur_8bit(pixels, radius if radius_y is None else radius_y, axis=0)
    return Image.fromarray(pixels)


def _gaussian_blur_8bit(pixels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    if sigma <= 0:
        return pixels
    taps = _fixed_point_gaussian(2 * int(2.5 * sigma + 0.5) + 1, sigma)
    half = len(taps) // 2
    lines = np.moveaxis(pixels, axis, -1)
    padded = np.pad(lines, [(0, 0), (half, half)], mode="reflect")  # cv2's default BORDER_REFLECT_101
    # Every partial sum is an integer below 2**24, so float32 convolution is exact.
    sums = torch.nn.functional.conv1d(
        torch.from_numpy(padded.astype(np.float32))[:, None],
        torch.from_numpy(taps.astype(np.float32))[None, None],
    )[:, 0].numpy()
    blurred = (sums.astype(np.int32) + 128) >> 8  # taps are in 1/256ths; round half up, as cv2
    return np.ascontiguousarray(np.moveaxis(blurred.astype(np.uint8), -1, axis))


def _fixed_point_gaussian(size: int, sigma: float) -> np.ndarray:
    """cv2's 8-bit Gaussian kernel: integer taps in 1/256ths that sum to exactly 256.

    OpenCV (getGaussianKernelBitExact, getGaussianKernelFixedPoint_ED) normalises the Gaussian, rounds the
    left half's taps in order carrying each rounding error into the next, mirrors them, and gives the
    centre tap whatever makes the sum 256.
    """
    half = size // 2
    offsets = np.arange(-half, 0, dtype=np.float64)
    left = np.exp((2 * offsets) ** 2 * (-0.125 / (sigma * sigma)))  # OpenCV's own association
    left = left * (1 / (2 * left.sum() + 1))
    taps = np.empty(size, dtype=np.int64)
    carried = 0.0
    for i, weight in enumerate(left):
        scaled = weight * 256 + carried
        taps[i] = taps[size - 1 - i] = round(scaled)  # half to even, as cvRound
        carried = scaled - taps[i]
    taps[half] = 256 - 2 * taps[:half].sum()
    return taps


def crop_region(mask: Image.Image, padding: int) -> Region | None:
    """The box around the mask's non-zero pixels grown by `padding` and clamped to the mask ("only masked").

    None for a blank mask: A1111 then gives up "only masked" and processes the whole picture.
    """
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, mask.width),
        min(y2 + padding, mask.height),
    )


def expand_to_aspect(region: Region, width: int, height: int, image_size: tuple[int, int]) -> Region:
    """`region` grown to width:height (A1111's expand_crop_region), kept inside image_size where it fits.

    The short side grows equally both ways (any odd pixel after); a region pushed past an edge slides
    back inside; one that cannot fit is clipped, so its aspect ratio is then only approximate.
    """
    x1, y1, x2, y2 = region
    image_width, image_height = image_size
    target_ratio = width / height  # A1111's float arithmetic, kept: it decides where int() truncates
    if (x2 - x1) / (y2 - y1) > target_ratio:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / target_ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * target_ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(start: int, end: int, grow: int, limit: int) -> tuple[int, int]:
    start, end = start - grow // 2, end + grow - grow // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def paste_back(
    original: Image.Image, generated: Image.Image, region: Region, mask: Image.Image
) -> Image.Image:
    """The original with `generated` (the "only masked" result) blended into `region` by `mask`.

    `mask` is the original's size: the one crop_region was taken from, blurred as for generation.

    As A1111's uncrop + apply_overlay: the generated image is cropped-and-resized to the region, and the
    original is laid over it with alpha 255 - mask, so the (blurred) mask feathers the seam and the
    original is untouched wherever the mask is 0.
    """
    x1, y1, x2, y2 = region
    canvas = Image.new("RGBA", original.size)
    canvas.paste(resize(generated.convert("RGB"), x2 - x1, y2 - y1, ResizeMode.CROP_AND_RESIZE), (x1, y1))
    canvas.alpha_composite(_unmasked(original, mask).convert("RGBA"))
    return canvas.convert("RGB")


def _unmasked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with alpha 255 - mask, premultiplied ("RGBa"), as A1111 builds it (its rounding included)."""
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return layer


# A1111's masking.fill: blurs from wide to narrow, each composited over the last (radius, repeats).
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked_image(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with its masked area painted from the surrounding colours (A1111's "fill").

    The unmasked pixels, premultiplied by alpha = 255 - mask so that masked ones weigh nothing, are
    blurred ever less and stacked: far colours seep into the hole first, nearer ones override them.
    The last, unblurred layer puts the unmasked pixels back as they were.
    """
    kept = _unmasked(image, mask)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_PASSES:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(layer)
    return filled.convert("RGB")
