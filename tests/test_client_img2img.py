"""img2img and inpainting on the client side: the image's and mask's bytes, their options, infotext,
`sd-client img2img` and `sd-client inpaint`."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from PIL import Image
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from client import (
    GenerationError,
    GenerationResult,
    StableDiffusionClient,
    parse_infotext,
    read_infotext,
    save_png,
)
from client.api import build_inputs, decode_response, image_bytes, triton_inputs
from client.cli import build_parser, main, request_kwargs
from python_backend.request import request_from_inputs


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sent_image(inputs: list[tuple[str, np.ndarray]], input_name: str = "image") -> bytes:
    [array] = [array for name, array in inputs if name == input_name]
    assert array.dtype == np.object_ and array.shape == (1,)
    return array[0]


@pytest.mark.parametrize("as_type", [bytes, str, Path])
def test_image_bytes_are_the_file_exactly(png_file: Path, as_type: type) -> None:
    image = png_file.read_bytes() if as_type is bytes else as_type(png_file)
    assert image_bytes(image) == png_file.read_bytes()
    assert _sent_image(build_inputs("p", image=image)) == png_file.read_bytes()


def test_non_utf8_bytes_go_untouched() -> None:
    # Not text and not valid UTF-8: must not be decoded, str()-ed or re-encoded on the way.
    raw = bytes(range(256)) + b"\x89PNG\r\n\x1a\n\x00\xff"
    assert _sent_image(build_inputs("p", image=raw)) == raw


def test_pil_image_goes_as_png_with_the_same_pixels() -> None:
    picture = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    sent = _sent_image(build_inputs("p", image=picture))
    assert sent.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(sent)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(picture))


def test_the_server_reads_back_the_bytes_tritonclient_sends(png_file: Path) -> None:
    # What tritonclient puts on the wire for a BYTES tensor, deserialized as Triton hands it to the
    # python backend, then read by the pipeline's own request parser.
    arrays = dict(build_inputs("a cat", image=png_file, strength=0.6, resize_mode="crop_and_resize"))
    wire = {
        name: deserialize_bytes_tensor(serialize_byte_tensor(a).item()) if a.dtype == np.object_ else a
        for name, a in arrays.items()
    }
    request = request_from_inputs(wire)
    assert request.image == png_file.read_bytes()
    assert (request.prompt, request.resize_mode) == ("a cat", "crop_and_resize")
    assert request.strength == pytest.approx(0.6)


@pytest.mark.parametrize("triton", [tritonclient.grpc, tritonclient.http])
def test_triton_inputs_for_img2img(triton, png_file: Path) -> None:
    arrays = build_inputs("a", image=png_file, strength=0.5, resize_mode="Crop and resize")
    tensors = triton_inputs(triton, arrays)
    assert [(t.name(), t.datatype(), list(t.shape())) for t in tensors] == [
        ("prompt", "BYTES", [1]),
        ("seed", "INT64", [1]),  # drawn by the client
        ("image", "BYTES", [1]),
        ("strength", "FP32", [1]),
        ("resize_mode", "BYTES", [1]),
    ]


@pytest.mark.parametrize("argument", ["strength", "resize_mode"])
def test_img2img_arguments_without_image_are_refused(argument: str) -> None:
    with pytest.raises(GenerationError) as error:
        build_inputs("a", **{argument: 0.5 if argument == "strength" else "just_resize"})  # type: ignore[arg-type]
    assert error.value.is_invalid_argument and error.value.message == f"{argument} needs an image (img2img)"


def test_missing_image_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_inputs("a", image=tmp_path / "missing.png")


INFO = {
    "prompt": "a castle",
    "negative_prompt": "",
    "seeds": [5],
    "sampler": "Euler a",
    "steps": 20,
    "guidance_scale": 7.5,
    "width": 8,
    "height": 8,
    "model": "sd-v1-4",
}


def test_infotext_has_denoising_strength_for_img2img() -> None:
    images = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    fp32_strength = float(np.float32(0.6))  # as the server echoes it: 0.6000000238418579
    img2img = decode_response(images, json.dumps({**INFO, "strength": fp32_strength}).encode())
    text = img2img.infotexts()[0]
    assert text.endswith("Model: sd-v1-4, Denoising strength: 0.6")
    assert parse_infotext(text)[2]["Denoising strength"] == "0.6"
    txt2img = decode_response(images, json.dumps(INFO).encode())
    assert "Denoising strength" not in txt2img.infotexts()[0]


def test_parse_img2img() -> None:
    args = build_parser().parse_args(
        ["img2img", "a cat", "--image", "in.png", "--strength", "0.4", "--resize-mode", "resize_and_fill"]
        + ["--steps", "30", "--seed", "3", "--num-images", "2", "--out", "o"]
    )
    assert (args.command, args.prompt, args.image) == ("img2img", "a cat", Path("in.png"))
    assert (args.strength, args.resize_mode) == (0.4, "resize_and_fill")
    assert (args.steps, args.seed, args.num_images, args.out) == (30, 3, 2, Path("o"))
    defaults = build_parser().parse_args(["img2img", "a cat", "--image", "in.png"])
    assert (defaults.strength, defaults.resize_mode, defaults.guidance_scale) == (None, None, None)


def test_img2img_requires_image(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["img2img", "a cat"])
    assert exit_info.value.code == 2 and "--image" in capsys.readouterr().err


def test_img2img_reads_the_image_then_fails_to_connect(png_file: Path, free_port: int, capsys) -> None:
    code = main(["img2img", "a cat", "--image", str(png_file), "--url", f"127.0.0.1:{free_port}"])
    assert code == 1 and "cannot reach the Triton server" in capsys.readouterr().err


# --- inpainting ---------------------------------------------------------------------------------------


@pytest.fixture
def mask_file(tmp_path: Path) -> Path:
    path = tmp_path / "mask.png"
    mask = np.zeros((12, 20), dtype=np.uint8)
    mask[2:8, 4:12] = 255
    Image.fromarray(mask).save(path)
    return path


@pytest.mark.parametrize("as_type", [bytes, str, Path])
def test_mask_bytes_are_the_file_exactly(png_file: Path, mask_file: Path, as_type: type) -> None:
    mask = mask_file.read_bytes() if as_type is bytes else as_type(mask_file)
    inputs = build_inputs("p", image=png_file, mask=mask)
    assert _sent_image(inputs, "mask") == mask_file.read_bytes()
    assert _sent_image(inputs) == png_file.read_bytes()
    raw = bytes(range(256))[::-1]  # not UTF-8: must reach the wire untouched
    assert _sent_image(build_inputs("p", image=png_file, mask=raw), "mask") == raw


def test_pil_mask_goes_as_png_with_the_same_pixels(png_file: Path) -> None:
    mask = Image.fromarray(np.tile(np.array([0, 255], dtype=np.uint8), (4, 3)), mode="L")
    sent = _sent_image(build_inputs("p", image=png_file, mask=mask), "mask")
    with Image.open(io.BytesIO(sent)) as decoded:
        assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), np.asarray(mask))


@pytest.mark.parametrize("only_masked", [True, False, np.True_])
def test_inpaint_full_res_is_a_bool_tensor(png_file: Path, mask_file: Path, only_masked: bool) -> None:
    inputs = dict(build_inputs("p", image=png_file, mask=mask_file, inpaint_full_res=only_masked))
    array = inputs["inpaint_full_res"]
    assert array.dtype == np.bool_ and array.shape == (1,) and array[0] == bool(only_masked)


@pytest.mark.parametrize("triton", [tritonclient.grpc, tritonclient.http])
def test_triton_inputs_for_inpainting(triton, png_file: Path, mask_file: Path) -> None:
    arrays = build_inputs(
        "a",
        image=png_file,
        mask=mask_file,
        mask_blur=0,
        inpainting_fill="latent noise",
        inpaint_full_res=True,
        inpaint_full_res_padding=48,
    )
    tensors = triton_inputs(triton, arrays)
    assert [(t.name(), t.datatype(), list(t.shape())) for t in tensors] == [
        ("prompt", "BYTES", [1]),
        ("seed", "INT64", [1]),  # drawn by the client
        ("image", "BYTES", [1]),
        ("mask", "BYTES", [1]),
        ("mask_blur", "INT32", [1]),
        ("inpainting_fill", "BYTES", [1]),
        ("inpaint_full_res", "BOOL", [1]),
        ("inpaint_full_res_padding", "INT32", [1]),
    ]


@pytest.mark.parametrize("only_masked", [True, False])
def test_the_server_reads_back_the_inpainting_inputs(
    png_file: Path, mask_file: Path, only_masked: bool
) -> None:
    arrays = dict(
        build_inputs(
            "a cat",
            image=png_file,
            mask=mask_file,
            mask_blur=9,
            inpainting_fill="latent_nothing",
            inpaint_full_res=only_masked,
            inpaint_full_res_padding=0,
        )
    )
    wire = {
        name: deserialize_bytes_tensor(serialize_byte_tensor(a).item()) if a.dtype == np.object_ else a
        for name, a in arrays.items()
    }
    request = request_from_inputs(wire)
    assert (request.image, request.mask) == (png_file.read_bytes(), mask_file.read_bytes())
    assert (request.mask_blur, request.inpainting_fill, request.inpaint_full_res_padding) == (
        9,
        "latent_nothing",
        0,
    )
    assert request.inpaint_full_res is only_masked


def test_mask_without_image_is_refused(mask_file: Path) -> None:
    with pytest.raises(GenerationError) as error:
        build_inputs("a", mask=mask_file)
    assert error.value.is_invalid_argument and error.value.message == "mask needs an image to inpaint"


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("mask_blur", 4),
        ("inpainting_fill", "fill"),
        ("inpaint_full_res", False),
        ("inpaint_full_res_padding", 32),
    ],
)
@pytest.mark.parametrize("with_image", [True, False])
def test_mask_options_without_mask_are_refused(
    png_file: Path, argument: str, value: Any, with_image: bool
) -> None:
    image = png_file if with_image else None
    with pytest.raises(GenerationError) as error:
        build_inputs("a", image=image, **{argument: value})
    assert error.value.is_invalid_argument and error.value.message == f"{argument} needs a mask (inpainting)"


def test_bad_inpainting_values_are_refused(png_file: Path, mask_file: Path) -> None:
    for text in ("false", 1):  # np.array(["false"], bool) would send True
        with pytest.raises(TypeError, match="inpaint_full_res must be a bool"):
            build_inputs("a", image=png_file, mask=mask_file, inpaint_full_res=text)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="mask_blur must be within") as error:
        build_inputs("a", image=png_file, mask=mask_file, mask_blur=2**31)
    assert error.value.is_invalid_argument
    with pytest.raises(TypeError):
        build_inputs("a", image=png_file, mask=mask_file, inpaint_full_res_padding=1.5)  # type: ignore[arg-type]


INPAINT_INFO = {
    **INFO,
    "strength": 0.75,
    "resize_mode": "just_resize",
    "mask_blur": 4,
    "inpainting_fill": "original",
    "inpaint_full_res": False,
    "inpaint_full_res_padding": 32,
}


def _inpaint_result(**info: Any) -> GenerationResult:
    return decode_response(np.zeros((1, 8, 8, 3), np.uint8), json.dumps({**INPAINT_INFO, **info}).encode())


def test_infotext_of_inpainting_whole_picture() -> None:
    params = parse_infotext(_inpaint_result().infotexts()[0])[2]
    assert list(params)[-3:] == ["Denoising strength", "Mask blur", "Masked content"]
    assert (params["Mask blur"], params["Masked content"]) == ("4", "original")
    # As A1111: the area and padding only for "Only masked".
    assert "Inpaint area" not in params and "Masked area padding" not in params


@pytest.mark.parametrize(
    ("fill", "label"),
    [
        ("fill", "fill"),
        ("original", "original"),
        ("latent_noise", "latent noise"),
        ("latent_nothing", "latent nothing"),
    ],
)
def test_infotext_of_inpainting_only_masked(fill: str, label: str) -> None:
    result = _inpaint_result(
        inpainting_fill=fill, inpaint_full_res=True, inpaint_full_res_padding=48, mask_blur=0
    )
    text = result.infotexts()[0]
    assert text.endswith(
        f"Denoising strength: 0.75, Mask blur: 0, Inpaint area: Only masked, Masked area padding: 48, "
        f"Masked content: {label}"
    )
    assert parse_infotext(text)[2]["Size"] == "8x8"  # the info's size, without a generation size
    result.generation_size = (64, 32)
    assert parse_infotext(result.infotexts()[0])[2]["Size"] == "64x32"


class _FakeInfer:
    """Stands in for tritonclient's InferenceServerClient.infer: records the inputs, answers `images` and
    `info` as the server does for "only masked" (the original image's size)."""

    def __init__(self, info: dict[str, Any], size: tuple[int, int]) -> None:
        self.inputs: dict[str, Any] = {}
        self.info, self.size = info, size

    def __call__(self, model_name: str, inputs: list[Any], **kwargs: Any) -> Any:
        self.inputs = {tensor.name(): tensor for tensor in inputs}
        images = np.zeros((1, self.size[1], self.size[0], 3), np.uint8)
        info = np.array([json.dumps(self.info).encode()], dtype=np.object_)
        return type("Result", (), {"as_numpy": lambda _, name: images if name == "images" else info})()


@pytest.mark.parametrize(
    ("size", "only_masked", "generation_size"),
    [
        ({"width": 64, "height": 32}, True, (64, 32)),
        ({}, True, (512, 512)),  # the server's defaults
        ({"width": 64, "height": 32}, False, None),  # the images are the generated ones
    ],
)
def test_generate_records_the_generation_size_for_only_masked(
    png_file: Path, mask_file: Path, size: dict[str, int], only_masked: bool, generation_size: Any
) -> None:
    info = {**INPAINT_INFO, "width": 20, "height": 12, "inpaint_full_res": only_masked}
    with StableDiffusionClient("127.0.0.1:1") as sd:
        fake = _FakeInfer(info, (20, 12))
        sd._client.infer = fake  # type: ignore[method-assign]
        result = sd.generate("a cat", image=png_file, mask=mask_file, inpaint_full_res=only_masked, **size)
    assert fake.inputs["inpaint_full_res"].datatype() == "BOOL" and "mask" in fake.inputs
    assert result.generation_size == generation_size and result.images[0].size == (20, 12)
    expected = "{}x{}".format(*(generation_size or (20, 12)))
    assert parse_infotext(result.infotexts()[0])[2]["Size"] == expected


def test_parse_inpaint() -> None:
    args = build_parser().parse_args(
        ["inpaint", "a cat", "--image", "in.png", "--mask", "m.png", "--mask-blur", "0"]
        + ["--inpainting-fill", "latent noise", "--only-masked", "--only-masked-padding", "48"]
        + ["--strength", "0.6", "--resize-mode", "crop_and_resize", "--steps", "30", "--num-images", "2"]
    )
    assert (args.command, args.prompt, args.image, args.mask) == (
        "inpaint",
        "a cat",
        Path("in.png"),
        Path("m.png"),
    )
    assert (args.mask_blur, args.inpainting_fill, args.inpaint_full_res, args.inpaint_full_res_padding) == (
        0,
        "latent noise",
        True,
        48,
    )
    assert (args.strength, args.resize_mode, args.steps, args.num_images) == (0.6, "crop_and_resize", 30, 2)
    defaults = build_parser().parse_args(["inpaint", "a cat", "--image", "in.png", "--mask", "m.png"])
    server_decides = (
        "mask_blur",
        "inpainting_fill",
        "inpaint_full_res",
        "inpaint_full_res_padding",
        "strength",
    )
    assert all(getattr(defaults, name) is None for name in server_decides)
    no = build_parser().parse_args(["inpaint", "a", "--image", "i", "--mask", "m", "--no-only-masked"])
    assert no.inpaint_full_res is False


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["inpaint", "a cat", "--mask", "m.png"], "--image"),
        (["inpaint", "a cat", "--image", "in.png"], "--mask"),
        (["img2img", "a cat", "--image", "in.png", "--mask", "m.png"], "--mask"),  # inpaint's option
        (["generate", "a cat", "--only-masked"], "--only-masked"),
    ],
)
def test_inpaint_command_lines_argparse_refuses(argv: list[str], missing: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2 and missing in capsys.readouterr().err


def test_inpaint_reads_image_and_mask_then_fails_to_connect(
    png_file: Path, mask_file: Path, free_port: int, capsys
) -> None:
    code = main(
        [
            "inpaint",
            "a cat",
            "--image",
            str(png_file),
            "--mask",
            str(mask_file),
            "--url",
            f"127.0.0.1:{free_port}",
        ]
    )
    assert code == 1 and "cannot reach the Triton server" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (["--mask", "{mask}", "--mask-blur", str(2**31)], "mask_blur must be within"),
        (["--mask", "{mask}", "--infotext", "{bad_fill}"], "Masked content: expected one of fill, original"),
    ],
)
def test_unusable_inpaint_command_lines_exit_2(
    extra: list[str], complaint: str, png_file: Path, mask_file: Path, tmp_path: Path, free_port: int, capsys
) -> None:
    bad_fill = tmp_path / "bad.png"
    save_png(
        Image.new("RGB", (8, 8)), bad_fill, "p\nSteps: 2, Seed: 1, Size: 8x8, Masked content: lama cleaner"
    )
    files = {"mask": mask_file, "bad_fill": bad_fill}
    argv = ["inpaint", "a cat", "--image", str(png_file), *(arg.format(**files) for arg in extra)]
    assert main([*argv, "--url", f"127.0.0.1:{free_port}"]) == 2  # nothing listens: never got that far
    err = capsys.readouterr().err
    assert err.startswith("sd-client: error: ") and complaint in err


