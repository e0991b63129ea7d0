"""Image inputs: bounded decoding, A1111's resize modes and mask handling, diffusers' tensors."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from enum import Enum

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from python_backend import images
from python_backend.images import InpaintingFill, ResizeMode
from python_backend.request import InvalidInput

LIMITS = {"max_side": 2048, "max_pixels": 2048 * 2048}


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no pixel data: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})]
)
def test_decode_image_reads_png_webp_and_jpeg(fmt: str, options: dict[str, object]) -> None:
    source = gradient(48, 32)
    decoded = images.decode_image(encode(source, fmt, **options), "image", **LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (48, 32)
    difference = np.abs(np.asarray(decoded, dtype=int) - np.asarray(source, dtype=int))
    assert difference.max() <= (0 if fmt != "JPEG" else 40) and difference.mean() < 2


def test_decode_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    data = encode(Image.new("RGB", (40, 16), "red"), "JPEG", exif=exif)
    assert images.decode_image(data, "image", **LIMITS).size == (16, 40)


def test_decode_image_flattens_transparency_onto_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # transparent black
    rgba[:, 4:] = (0, 0, 255, 255)  # opaque blue
    decoded = np.asarray(images.decode_image(encode(Image.fromarray(rgba), "PNG"), "image", **LIMITS))
    assert (decoded[:, :4] == 255).all()
    assert (decoded[:, 4:] == (0, 0, 255)).all()


@pytest.mark.parametrize(
    ("width", "height", "limits", "problem"),
    [
        (100_000, 100_000, LIMITS, "too large"),  # past Pillow's bomb error
        (10_000, 10_000, {"max_side": 100_000, "max_pixels": 10**9}, "too large"),  # Pillow's bomb warning
        (4096, 16, LIMITS, "4096x16"),  # one side too long
        (2000, 2000, {"max_side": 2048, "max_pixels": 1024 * 1024}, "2000x2000"),  # too many pixels
    ],
)
def test_oversized_images_are_rejected_from_the_header(
    width: int, height: int, limits: dict[str, int], problem: str
) -> None:
    data = png_header_only(width, height)
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match=problem) as caught:
        images.decode_image(data, "init_image", **limits)
    assert caught.value.field == "init_image"
    assert time.perf_counter() - started < 0.5  # nothing was decoded


def test_a_header_within_limits_still_needs_its_pixels() -> None:
    with pytest.raises(InvalidInput, match="cannot decode the PNG"):
        images.decode_image(png_header_only(64, 64), "image", **LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        encode(Image.effect_noise((32, 32), 64), "PNG")[:400],  # truncated (noise does not compress)
        encode(gradient(32, 32), "GIF"),  # a format we do not take
        encode(gradient(32, 32), "BMP"),
    ],
    ids=["empty", "garbage", "truncated", "gif", "bmp"],
)
def test_undecodable_bytes_are_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        images.decode_mask(data, "mask", size=(32, 32), **LIMITS)
    assert caught.value.field == "mask"
    assert str(caught.value).startswith("mask: ")


def test_decode_mask_uses_luminance_of_opaque_masks() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[2:6, 2:6] = 255
    mask = images.decode_mask(encode(Image.fromarray(rgb), "PNG"), "mask", size=(8, 8), **LIMITS)
    assert mask.mode == "L"
    assert np.array_equal(np.asarray(mask), rgb[..., 0])
    opaque = Image.fromarray(rgb).convert("RGBA")  # an alpha channel that is all 255 is ignored
    assert np.array_equal(
        np.asarray(images.decode_mask(encode(opaque, "PNG"), "mask", size=(8, 8), **LIMITS)), rgb[..., 0]
    )


def test_decode_mask_uses_the_alpha_of_transparent_masks_rounded_at_128() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # colour black throughout: only alpha says anything
    rgba[..., 3] = [[0, 128, 129, 255]] * 4
    mask = images.decode_mask(encode(Image.fromarray(rgba), "PNG"), "mask", size=(4, 4), **LIMITS)
    assert np.asarray(mask).tolist() == [[0, 0, 255, 255]] * 4


def test_decode_mask_is_stretched_to_the_image_size() -> None:
    half = np.zeros((16, 32), dtype=np.uint8)
    half[:, 16:] = 255
    mask = images.decode_mask(encode(Image.fromarray(half), "PNG"), "mask", size=(64, 48), **LIMITS)
    assert mask.size == (64, 48)
    pixels = np.asarray(mask)
    assert (pixels[:, :28] < 8).all() and (pixels[:, 36:] > 247).all()


# --- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("just_resize", ResizeMode.JUST_RESIZE),
        ("Crop and resize", ResizeMode.CROP_AND_RESIZE),
        (" RESIZE AND FILL ", ResizeMode.RESIZE_AND_FILL),
        ("0", ResizeMode.JUST_RESIZE),
        ("2", ResizeMode.RESIZE_AND_FILL),
    ],
)
def test_resize_mode_names(value: str, expected: ResizeMode) -> None:
    assert images.parse_resize_mode(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fill", InpaintingFill.FILL),
        ("original", InpaintingFill.ORIGINAL),
        ("latent noise", InpaintingFill.LATENT_NOISE),
        ("latent_nothing", InpaintingFill.LATENT_NOTHING),
        ("3", InpaintingFill.LATENT_NOTHING),
    ],
)
def test_inpainting_fill_names(value: str, expected: InpaintingFill) -> None:
    assert images.parse_inpainting_fill(value) is expected


def test_only_original_skips_the_image_fill() -> None:
    assert [choice.fills_image for choice in InpaintingFill] == [True, False, True, True]


@pytest.mark.parametrize(
    ("parse", "field", "value", "listed"),
    [
        (images.parse_resize_mode, "resize_mode", "3", "resize_and_fill ('Resize and fill', 2)"),
        (images.parse_resize_mode, "resize_mode", "stretch", "just_resize ('Just resize', 0)"),
        (images.parse_inpainting_fill, "inpainting_fill", "noise", "latent_noise ('latent noise', 2)"),
    ],
)
def test_unknown_names_list_the_valid_ones(
    parse: Callable[[str], Enum], field: str, value: str, listed: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(value)  # "3" is A1111's "Just resize (latent upscale)": not offered
    assert caught.value.field == field
    assert listed in str(caught.value)


# --- resizing -----------------------------------------------------------------------------------------


def thirds(width: int, height: int, vertical: bool) -> Image.Image:
    """Red, green, blue thirds, side by side (vertical stripes) or stacked."""
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255)], dtype=np.uint8)
    along = np.arange(width if vertical else height) * 3 // (width if vertical else height)
    line = colours[along]
    pixels = (
        np.broadcast_to(line[None], (height, width, 3))
        if vertical
        else np.broadcast_to(line[:, None], (height, width, 3))
    )
    return Image.fromarray(np.ascontiguousarray(pixels))


@pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill"])
@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 32), (40, 120)])
def test_every_mode_gives_the_requested_size(mode: str, width: int, height: int) -> None:
    result = images.resize(gradient(90, 50), width, height, mode)
    assert result.size == (width, height) and result.mode == "RGB"
    assert images.resize(Image.new("L", (30, 70)), width, height, mode).mode == "L"
    assert images.resize(Image.new("RGB", (900, 1)), width, height, mode).size == (width, height)  # a sliver


def test_just_resize_stretches_with_lanczos() -> None:
    source = gradient(90, 50)
    expected = source.resize((64, 64), Image.Resampling.LANCZOS)
    assert images.resize(source, 64, 64, "Just resize").tobytes() == expected.tobytes()


def test_crop_and_resize_keeps_the_centre() -> None:
    # 300x100 thirds → 64x64: scaled to 192x64 (covering), the middle 64 columns are the green third.
    source = thirds(300, 100, vertical=True)
    result = images.resize(source, 64, 64, "crop_and_resize")
    assert (
        result.tobytes()
        == source.resize((192, 64), Image.Resampling.LANCZOS).crop((64, 0, 128, 64)).tobytes()
    )
    assert np.abs(np.asarray(result)[:, 8:-8].astype(int) - (0, 255, 0)).max() <= 3
    # the other way, with A1111's floor: 100x301 → 64x64 is scaled to 64x192 (192.64), rows 64..128 kept
    source = thirds(100, 301, vertical=False)
    result = images.resize(source, 64, 64, "1")
    assert (
        result.tobytes()
        == source.resize((64, 192), Image.Resampling.LANCZOS).crop((0, 64, 64, 128)).tobytes()
    )
    assert np.abs(np.asarray(result)[8:-8].astype(int) - (0, 255, 0)).max() <= 3


def test_resize_and_fill_keeps_the_whole_image_and_stretches_its_edges() -> None:
    source = thirds(120, 60, vertical=True)  # wider than the target: bands above and below
    result = np.asarray(images.resize(source, 64, 64, "Resize and fill"))
    fitted = np.asarray(source.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(result[16:48], fitted)  # centred, whole
    # Every row is the same in this image, so each band row is the fitted edge row.
    assert np.abs(result[:16].astype(int) - fitted[0].astype(int)).max() <= 1
    assert np.abs(result[48:].astype(int) - fitted[-1].astype(int)).max() <= 1

    source = thirds(30, 90, vertical=False)  # taller: bands left and right
    result = np.asarray(images.resize(source, 64, 64, "resize_and_fill"))
    fitted = np.asarray(source.resize((21, 64), Image.Resampling.LANCZOS))  # 30 * 64 // 90 = 21
    left = 32 - 21 // 2  # 22 columns of band on the left, 21 on the right
    assert np.array_equal(result[:, left : left + 21], fitted)
    assert np.abs(result[:, :left].astype(int) - fitted[:, :1].astype(int)).max() <= 1
    assert np.abs(result[:, left + 21 :].astype(int) - fitted[:, -1:].astype(int)).max() <= 1


def test_resize_rejects_unknown_modes() -> None:
    with pytest.raises(InvalidInput, match="resize_mode"):
        images.resize(gradient(8, 8), 8, 8, "zoom")


# --- tensors: diffusers parity ------------------------------------------------------------------------


def test_to_model_input_equals_diffusers_preprocess() -> None:
    image = gradient(96, 64)
    ours = images.to_model_input(image)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 64, 96)
    assert torch.equal(ours, VaeImageProcessor().preprocess(image))
    assert ours.min() == -1 and ours.max() == 1


def test_tensors_need_whole_latents() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        images.to_model_input(gradient(60, 64))


def test_mask_to_latent_equals_the_inpaint_pipelines_mask() -> None:
    values = np.random.default_rng(0).integers(0, 256, size=(64, 96), dtype=np.uint8)
    values[0, :4] = [126, 127, 128, 129]  # around diffusers' 0.5 threshold
    mask = Image.fromarray(values)
    processor = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    expected = processor.preprocess(mask, height=64, width=96)
    assert torch.equal(images.mask_to_tensor(mask), expected)
    assert images.mask_to_tensor(mask)[0, 0, 0, :4].tolist() == [0, 0, 1, 1]
    latent = images.mask_to_latent(mask, (8, 12))
    assert latent.shape == (1, 1, 8, 12)
    assert torch.equal(latent, torch.nn.functional.interpolate(expected, size=(64 // 8, 96 // 8)))


# --- masks --------------------------------------------------------------------------------------------


def test_blur_mask_matches_opencv_to_the_bit() -> None:
    # Expected values are cv2.GaussianBlur's (OpenCV 5.0) with A1111's kernel sizes.
    row = np.zeros((1, 24), dtype=np.uint8)
    row[0, 11], row[0, 0] = 255, 200  # the 200 shows the reflected border
    assert np.asarray(images.blur_mask(Image.fromarray(row), 2, 0)).tolist() == [
        [41, 35, 24, 13, 5, 2, 2, 7, 17, 31, 45, 52, 45, 31, 17, 7, 2, 0, 0, 0, 0, 0, 0, 0]
    ]
    column = np.zeros((20, 1), dtype=np.uint8)
    column[10:] = 255
    assert np.asarray(images.blur_mask(Image.fromarray(column), 0, 4))[:, 0].tolist() == [
        2, 3, 7, 12, 21, 32, 48, 67, 90, 115, 140, 165, 188, 207, 223, 234, 243, 248, 252, 253,
    ]  # fmt: skip


def test_blur_mask_blurs_both_ways_and_zero_is_no_blur() -> None:
    square = np.zeros((32, 32), dtype=np.uint8)
    square[12:20, 12:20] = 255
    mask = Image.fromarray(square)
    assert images.blur_mask(mask, 0).tobytes() == mask.tobytes()
    blurred = np.asarray(images.blur_mask(mask, 4))
    assert blurred[16, 16] < 255 and blurred[16, 6] > 0 and blurred[6, 16] > 0
    across = np.asarray(images.blur_mask(mask, 4, 0))
    assert across[16, 6] > 0 and (across[:12] == 0).all() and (across[20:] == 0).all()


def square_mask(size: tuple[int, int], box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    mask = Image.new("L", size)
    mask.paste(value, box)
    return mask


def test_crop_region_is_the_padded_bounding_box_of_the_mask() -> None:
    mask = square_mask((64, 48), (10, 5, 20, 15), value=1)  # any non-zero value counts
    assert images.crop_region(mask, 0) == (10, 5, 20, 15)
    assert images.crop_region(mask, 4) == (6, 1, 24, 19)
    assert images.crop_region(mask, 100) == (0, 0, 64, 48)
    assert images.crop_region(Image.new("L", (64, 48)), 8) is None


@pytest.mark.parametrize(
    ("region", "size", "image_size", "expected"),
    [
        ((100, 200, 228, 232), (512, 512), (512, 512), (100, 152, 228, 280)),  # 128x32 → 128x128, centred
        ((10, 10, 20, 50), (512, 512), (512, 512), (0, 10, 40, 50)),  # past the left edge: slides back
        ((0, 490, 128, 512), (512, 512), (512, 512), (0, 384, 128, 512)),  # past the bottom: slides up
        ((0, 10, 400, 40), (512, 512), (512, 100), (0, 0, 400, 100)),  # cannot fit: clipped
        ((0, 0, 64, 32), (512, 256), (512, 512), (0, 0, 64, 32)),  # already 2:1
        ((10, 10, 21, 20), (512, 512), (512, 512), (10, 10, 21, 21)),  # odd growth goes after
        ((100, 300, 124, 310), (64, 600), (1000, 1000), (100, 193, 124, 417)),  # A1111's float rounding: 224
    ],
)
def test_expand_to_aspect(
    region: images.Region, size: tuple[int, int], image_size: tuple[int, int], expected: images.Region
) -> None:
    assert images.expand_to_aspect(region, *size, image_size) == expected


def test_paste_back_blends_the_generated_crop_by_the_mask() -> None:
    original = gradient(64, 64)
    mask = square_mask((64, 64), (24, 24, 40, 40))
    mask.putpixel((22, 30), 128)
    box = images.crop_region(mask, 4)
    assert box == (18, 20, 44, 44)
    region = images.expand_to_aspect(box, 32, 32, original.size)
    assert region == (18, 19, 44, 45)
    generated = Image.new("RGB", (32, 32), (255, 0, 255))  # the size the crop was generated at
    result = np.asarray(images.paste_back(original, generated, region, mask)).astype(int)
    source = np.asarray(original).astype(int)
    untouched = np.asarray(mask) == 0
    assert np.array_equal(result[untouched], source[untouched])
    assert (result[24:40, 24:40] == (255, 0, 255)).all()
    halfway = (source[30, 22] + np.array([255, 0, 255])) / 2
    assert np.abs(result[30, 22] - halfway).max() <= 1


def test_fill_masked_image_paints_the_hole_from_its_surroundings() -> None:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (200, 0, 0)
    pixels[:, 32:] = (0, 0, 200)
    pixels[8:24, 8:24] = (255, 255, 255)  # what the mask hides must not leak
    image = Image.fromarray(pixels)
    mask = square_mask((64, 64), (8, 8, 24, 24))
    filled = np.asarray(images.fill_masked_image(image, mask)).astype(int)
    outside = np.asarray(mask) == 0
    assert np.abs(filled[outside] - pixels[outside]).max() <= 1
    hole = filled[8:24, 8:24]
    assert (hole[..., 0] > 100).all() and (hole[..., 0] > hole[..., 2]).all() and (hole[..., 1] < 60).all()
