"""img2img on the client side: the image's bytes, strength and resize mode, infotext, `sd-client img2img`."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from PIL import Image
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from client import GenerationError, parse_infotext
from client.api import build_inputs, decode_response, image_bytes, triton_inputs
from client.cli import build_parser, main
from python_backend.request import request_from_inputs


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _sent_image(inputs: list[tuple[str, np.ndarray]]) -> bytes:
    [array] = [array for name, array in inputs if name == "image"]
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


def test_img2img_reads_the_image_then_fails_to_connect(png_file: Path, tmp_path: Path, capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["img2img", "a cat", "--image", str(png_file), "--url", f"127.0.0.1:{port}"])
    assert code == 1 and "cannot reach the Triton server" in capsys.readouterr().err