def test_inpaint_infotext_round_trip(png_file: Path, mask_file: Path, tmp_path: Path) -> None:
    """The PNG of an "only masked" inpainting, read back by `--infotext`, asks for the same request."""
    result = _inpaint_result(
        strength=float(np.float32(0.55)),
        mask_blur=7,
        inpainting_fill="latent_noise",
        inpaint_full_res=True,
        inpaint_full_res_padding=40,
    )
    result.generation_size = (64, 32)  # as generate() records it; the images have the original's size
    [png] = result.save(tmp_path / "out")
    files = ["--image", str(png_file), "--mask", str(mask_file)]

    def request(*argv: str) -> dict[str, Any]:
        return request_kwargs(build_parser().parse_args(["inpaint", "--infotext", str(png), *files, *argv]))

    recorded = request()
    assert {key: value for key, value in recorded.items() if key not in ("image", "mask")} == {
        "prompt": "a castle",
        "negative_prompt": "",
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 5,
        "scheduler": "Euler a",
        "width": 64,
        "height": 32,
        "num_images": None,
        "strength": 0.55,
        "resize_mode": None,  # not in A1111's infotext: the server default
        "mask_blur": 7,
        "inpainting_fill": "latent_noise",
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 40,
        "subseed": None,
        "subseed_strength": None,
        "clip_skip": None,
    }
    assert (recorded["image"], recorded["mask"]) == (png_file.read_bytes(), mask_file.read_bytes())
    overridden = request("--no-only-masked", "--mask-blur", "0", "--inpainting-fill", "fill")
    assert (overridden["inpaint_full_res"], overridden["mask_blur"], overridden["inpainting_fill"]) == (
        False,
        0,
        "fill",
    )
    assert build_inputs(**overridden)  # every argument is one build_inputs takes
    # Commands without a mask leave the inpainting params (and generate the strength) out.
    for command in (["generate"], ["img2img", "--image", str(png_file)]):
        other = request_kwargs(build_parser().parse_args([*command, "--infotext", str(png)]))
        assert not {"mask", "mask_blur", "inpainting_fill", "inpaint_full_res"} & set(other)
    assert read_infotext(png) == result.infotexts()[0]
