"""ControlNet control maps: sd-webui-controlnet's weight-free preprocessors, resize modes and module list."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from python_backend import control_images as ci
from python_backend.control_images import ControlResizeMode, control_map
from python_backend.request import InvalidInput

BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with thousands of colours (what high_quality_resize treats as a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def thirds(height: int, width: int) -> np.ndarray:
    """Red, green and blue vertical thirds: where a crop or a fill puts the content is visible."""
    image = np.zeros((height, width, 3), np.uint8)
    for i in range(3):
        image[:, i * width // 3 : (i + 1) * width // 3, i] = 255
    return image


def line_drawing(height: int, width: int) -> np.ndarray:
    """Black strokes on white, as a scanned sketch."""
    image = np.full((height, width, 3), 255, np.uint8)
    cv2.rectangle(image, (width // 4, height // 4), (3 * width // 4, 3 * height // 4), BLACK, 2)
    cv2.line(image, (0, height - 1), (width - 1, 0), BLACK, 2)
    return image


# --- preprocessors ------------------------------------------------------------------------------------


def test_canny_is_opencv_canny_at_the_extension_defaults_on_the_image_scaled_to_processor_res() -> None:
    image = photo(256, 384)
    cv2.circle(image, (100, 120), 60, (250, 200, 30), -1)
    cv2.rectangle(image, (220, 40), (350, 200), (20, 40, 160), -1)
    # processor_res 512 scales the shortest side 256 -> 512 (cubic, upscaling): 512 x 768, whole 64-multiples,
    # so no padding; Just Resize to that same size leaves the map as Canny made it.
    scaled = cv2.resize(image, (768, 512), interpolation=cv2.INTER_CUBIC)
    expected = cv2.Canny(scaled, 100, 200)
    got = control_map(image, "canny", 768, 512, "Just Resize")
    assert got.shape == (512, 768, 3)
    assert all(np.array_equal(got[:, :, c], expected) for c in range(3))
    assert np.count_nonzero(expected) > 1000  # the image has edges to find

    thresholds = control_map(image, "canny", 768, 512, "Just Resize", threshold_a=50.9, threshold_b=150)
    assert np.array_equal(thresholds[:, :, 0], cv2.Canny(scaled, 50, 150))  # thresholds truncated to int


def test_canny_sees_the_edge_replicated_padding_to_a_multiple_of_64() -> None:
    # 100 x 150 at processor_res 100: no scaling; padded (replicating the last row/column) to 128 x 192.
    image = photo(100, 150, seed=3)
    padded = np.pad(image, [[0, 28], [0, 42], [0, 0]], mode="edge")
    expected = cv2.Canny(padded, 100, 200)[:100, :150]
    got = ci.detect(image, "canny", processor_res=100)
    assert np.array_equal(got[:, :, 0], expected)


def test_invert_turns_white_background_black_lines_into_a_control_map() -> None:
    drawing = line_drawing(64, 64)
    for module in ("invert", "invert (from white bg & black line)"):
        inverted = ci.detect(drawing, module, processor_res=999)  # no resolution: the image's own size
        assert np.array_equal(inverted, 255 - drawing)
    assert np.array_equal(control_map(drawing, "invert", 64, 64)[0, 0], BLACK)


def test_none_passes_a_ready_control_map_through() -> None:
    ready = photo(64, 96)
    assert np.array_equal(control_map(ready, "none", 96, 64, "Crop and Resize"), ready)


def test_threshold_whitens_only_pixels_above_the_level_in_every_channel() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 200, 200)
    image[:, 32:] = (200, 200, 100)  # one channel under the level
    got = ci.detect(image, "threshold", processor_res=64, threshold_a=150)
    assert (got[:, :32] == 255).all() and (got[:, 32:] == 0).all()
    assert (ci.detect(image, "threshold", processor_res=64)[:, 32:] == 0).all()  # default level 127


def test_blur_gaussian_is_opencv_blur_at_sigma() -> None:
    image = photo(64, 64)
    got = ci.detect(image, "blur_gaussian", processor_res=64, threshold_a=2.5)
    assert np.array_equal(got, cv2.GaussianBlur(image, (0, 0), 2.5))


def test_tile_resample_shrinks_by_the_down_sampling_rate() -> None:
    image = photo(100, 200)
    assert ci.detect(image, "tile_resample", threshold_a=4).shape == (25, 50, 3)
    assert ci.detect(image, "tile_resample", threshold_a=3).shape == (33, 66, 3)  # sides rounded down
    assert np.array_equal(ci.detect(image, "tile_resample", threshold_a=1.05), image)  # under 1.1: unchanged


def test_color_grid_is_one_colour_per_64_pixel_cell() -> None:
    grid = ci.detect(photo(256, 512), "color", processor_res=128)
    assert grid.shape == (128, 256, 3)  # shortest side at processor_res
    cells = grid.reshape(2, 64, 4, 64, 3)
    assert (cells == cells[:, :1, :, :1]).all()


def test_lineart_standard_and_scribble_xdog_draw_the_dark_strokes_white_on_black() -> None:
    drawing = line_drawing(128, 128)
    strokes = drawing[:, :, 0] == 0
    for module in ("lineart_standard", "scribble_xdog"):
        got = ci.detect(drawing, module, processor_res=128)
        assert got.shape == (128, 128, 3)
        assert got[strokes].mean() > 100 > got[~strokes].mean()
    assert ci.detect(drawing, "lineart_standard", processor_res=128)[5, 64].max() == 0  # paper stays black


# --- resize modes ---------------------------------------------------------------------------------------


def test_just_resize_stretches_to_the_size() -> None:
    got = control_map(thirds(90, 90), "none", 96, 48, "Just Resize")
    assert got.shape == (48, 96, 3)
    assert np.array_equal(got[:, 0], np.tile([255, 0, 0], (48, 1)))
    assert np.array_equal(got[:, -1], np.tile([0, 0, 255], (48, 1)))


def test_crop_and_resize_covers_the_size_and_keeps_the_centre() -> None:
    # 100 x 300 to 128 x 128: scaled to 128 x 384, the middle 128 columns (the green third) kept.
    got = control_map(thirds(100, 300), "none", 128, 128)
    assert got.shape == (128, 128, 3)
    assert (got == (0, 255, 0)).all(axis=2).all()


def test_resize_and_fill_fits_inside_and_fills_with_the_border_median() -> None:
    image = np.full((100, 300, 3), 255, np.uint8)
    # The outermost pixels: half (100, 150, 200), half (101, 151, 201). Per channel median, truncated.
    image[0], image[-1] = (100, 150, 200), (101, 151, 201)
    image[:, 0], image[:, -1] = (100, 150, 200), (101, 151, 201)
    got = control_map(image, "none", 128, 128, "Resize and Fill")
    assert got.shape == (128, 128, 3)
    # Scaled to 43 x 128 (300 -> 128), centred: rows 42..84 are the image, the rest the fill colour.
    assert (got[:42] == (100, 150, 200)).all() and (got[85:] == (100, 150, 200)).all()
    assert (got[50:80, 10:-10] == 255).all()


def test_resize_modes_accept_old_names_and_img2img_indices() -> None:
    image = thirds(100, 300)
    crop = control_map(image, "none", 128, 128, "Crop and Resize")
    fill = control_map(image, "none", 128, 128, "Resize and Fill")
    stretch = control_map(image, "none", 128, 128, "Just Resize")
    for alias, expected in (
        ("Inner Fit (Scale to Fit)", crop),
        ("Scale to Fit (Inner Fit)", crop),
        ("Outer Fit (Shrink to Fit)", fill),
        ("Envelope (Outer Fit)", fill),
        (0, stretch),
        (1, crop),
        (2, fill),
        (3, stretch),  # img2img's "Just resize (latent upscale)"
    ):
        assert np.array_equal(control_map(image, "none", 128, 128, alias), expected), alias


def test_high_quality_resize_interpolates_photos_area_down_and_cubic_up() -> None:
    image = photo(96, 96)
    assert np.array_equal(
        ci.high_quality_resize(image, 48, 48), cv2.resize(image, (48, 48), interpolation=cv2.INTER_AREA)
    )
    assert np.array_equal(
        ci.high_quality_resize(image, 192, 192), cv2.resize(image, (192, 192), interpolation=cv2.INTER_CUBIC)
    )


def test_high_quality_resize_keeps_segmentation_colours_exact() -> None:
    colours = np.array([(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200)], np.uint8)
    seg = colours[np.arange(40 * 40).reshape(40, 40) // 7 % 4]
    for size in (17, 100):
        resized = ci.high_quality_resize(seg, size, size)
        assert {tuple(c) for c in resized.reshape(-1, 3)} <= {tuple(c) for c in colours}  # no blended colours


def test_high_quality_resize_keeps_one_pixel_edges_one_pixel_wide_and_binary() -> None:
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[32, 8:56] = 255  # a one-pixel edge, as canny draws them
    up = ci.high_quality_resize(edges, 128, 128)
    assert set(np.unique(up)) == {0, 255}
    per_column = np.count_nonzero(up[:, 24:104, 0], axis=0)
    assert (per_column == 1).all()  # cubic alone would smear it over several rows
    blurred = cv2.resize(edges, (128, 128), interpolation=cv2.INTER_CUBIC)
    assert len(np.unique(blurred)) > 2


def test_high_quality_resize_rebinarises_thick_binary_shapes_without_thinning() -> None:
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    up = ci.high_quality_resize(mask, 128, 128)
    assert set(np.unique(up)) == {0, 255}
    assert abs(np.count_nonzero(up[:, :, 0]) - 64 * 64) < 200  # the square, scaled, still filled


# --- pixel perfect ----------------------------------------------------------------------------------------


def test_pixel_perfect_resolution_is_the_short_side_at_the_scale_the_mode_applies() -> None:
    image = photo(300, 200)  # height 300, width 200; to 768 wide x 512 high
    # Covering (crop, stretch): the larger ratio 768/200 = 3.84 -> 200 * 3.84 = 768.
    assert ci.pixel_perfect_resolution(image, 768, 512, ControlResizeMode.CROP_AND_RESIZE) == 768
    assert ci.pixel_perfect_resolution(image, 768, 512, ControlResizeMode.JUST_RESIZE) == 768
    # Fitting inside: the smaller ratio 512/300 -> 200 * 1.7067 = 341.33 -> 341.
    assert ci.pixel_perfect_resolution(image, 768, 512, ControlResizeMode.RESIZE_AND_FILL) == 341


def test_pixel_perfect_replaces_processor_res() -> None:
    image = photo(300, 200)
    chosen = control_map(image, "canny", 768, 512, "Resize and Fill", processor_res=341)
    assert np.array_equal(
        control_map(image, "canny", 768, 512, "Resize and Fill", 1024, pixel_perfect=True), chosen
    )
    assert not np.array_equal(control_map(image, "canny", 768, 512, "Resize and Fill", 1024), chosen)


# --- settings and validation --------------------------------------------------------------------------------


def test_minus_one_and_out_of_range_settings_mean_the_defaults() -> None:
    image = photo(128, 128)
    default = ci.detect(image, "canny")
    assert np.array_equal(ci.detect(image, "canny", 512, 100, 200), default)
    assert np.array_equal(ci.detect(image, "canny", 5000, 0, 256), default)  # outside 64..2048 and 1..255
    # webuiapi sends threshold_a=64 for every module; tile_resample's range is 1..8: its default, unchanged.
    assert np.array_equal(ci.detect(image, "tile_resample", 512, 64, 64), image)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("module", {"module": "depth_midas"}),
        ("module", {"module": "Canny"}),
        ("module", {"module": None}),
        ("image", {"image": np.zeros((8, 8), np.uint8)}),
        ("image", {"image": np.zeros((8, 8, 3), np.float32)}),
        ("image", {"image": np.zeros((0, 8, 3), np.uint8)}),
        ("image", {"image": "not an array"}),
        ("image", {"image": np.zeros((1, 4096, 3), np.uint8), "module": "canny", "processor_res": 2048}),
        # Crop and Resize to 512 x 512 would scale it to 512 x 2M pixels.
        ("image", {"image": np.zeros((1, 4096, 3), np.uint8), "width": 512, "height": 512}),
        ("width", {"width": 0}),
        ("width", {"width": 512.0}),
        ("height", {"height": -8}),
        ("height", {"height": True}),
        ("resize_mode", {"resize_mode": "Stretch"}),
        ("resize_mode", {"resize_mode": 4}),
        ("resize_mode", {"resize_mode": -1}),
        ("resize_mode", {"resize_mode": None}),
        ("processor_res", {"processor_res": 512.5}),
        ("processor_res", {"processor_res": float("nan")}),
        ("processor_res", {"processor_res": "512"}),
        ("threshold_a", {"threshold_a": float("inf")}),
        ("threshold_a", {"threshold_a": True}),
        ("threshold_b", {"threshold_b": "200"}),
        (
            "threshold_a",
            {"image": np.zeros((4, 4, 3), np.uint8), "module": "tile_resample", "threshold_a": 8},
        ),
        ("pixel_perfect", {"pixel_perfect": "yes"}),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"image": photo(32, 32), "module": "none", "width": 64, "height": 64} | kwargs
    with pytest.raises(ValueError, match=f"^{field}: ") as raised:
        control_map(**args)  # type: ignore[arg-type]
    assert isinstance(raised.value, InvalidInput) and raised.value.field == field


def test_an_unknown_module_is_refused_listing_what_this_server_runs() -> None:
    with pytest.raises(InvalidInput, match="no model weights: none, tile_resample, lineart_standard, canny"):
        ci.find_preprocessor("openpose")


# --- module list and tensors --------------------------------------------------------------------------------


def test_module_list_is_the_extensions_order_restricted_to_what_runs_here() -> None:
    # "none" first, then by priority (100, 20, 0) and, within one, by UI label descending.
    names = ci.module_list()["module_list"]
    assert names == [
        "none",
        "tile_resample",
        "lineart_standard",
        "canny",
        "invert",
        "threshold",
        "color",
        "scribble_xdog",
        "blur_gaussian",
    ]
    labels = ci.module_list(alias_names=True)["module_list"]
    assert labels[2] == "lineart_standard (from white bg & black line)"
    assert labels[4] == "invert (from white bg & black line)"
    assert labels[6] == "t2ia_color_grid"
    for label in labels:  # every listed name is accepted as a module
        assert ci.find_preprocessor(label).label == label


def test_module_detail_gives_each_modules_sliders_as_the_extension_does() -> None:
    detail = ci.module_list()["module_detail"]
    resolution = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    assert detail["canny"] == {
        "model_free": False,
        "sliders": [
            resolution,
            {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
            {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1},
        ],
    }
    assert detail["invert"]["sliders"] == []
    assert detail["none"]["sliders"] == [resolution]
    assert detail["tile_resample"]["sliders"][1] == {
        "name": "Down Sampling Rate",
        "value": 1.0,
        "min": 1.0,
        "max": 8.0,
        "step": 0.01,
    }
    alias_detail = ci.module_list(alias_names=True)["module_detail"]
    assert alias_detail["t2ia_color_grid"] == detail["color"]


def test_control_tensor_is_what_diffusers_feeds_its_controlnet() -> None:
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    control = control_map(photo(100, 150), "canny", 96, 64)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    expected = processor.preprocess(Image.fromarray(control), height=64, width=96)[0].numpy()
    tensor = ci.control_tensor(control)
    assert tensor.dtype == np.float32 and tensor.shape == (3, 64, 96)
    assert np.array_equal(tensor, expected)
