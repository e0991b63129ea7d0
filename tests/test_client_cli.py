from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from PIL import Image
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from client import (
    GenerationError,
    GenerationResult,
    StableDiffusionClient,
    parse_infotext,
    read_infotext,
    save_png,
)
from client.api import (
    HIRES_OPTIONS,
    GenerateOptions,
    build_inputs,
    build_request_inputs,
    decode_response,
    error_from_exception,
    next_sequence_number,
    triton_inputs,
)
from client.cli import build_parser, format_scheduler_table, main, request_kwargs, save_and_report
from client.grid import contact_sheet, parse_axis, sweep
from python_backend.request import request_from_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]

INFO: dict[str, Any] = {
    "prompt": "a castle, at dusk",
    "negative_prompt": "blurry",
    "seeds": [123, 124],
    "scheduler": "euler_a",
    "sampler": "Euler a",
    "steps": 20,
    "guidance_scale": 7.5,
    "width": 16,
    "height": 8,
    "model": "stable-diffusion-v1-4",
    "timings_ms": {"text_encode": 1.0, "denoise": 2.0, "decode": 3.0, "total": 6.5},
    "warnings": ["something to know"],
}


def _images(n: int = 2, height: int = 8, width: int = 16) -> np.ndarray:
    return np.arange(n * height * width * 3, dtype=np.uint8).reshape(n, height, width, 3)


def _result(info: dict | None = None) -> GenerationResult:
    return decode_response(_images(), json.dumps(info or INFO).encode())


@pytest.fixture
def free_port() -> int:
    """A local port nothing listens on (bound once to pick it, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- argument parsing ---------------------------------------------------------------------------------


def test_parse_generate_all_options() -> None:
    args = build_parser().parse_args(
        [
            "generate",
            "a cat, on a mat",
            "--negative-prompt",
            "dogs",
            "--steps",
            "30",
            "--guidance",
            "6.5",
            "--seed",
            "-1",
            "--scheduler",
            "DPM++ 2M Karras",
            "--width",
            "640",
            "--height",
            "384",
            "--num-images",
            "3",
            "--url",
            "example:9001",
            "--protocol",
            "http",
            "--out",
            "imgs",
            "--timeout",
            "90",
        ]
    )
    assert (args.command, args.prompt, args.negative_prompt) == ("generate", "a cat, on a mat", "dogs")
    assert (args.steps, args.guidance_scale, args.seed, args.scheduler) == (30, 6.5, -1, "DPM++ 2M Karras")
    assert (args.width, args.height, args.num_images) == (640, 384, 3)
    assert (args.url, args.protocol, args.out, args.timeout) == ("example:9001", "http", Path("imgs"), 90.0)


def test_parse_generate_defaults_leave_choices_to_the_server() -> None:
    args = build_parser().parse_args(["generate", "a cat"])
    server_decides = (
        "negative_prompt",
        "steps",
        "guidance_scale",
        "seed",
        "scheduler",
        "width",
        "height",
        "num_images",
    )
    assert all(getattr(args, name) is None for name in server_decides)
    assert (args.url, args.protocol, args.out, args.timeout, args.infotext) == (
        None,
        "grpc",
        Path("outputs"),
        None,
        None,
    )


def test_parse_schedulers() -> None:
    args = build_parser().parse_args(["schedulers", "--protocol", "http", "--url", "h:1"])
    assert (args.command, args.protocol, args.url) == ("schedulers", "http", "h:1")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate", "x", "--steps", "many"],
        ["generate", "x", "--image", "in.png"],  # img2img's option
        ["generate", "x", "--mask", "m.png"],  # inpaint's option
        ["inpaint", "x", "--image", "in.png", "--mask-blur", "4"],  # no --mask
        ["inpaint", "x", "--image", "in.png", "--mask", "m.png", "--mask-blur", "soft"],
        ["generate", "x", "--protocol", "udp"],
        ["nope"],
    ],
)
def test_parse_rejects_bad_command_lines(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_generate_help_says_server_default(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert help_text.count("server default") >= 8
    assert "./outputs" in help_text


# --- request building ---------------------------------------------------------------------------------


def test_build_inputs_prompt_only() -> None:
    [(name, array), (seed, _)] = build_inputs("a cat")  # the other inputs take the server's defaults
    assert (name, seed) == ("prompt", "seed")
    assert array.dtype == np.object_ and array.shape == (1,) and array[0] == b"a cat"


def test_build_inputs_all_arguments() -> None:
    inputs = build_inputs(
        "城堡, at dusk",
        negative_prompt="blurry",
        steps=25,
        guidance_scale=7.5,
        seed=2**40,
        scheduler="euler_a",
        width=640,
        height=384,
        num_images=2,
    )
    assert [(name, array.dtype, array.shape) for name, array in inputs] == [
        ("prompt", np.object_, (1,)),
        ("negative_prompt", np.object_, (1,)),
        ("width", np.int32, (1,)),
        ("height", np.int32, (1,)),
        ("num_inference_steps", np.int32, (1,)),
        ("num_images", np.int32, (1,)),
        ("guidance_scale", np.float32, (1,)),
        ("seed", np.int64, (1,)),
        ("scheduler", np.object_, (1,)),
    ]
    values = {name: array[0] for name, array in inputs}
    assert values["prompt"] == "城堡, at dusk".encode()
    assert (values["negative_prompt"], values["scheduler"]) == (b"blurry", b"euler_a")
    assert (values["width"], values["height"], values["num_inference_steps"], values["num_images"]) == (
        640,
        384,
        25,
        2,
    )
    assert values["guidance_scale"] == np.float32(7.5)
    assert values["seed"] == 2**40


def test_build_inputs_sends_explicit_empty_negative_and_draws_random_seeds() -> None:
    inputs = dict(build_inputs("a", negative_prompt="", seed=-1))
    assert inputs["negative_prompt"][0] == b""
    # Drawn by the client, so that a server's response cache cannot answer a "random" request.
    seeds = {int(dict(build_inputs("a", seed=seed))["seed"][0]) for seed in (None, -1, -1, None)}
    assert len(seeds) == 4 and all(0 <= s < 2**32 for s in seeds)
    varied = dict(build_inputs("a", seed=1, subseed_strength=0.5))
    assert 0 <= varied["subseed"][0] < 2**32 and varied["seed"][0] == 1
    assert "subseed" not in dict(build_inputs("a", seed=1))


def test_build_inputs_refuses_out_of_range_and_non_integers() -> None:
    with pytest.raises(GenerationError) as error:
        build_inputs("a", width=2**31)
    assert error.value.is_invalid_argument and "width" in error.value.message
    with pytest.raises(TypeError):
        build_inputs("a", steps=20.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("triton", [tritonclient.grpc, tritonclient.http])
def test_triton_inputs_datatypes(triton) -> None:
    arrays = build_inputs("a", negative_prompt="b", steps=1, guidance_scale=2.0, seed=3, scheduler="ddim")
    tensors = triton_inputs(triton, arrays)
    assert [(t.name(), t.datatype(), list(t.shape())) for t in tensors] == [
        ("prompt", "BYTES", [1]),
        ("negative_prompt", "BYTES", [1]),
        ("num_inference_steps", "INT32", [1]),
        ("guidance_scale", "FP32", [1]),
        ("seed", "INT64", [1]),
        ("scheduler", "BYTES", [1]),
    ]


# --- response decoding --------------------------------------------------------------------------------


def test_decode_response() -> None:
    images = _images()
    result = decode_response(images, json.dumps(INFO).encode())
    assert result.info == INFO
    assert [(im.mode, im.size) for im in result.images] == [("RGB", (16, 8))] * 2
    assert np.array_equal(np.asarray(result.images[1]), images[1])


@pytest.mark.parametrize(
    ("images", "info", "complaint"),
    [
        (_images().astype(np.float32), json.dumps(INFO).encode(), "UINT8"),
        (_images()[..., :1], json.dumps(INFO).encode(), "shape"),
        (_images(), b"not json", "JSON"),
        (_images(n=3), json.dumps(INFO).encode(), "seeds"),
    ],
)
def test_decode_response_rejects_malformed(images: np.ndarray, info: bytes, complaint: str) -> None:
    with pytest.raises(GenerationError, match=complaint):
        decode_response(images, info)


def test_infotexts_one_per_image_with_its_seed() -> None:
    texts = _result({**INFO, "guidance_scale": float(np.float32(7.3))}).infotexts()
    assert len(texts) == 2
    for text, seed in zip(texts, INFO["seeds"], strict=True):
        prompt, negative, params = parse_infotext(text)
        assert (prompt, negative) == ("a castle, at dusk", "blurry")
        assert params == {
            "Steps": "20",
            "Sampler": "Euler a",
            "CFG scale": "7.3",  # not FP32's 7.300000190734863
            "Seed": str(seed),
            "Size": "16x8",
            "Model": "stable-diffusion-v1-4",
        }


def test_infotexts_without_negative_prompt() -> None:
    text = _result({**INFO, "negative_prompt": ""}).infotexts()[0]
    assert "Negative prompt" not in text


# --- saving -------------------------------------------------------------------------------------------


def test_save_names_and_chunks(tmp_path: Path) -> None:
    result = _result()
    out = tmp_path / "new" / "dir"
    paths = result.save(out)
    assert [p.name for p in paths] == ["00000-123.png", "00001-124.png"]
    for path, infotext in zip(paths, result.infotexts(), strict=True):
        assert read_infotext(path) == infotext
    assert [p.name for p in result.save(out)] == ["00002-123.png", "00003-124.png"]


def test_save_continues_after_existing_files_and_overwrites_nothing(tmp_path: Path) -> None:
    (tmp_path / "00041-9.png").write_bytes(b"keep")
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "img-00007-5.png").write_bytes(b"keep")
    assert [p.name for p in _result().save(tmp_path)] == ["00042-123.png", "00043-124.png"]
    assert [p.name for p in _result().save(tmp_path, prefix="img-")] == [
        "img-00008-123.png",
        "img-00009-124.png",
    ]
    assert (tmp_path / "00041-9.png").read_bytes() == b"keep"


def test_save_skips_a_name_taken_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another client wrote 00000-123.png after the directory was scanned.
    (tmp_path / "00000-123.png").write_bytes(b"theirs")
    monkeypatch.setattr("client.api.next_sequence_number", lambda out, prefix: 0)
    assert [p.name for p in _result().save(tmp_path)] == ["00001-123.png", "00002-124.png"]
    assert (tmp_path / "00000-123.png").read_bytes() == b"theirs"


def test_save_returns_images_as_written(tmp_path: Path) -> None:
    result = _result()
    [first, _] = result.save(tmp_path)
    with Image.open(first) as image:
        assert np.array_equal(np.asarray(image), np.asarray(result.images[0]))


def test_save_and_report_prints_paths_and_warnings(tmp_path: Path, capsys) -> None:
    save_and_report(_result(), tmp_path)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(tmp_path / "00000-123.png"), str(tmp_path / "00001-124.png")]
    assert captured.err == "warning: something to know\n"


def test_next_sequence_number_fresh_dir(tmp_path: Path) -> None:
    assert next_sequence_number(tmp_path) == 0


# --- errors and exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "invalid"),
    [
        ("StatusCode.INVALID_ARGUMENT", "INVALID_ARGUMENT", True),
        ("400", "400", True),
        ("StatusCode.INTERNAL", "INTERNAL", False),
        ("500", "500", False),
        (None, None, False),
    ],
)
def test_error_from_triton_exception(status: str | None, expected: str | None, invalid: bool) -> None:
    error = error_from_exception(
        InferenceServerException("width must be a multiple of 8", status), "h:1", "grpc"
    )
    assert (error.message, error.status, error.is_invalid_argument) == (
        "width must be a multiple of 8",
        expected,
        invalid,
    )


def test_error_from_socket_errors() -> None:
    refused = error_from_exception(ConnectionRefusedError(111, "Connection refused"), "h:1", "http")
    assert (
        refused.status == "UNAVAILABLE"
        and "cannot reach the Triton server at h:1 over http" in refused.message
    )
    assert error_from_exception(TimeoutError("timed out"), "h:1", "http").status == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("command", [["generate", "a cat", "--out", "{out}"], ["schedulers"]])
def test_cli_without_server(
    protocol: str, command: list[str], free_port: int, tmp_path: Path, capsys
) -> None:
    url = f"127.0.0.1:{free_port}"
    command = [arg.format(out=tmp_path / "out") for arg in command]
    code = main([*command, "--url", url, "--protocol", protocol])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.startswith(
        f"sd-client: error: cannot reach the Triton server at {url} over {protocol}"
    )
    assert not (tmp_path / "out").exists()


def test_streaming_without_server_is_unavailable_and_retried(free_port: int) -> None:
    # The stream breaks before its request goes out; tritonclient says only "no longer in valid state",
    # and the status comes through the stream's callback: UNAVAILABLE, which the client retries.
    client = StableDiffusionClient(f"127.0.0.1:{free_port}", retries=1)
    started = time.monotonic()
    with pytest.raises(GenerationError) as refused:
        client.generate("a cat", on_progress=lambda status, preview: None)
    assert refused.value.status == "UNAVAILABLE" and refused.value.is_retryable
    assert "cannot reach the Triton server" in str(refused.value)
    assert time.monotonic() - started >= 0.4  # one retry, after its backoff


def test_cli_without_server_subprocess_has_no_traceback(free_port: int, tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port}"
    run = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "a cat", "--url", url, "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "cannot reach the Triton server" in run.stderr and url in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_api_without_server(protocol: str, free_port: int) -> None:
    with StableDiffusionClient(f"127.0.0.1:{free_port}", protocol=protocol, timeout_s=10) as client:
        assert not client.is_ready()
        with pytest.raises(GenerationError) as error:
            client.generate("a cat")
        assert error.value.status == "UNAVAILABLE" and not error.value.is_invalid_argument


def test_cli_refuses_out_of_range_seed(capsys) -> None:
    # Caught before any connection is made, so no server is needed.
    assert main(["generate", "a", "--seed", str(2**63)]) == 2
    assert "seed must be within" in capsys.readouterr().err


def test_client_default_urls() -> None:
    with StableDiffusionClient() as grpc_client, StableDiffusionClient(protocol="http") as http_client:
        assert (grpc_client.url, http_client.url) == ("127.0.0.1:8001", "127.0.0.1:8000")
    with pytest.raises(ValueError, match="protocol"):
        StableDiffusionClient(protocol="udp")


def test_scheduler_table_marks_default() -> None:
    table = format_scheduler_table(
        [
            {"name": "pndm", "a1111": "PLMS", "default": True},
            {"name": "dpmpp_2m_karras", "a1111": "DPM++ 2M Karras"},
        ]
    )
    assert table.splitlines() == [
        "NAME             A1111",
        "pndm             PLMS             (default)",
        "dpmpp_2m_karras  DPM++ 2M Karras",
    ]


# --- --infotext ---------------------------------------------------------------------------------------

RECORDED = (
    "a castle, at dusk\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x768, Model: sd-v1-4, "
    "Denoising strength: 0.6"
)


# generate's arguments that RECORDED lacks: left to the server.
NOT_RECORDED = dict.fromkeys(
    ["subseed", "subseed_strength", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps"]
    + ["denoising_strength", "clip_skip"]
)


@pytest.fixture
def recorded_png(tmp_path: Path) -> Path:
    path = tmp_path / "recorded.png"
    save_png(Image.new("RGB", (8, 8)), path, RECORDED)
    return path


def _request(*argv: str) -> dict[str, Any]:
    return request_kwargs(build_parser().parse_args(list(argv)))


def test_infotext_supplies_the_prompt_and_every_recorded_value(recorded_png: Path) -> None:
    assert _request("generate", "--infotext", str(recorded_png)) == {
        "prompt": "a castle, at dusk",
        "negative_prompt": "blurry",
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 123,
        "scheduler": "Euler a",
        "width": 512,
        "height": 768,
        "num_images": None,
        # no strength: generate has no image to apply it to
        **NOT_RECORDED,
    }


def test_command_line_overrides_infotext(recorded_png: Path) -> None:
    request = _request(
        "generate",
        "a dog",
        "--infotext",
        str(recorded_png),
        "--negative-prompt",
        "",  # explicitly none, not "use the recorded one"
        "--steps",
        "5",
        "--guidance",
        "3",
        "--seed",
        "-1",
        "--scheduler",
        "DDIM",
        "--height",
        "256",
        "--num-images",
        "2",
    )
    assert request == {
        "prompt": "a dog",
        "negative_prompt": "",
        "steps": 5,
        "guidance_scale": 3.0,
        "seed": -1,
        "scheduler": "DDIM",
        "width": 512,  # not given: still the recorded one
        "height": 256,
        "num_images": 2,
        **NOT_RECORDED,
    }


def test_infotext_strength_for_img2img_only(recorded_png: Path, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    img2img = ["img2img", "--infotext", str(recorded_png), "--image", str(image)]
    assert _request(*img2img)["strength"] == 0.6
    assert _request(*img2img, "--strength", "0.3")["strength"] == 0.3
    assert _request("grid", "--infotext", str(recorded_png), "--x", "steps=1,2")["strength"] is None
    assert (
        _request("grid", "--infotext", str(recorded_png), "--x", "steps=1", "--image", str(image))["strength"]
        == 0.6
    )


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["generate"], "a PROMPT is required"),
        (["generate", "--infotext", "{plain}"], "has no `parameters` chunk"),
        (["generate", "--infotext", "{missing}"], "--infotext: cannot read"),
        (["generate", "--infotext", "{text_file}"], "--infotext: cannot read"),
        (["generate", "--infotext", "{bad_steps}"], "Steps: expected an integer, got 'many'"),
        (["img2img", "x", "--image", "{missing}"], "--image: cannot read"),
        (["inpaint", "x", "--image", "{plain}", "--mask", "{missing}"], "--mask: cannot read"),
        (["inpaint", "x", "--image", "{missing}", "--mask", "{plain}"], "--image: cannot read"),
        (["grid", "x", "--x", "steps=1,2", "--y", "steps=3"], "--y: Steps is already swept by --x"),
        (["grid", "x", "--x", "strength=0.5"], "strength needs an image"),
        (["grid", "x", "--x", "seed=1", "--strength", "0.5"], "strength needs an image"),
    ],
)
def test_unusable_command_lines_exit_2_before_any_request(
    argv: list[str], complaint: str, tmp_path: Path, free_port: int, capsys
) -> None:
    files = {
        "plain": tmp_path / "plain.png",
        "missing": tmp_path / "missing.png",
        "text_file": tmp_path / "notes.txt",
        "bad_steps": tmp_path / "bad.png",
    }
    Image.new("RGB", (8, 8)).save(files["plain"])
    files["text_file"].write_text("not an image")
    save_png(Image.new("RGB", (8, 8)), files["bad_steps"], RECORDED.replace("Steps: 20", "Steps: many"))
    argv = [arg.format(**files) for arg in argv]
    assert main([*argv, "--url", f"127.0.0.1:{free_port}"]) == 2  # nothing listens: never got that far
    err = capsys.readouterr().err
    assert err.startswith("sd-client: error: ") and complaint in err


# --- grid ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "values", "labels"),
    [
        ("steps=10,20,30", "steps", (10, 20, 30), ["Steps: 10", "Steps: 20", "Steps: 30"]),
        ("scheduler=Euler a,DDIM", "scheduler", ("Euler a", "DDIM"), ["Sampler: Euler a", "Sampler: DDIM"]),
        ("sampler=Euler a, DPM++ 2M Karras", "scheduler", ("Euler a", "DPM++ 2M Karras"), None),
        ("guidance=5,7.5", "guidance_scale", (5.0, 7.5), ["CFG Scale: 5", "CFG Scale: 7.5"]),
        ("CFG Scale=1", "guidance_scale", (1.0,), None),
        ("seed=1,-1", "seed", (1, -1), None),
        ("width=512,768", "width", (512, 768), None),
        ("height=64", "height", (64,), None),
        ("denoising=0.3,0.6", "strength", (0.3, 0.6), ["Denoising: 0.3", "Denoising: 0.6"]),
        # The hires fix's: A1111's txt2img "Denoising".
        (
            "denoising-strength=0.3,0.6",
            "denoising_strength",
            (0.3, 0.6),
            ["Denoising: 0.3", "Denoising: 0.6"],
        ),
        (
            "subseed_strength=0,0.5",
            "subseed_strength",
            (0.0, 0.5),
            ["Var. strength: 0", "Var. strength: 0.5"],
        ),
        ("variation strength=1", "subseed_strength", (1.0,), None),
        ("hr_scale=1.5,2", "hr_scale", (1.5, 2.0), ["Hires upscale: 1.5", "Hires upscale: 2"]),
        ("Hires upscale=2", "hr_scale", (2.0,), None),
        (
            'negative="blurry, lowres",,ugly',
            "negative_prompt",
            ("blurry, lowres", "", "ugly"),
            ["Negative prompt: blurry, lowres", "Negative prompt: ", "Negative prompt: ugly"],
        ),
    ],
)
def test_parse_axis(spec: str, name: str, values: tuple, labels: list[str] | None) -> None:
    axis = parse_axis(spec)
    assert (axis.param.name, axis.values) == (name, values)
    assert all(type(v) is type(values[0]) for v in axis.values)
    assert axis.spec == spec.partition("=")[2]
    if labels is not None:
        assert axis.labels() == labels


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("steps", "expected NAME=V1,V2"),
        ("nope=1,2", "expected NAME=V1,V2,... with NAME one of steps, guidance"),
        ("steps=", "steps: no values"),
        ("steps=10,ten", "steps: 'ten' is not an integer"),
        ("steps=10.5", "steps: '10.5' is not an integer"),
        ("guidance=high", "guidance: 'high' is not a number"),
    ],
)
def test_bad_axis_exits_2_naming_the_axis(spec: str, complaint: str, capsys) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_axis(spec)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["grid", "p", "--x", "steps=1", "--z", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --z: " in err and complaint in err


def test_parse_grid() -> None:
    args = build_parser().parse_args(
        ["grid", "p", "--x", "steps=1,2", "--y", "cfg=3", "--seed", "5", "--image", "in.png", "--out", "g"]
    )
    assert (args.x.param.name, args.y.param.name, args.z) == ("steps", "guidance_scale", None)
    assert (args.seed, args.image, args.strength, args.out) == (5, Path("in.png"), None, Path("g"))
    assert not hasattr(args, "num_images")  # one image per cell
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grid", "p", "--y", "steps=1"])  # --x is required


def _cell_image(color: tuple[int, int, int], size: tuple[int, int] = (16, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def _dark_columns(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """x coordinates (in `image`) of the columns of `box` holding dark (label) pixels."""
    pixels = np.asarray(image.crop(box).convert("L"))
    return np.flatnonzero((pixels < 128).any(axis=0)) + box[0]


def _dark_rows(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    pixels = np.asarray(image.crop(box).convert("L"))
    return np.flatnonzero((pixels < 128).any(axis=1)) + box[1]


def test_contact_sheet_without_labels_is_the_images_side_by_side() -> None:
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (99, 99, 99), (199, 199, 199)]]
    sheet = contact_sheet([[_cell_image(c) for c in row] for row in colors], ["", ""], ["", "", ""])
    assert sheet.size == (3 * 16, 2 * 8)
    for i, row in enumerate(colors):
        for j, color in enumerate(row):
            cell = np.asarray(sheet.crop((16 * j, 8 * i, 16 * (j + 1), 8 * (i + 1))))
            assert (cell == color).all()


def test_contact_sheet_labels_sit_beside_their_rows_and_above_their_columns() -> None:
    size = (160, 120)  # wide enough for a short label in the default font
    cells = [[_cell_image((0, 128, 255), size)] * 3] * 2
    columns = ["Steps: 10", "Steps: 20", "Steps: 30"]
    rows = ["Sampler: Euler a", "Sampler: DDIM"]
    sheet = contact_sheet(cells, rows, columns, title="CFG Scale: 7")
    left, top = sheet.width - 3 * size[0], sheet.height - 2 * size[1]
    assert left > 0 and top > 0  # the images fill the bottom right, labels take the rest
    assert (np.asarray(sheet.crop((left, top, sheet.width, sheet.height))) == (0, 128, 255)).all()

    # Each column label alone (no title): its ink lies over its own column only. Likewise for rows.
    for j in range(3):
        alone = contact_sheet(cells, rows, [c if k == j else " " for k, c in enumerate(columns)])
        ink = _dark_columns(alone, (left, 0, alone.width, alone.height - 2 * size[1]))
        assert ink.size and left + j * size[0] <= ink.min() and ink.max() < left + (j + 1) * size[0]
    for i in range(2):
        alone = contact_sheet(cells, [r if k == i else " " for k, r in enumerate(rows)], columns)
        ink = _dark_rows(alone, (0, alone.height - 2 * size[1], alone.width - 3 * size[0], alone.height))
        row_top = alone.height - 2 * size[1] + i * size[1]
        assert ink.size and row_top <= ink.min() and ink.max() < row_top + size[1]
    # The title is above the column labels.
    title_ink = _dark_rows(sheet, (0, 0, sheet.width, top))
    no_title = contact_sheet(cells, rows, columns)
    assert sheet.height > no_title.height and title_ink.min() < sheet.height - no_title.height


def test_contact_sheet_mixed_sizes_centre_in_cells() -> None:
    cells = [[_cell_image((255, 0, 0), (16, 8)), _cell_image((0, 255, 0), (8, 16))]]
    sheet = contact_sheet(cells, [""], ["", ""])
    assert sheet.size == (16 + 8, 16)
    pixels = np.asarray(sheet)
    assert (pixels[4:12, :16] == (255, 0, 0)).all() and (pixels[:4, :16] == 255).all()
    assert (pixels[:, 16:] == (0, 255, 0)).all()


def _sweep_generate(calls: list[dict[str, Any]]):
    """A stand-in for StableDiffusionClient.generate: records its arguments, answers one image whose
    colour encodes the call number, and reports seed 777 when asked for a random one."""

    def generate(**kwargs: Any) -> GenerationResult:
        calls.append(kwargs)
        seed = 777 if kwargs.get("seed") in (None, -1) else kwargs["seed"]
        info = {**INFO, "seeds": [seed], "steps": kwargs.get("steps", 20), "width": 16, "height": 8}
        image = np.full((1, 8, 16, 3), len(calls), dtype=np.uint8)
        return decode_response(image, json.dumps(info).encode())

    return generate


def test_sweep_one_request_per_cell_with_the_first_seed_reused() -> None:
    calls: list[dict[str, Any]] = []
    x, y, z = parse_axis("steps=10,20,30"), parse_axis("scheduler=Euler a,DDIM"), parse_axis("cfg=5,7.5")
    sheets = sweep(_sweep_generate(calls), {"prompt": "p", "steps": 99, "seed": None}, x, y, z)
    assert len(calls) == 12 and len(sheets) == 2
    assert calls[0]["seed"] is None and all(call["seed"] == 777 for call in calls[1:])
    # Z outermost, then Y, X innermost; axes override the fixed steps.
    assert [(c["guidance_scale"], c["scheduler"], c["steps"]) for c in calls[:4]] == [
        (5.0, "Euler a", 10),
        (5.0, "Euler a", 20),
        (5.0, "Euler a", 30),
        (5.0, "DDIM", 10),
    ]
    assert calls[6]["guidance_scale"] == 7.5
    # Cell (row 1, column 2) of the second sheet is the 12th call's image, at the bottom right.
    sheet, infotext = sheets[1]
    assert sheet.getpixel((sheet.width - 1, sheet.height - 1)) == (12, 12, 12)
    prompt, _, params = parse_infotext(infotext)
    assert prompt == INFO["prompt"] and params["Seed"] == "777" and params["Steps"] == "10"
    assert (params["X Type"], params["X Values"]) == ("Steps", "10,20,30")
    assert (params["Y Type"], params["Y Values"], params["Z Values"]) == ("Sampler", "Euler a,DDIM", "5,7.5")


@pytest.mark.parametrize(
    ("request_seed", "axes", "expected_seeds"),
    [
        (42, ["steps=1,2"], [42, 42]),  # a given seed is kept
        (None, ["seed=1,2"], [1, 2]),  # a seed axis is not overridden
    ],
)
def test_sweep_keeps_given_seeds(
    request_seed: int | None, axes: list[str], expected_seeds: list[int]
) -> None:
    calls: list[dict[str, Any]] = []
    [(sheet, _)] = sweep(_sweep_generate(calls), {"prompt": "p", "seed": request_seed}, parse_axis(axes[0]))
    assert [call["seed"] for call in calls] == expected_seeds
    assert sheet.height > 8  # one row of images under the column labels, no row labels


# --- variation seeds and hires fix --------------------------------------------------------------------

VARIATION_AND_HIRES = {
    "subseed": 900,
    "subseed_strength": 0.3,
    "enable_hr": True,
    "hr_scale": 1.5,
    "hr_upscaler": "Lanczos",
    "hr_second_pass_steps": 10,
    "denoising_strength": 0.55,
}


def test_parse_variation_and_hires_options() -> None:
    args = build_parser().parse_args(
        ["generate", "a cat", "--subseed", "900", "--subseed-strength", "0.3", "--enable-hr"]
        + ["--hr-scale", "1.5", "--hr-upscaler", "Lanczos", "--hr-second-pass-steps", "10"]
        + ["--denoising-strength", "0.55"]
    )
    assert {name: getattr(args, name) for name in VARIATION_AND_HIRES} == VARIATION_AND_HIRES
    defaults = build_parser().parse_args(["generate", "a cat"])
    assert all(getattr(defaults, name) is None for name in VARIATION_AND_HIRES)
    assert build_parser().parse_args(["generate", "a", "--no-enable-hr"]).enable_hr is False
    grid = build_parser().parse_args(["grid", "a", "--x", "hr_scale=1.5,2", "--enable-hr", "--subseed", "1"])
    assert (grid.enable_hr, grid.subseed, grid.x.param.name) == (True, 1, "hr_scale")
    img2img = build_parser().parse_args(["img2img", "a", "--image", "i.png", "--subseed-strength", "0.2"])
    assert img2img.subseed_strength == 0.2 and not hasattr(img2img, "enable_hr")


@pytest.mark.parametrize(
    "argv",
    [
        ["img2img", "x", "--image", "i.png", "--enable-hr"],  # the hires fix is text to image only
        ["inpaint", "x", "--image", "i.png", "--mask", "m.png", "--hr-scale", "2"],
        ["generate", "x", "--hr-scale", "twice"],
        ["generate", "x", "--subseed", "0.5"],
    ],
)
def test_parse_rejects_bad_variation_and_hires_options(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("triton", [tritonclient.grpc, tritonclient.http])
def test_triton_inputs_for_variation_and_hires(triton) -> None:
    tensors = triton_inputs(triton, build_inputs("a", **VARIATION_AND_HIRES))
    assert [(t.name(), t.datatype(), list(t.shape())) for t in tensors] == [
        ("prompt", "BYTES", [1]),
        ("seed", "INT64", [1]),  # drawn by the client
        ("subseed", "INT64", [1]),
        ("subseed_strength", "FP32", [1]),
        ("enable_hr", "BOOL", [1]),
        ("hr_scale", "FP32", [1]),
        ("hr_upscaler", "BYTES", [1]),
        ("hr_second_pass_steps", "INT32", [1]),
        ("denoising_strength", "FP32", [1]),
    ]


def test_the_server_reads_back_variation_and_hires_inputs() -> None:
    arrays = dict(build_inputs("a cat", **{**VARIATION_AND_HIRES, "subseed": 2**40}))
    wire = {
        name: deserialize_bytes_tensor(serialize_byte_tensor(a).item()) if a.dtype == np.object_ else a
        for name, a in arrays.items()
    }
    request = request_from_inputs(wire)
    assert (request.subseed, request.enable_hr, request.hr_upscaler, request.hr_second_pass_steps) == (
        2**40,
        True,
        "Lanczos",
        10,
    )
    assert (request.subseed_strength, request.hr_scale, request.denoising_strength) == pytest.approx(
        (0.3, 1.5, 0.55)
    )


@pytest.mark.parametrize(
    ("argument", "value"),
    [("hr_scale", 2.0), ("hr_upscaler", "Latent"), ("hr_second_pass_steps", 0), ("denoising_strength", 0.7)],
)
@pytest.mark.parametrize("enable_hr", [None, False])
def test_hires_options_without_enable_hr_are_refused(
    argument: str, value: Any, enable_hr: bool | None
) -> None:
    with pytest.raises(GenerationError) as error:
        build_inputs("a", enable_hr=enable_hr, **{argument: value})
    assert (
        error.value.is_invalid_argument and error.value.message == f"{argument} needs enable_hr (hires fix)"
    )


def test_bad_variation_and_hires_arguments_are_refused() -> None:
    with pytest.raises(GenerationError) as error:
        build_inputs("a", image=b"\x89PNG", enable_hr=True)
    assert error.value.is_invalid_argument
    assert error.value.message == "enable_hr is for text to image; send no image with it"
    with pytest.raises(GenerationError) as error:
        build_inputs("a", subseed=5)  # the server would ignore it: subseed_strength defaults to 0
    assert error.value.is_invalid_argument
    assert error.value.message == "subseed needs subseed_strength (variation seeds)"
    with pytest.raises(GenerationError, match="subseed must be within"):
        build_inputs("a", subseed=2**63, subseed_strength=0.5)
    with pytest.raises(TypeError, match="enable_hr must be a bool"):
        build_inputs("a", enable_hr="false")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        build_inputs("a", enable_hr=True, hr_second_pass_steps=2.5)  # type: ignore[arg-type]
    assert dict(build_inputs("a", enable_hr=False))["enable_hr"][0] == np.False_  # sent, refused nothing


def _fp32(value: float) -> float:
    return float(np.float32(value))  # as the server echoes an FP32 input


# The info of a hires fix request with variation seeds: 16x8 first pass, 32x16 images.
HIRES_INFO = {
    **INFO,
    "width": 32,
    "height": 16,
    "subseeds": [900, 901],
    "subseed_strength": _fp32(0.3),
    "hr_scale": 2.0,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 10,
    "denoising_strength": _fp32(0.7),
    "first_pass_width": 16,
    "first_pass_height": 8,
}


def _hires_result(**info: Any) -> GenerationResult:
    return decode_response(_images(height=16, width=32), json.dumps({**HIRES_INFO, **info}).encode())


def test_infotexts_of_variation_seeds_and_hires_fix() -> None:
    texts = _hires_result().infotexts()
    params_line = (
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: {}, Size: 16x8, Model: stable-diffusion-v1-4, "
        "Variation seed: {}, Variation seed strength: 0.3, Denoising strength: 0.7, Hires upscale: 2, "
        "Hires steps: 10, Hires upscaler: Latent"
    )
    assert [text.splitlines()[-1] for text in texts] == [
        params_line.format(123, 900),
        params_line.format(124, 901),
    ]


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"hr_second_pass_steps": 0}, {"Hires steps": None}),  # as A1111: 0 means Steps, left out
        (
            {"hr_scale": _fp32(1.3), "hr_upscaler": "Lanczos"},
            {"Hires upscale": "1.3", "Hires upscaler": "Lanczos"},
        ),
        ({"hr_scale": 2.5}, {"Hires upscale": "2.5"}),
    ],
)
def test_infotext_hires_values(info: dict[str, Any], expected: dict[str, str | None]) -> None:
    params = parse_infotext(_hires_result(**info).infotexts()[0])[2]
    assert {key: params.get(key) for key in expected} == expected


def test_infotext_without_variation_or_hires_has_neither() -> None:
    params = parse_infotext(_result().infotexts()[0])[2]
    assert not [key for key in params if key.startswith(("Variation", "Hires", "Denoising"))]
    assert params["Size"] == "16x8"


def test_variation_and_hires_infotext_round_trip(tmp_path: Path) -> None:
    """The PNG of a hires fix request with variation seeds, read back by `--infotext`, asks for the same
    request (at the first-pass size)."""
    [png, _] = _hires_result(hr_scale=1.5, hr_upscaler="Lanczos").save(tmp_path / "out")
    recorded = _request("generate", "--infotext", str(png))
    assert recorded == {
        "prompt": "a castle, at dusk",
        "negative_prompt": "blurry",
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 123,
        "scheduler": "Euler a",
        "width": 16,
        "height": 8,
        "num_images": None,
        "subseed": 900,
        "subseed_strength": 0.3,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Lanczos",
        "hr_second_pass_steps": 10,
        "denoising_strength": 0.7,
        "clip_skip": None,
    }
    assert build_inputs(**recorded)  # every argument is one build_inputs takes, none refused
    overridden = _request(
        "generate",
        "--infotext",
        str(png),
        "--hr-scale",
        "2",
        "--subseed-strength",
        "0",
        "--denoising-strength",
        "0.4",
    )
    assert (overridden["hr_scale"], overridden["subseed_strength"], overridden["denoising_strength"]) == (
        2.0,
        0.0,
        0.4,
    )
    # --no-enable-hr drops the recorded hires fix; the hires fix is generate's and grid's (text to image).
    no_hires = _request("generate", "--infotext", str(png), "--no-enable-hr")
    assert no_hires["enable_hr"] is False and all(no_hires[name] is None for name in HIRES_OPTIONS)
    assert build_inputs(**no_hires)
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    for command in (["img2img", "--image", str(image)], ["grid", "--x", "seed=1", "--image", str(image)]):
        other = _request(*command, "--infotext", str(png))
        assert (other["subseed"], other["subseed_strength"], other["strength"]) == (900, 0.3, None)
        assert not any(other.get(name) for name in ("enable_hr", *HIRES_OPTIONS))
    assert _request("grid", "--x", "seed=1", "--infotext", str(png))["hr_scale"] == 1.5


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["generate", "x", "--hr-scale", "2"], "hr_scale needs enable_hr (hires fix)"),
        (
            ["generate", "x", "--no-enable-hr", "--denoising-strength", "0.5"],
            "denoising_strength needs enable_hr",
        ),
        (["generate", "x", "--subseed", "5"], "subseed needs subseed_strength"),
        (["generate", "x", "--subseed", str(2**63), "--subseed-strength", "1"], "subseed must be within"),
        (["grid", "x", "--x", "hr_scale=1.5,2"], "hr_scale needs enable_hr"),
        (
            ["grid", "x", "--x", "denoising_strength=0.5", "--image", "{image}"],
            "denoising_strength needs enable_hr",
        ),
        (
            ["grid", "x", "--x", "seed=1", "--enable-hr", "--image", "{image}"],
            "enable_hr is for text to image",
        ),
        (["generate", "--infotext", "{resized}"], "Hires resize: 1000x600 is not Size 512x512 scaled"),
    ],
)
def test_unusable_variation_and_hires_command_lines_exit_2(
    argv: list[str], complaint: str, tmp_path: Path, free_port: int, capsys
) -> None:
    files = {"image": tmp_path / "in.png", "resized": tmp_path / "resized.png"}
    Image.new("RGB", (8, 8)).save(files["image"])
    text = "p\nSteps: 2, Seed: 1, Size: 512x512, Hires resize: 1000x600, Hires upscaler: Latent"
    save_png(Image.new("RGB", (8, 8)), files["resized"], text)
    argv = [arg.format(**files) for arg in argv]
    assert main([*argv, "--url", f"127.0.0.1:{free_port}"]) == 2  # nothing listens: never got that far
    err = capsys.readouterr().err
    assert err.startswith("sd-client: error: ") and complaint in err


def test_generate_with_variation_and_hires_gets_as_far_as_the_server(free_port: int, capsys) -> None:
    argv = ["generate", "x", "--subseed", "5", "--subseed-strength", "0.5", "--enable-hr", "--hr-scale", "2"]
    assert main([*argv, "--url", f"127.0.0.1:{free_port}"]) == 1
    assert "cannot reach the Triton server" in capsys.readouterr().err


def test_sweep_reuses_the_first_variation_seed_reported() -> None:
    calls: list[dict[str, Any]] = []

    def generate(**kwargs: Any) -> GenerationResult:
        # As the server: a random variation seed (a new one each call), reported where the strength is > 0.
        calls.append(kwargs)
        info = {**INFO, "seeds": [kwargs["seed"]]}
        if kwargs.get("subseed_strength"):
            random = 500 + len(calls)
            info.update(subseeds=[random if kwargs.get("subseed") in (None, -1) else kwargs["subseed"]])
        return decode_response(_images(n=1), json.dumps(info).encode())

    axis = parse_axis("subseed_strength=0,0.3,0.6")
    sweep(generate, {"prompt": "p", "seed": 1, "subseed": None}, axis)
    assert [(c["subseed"], c["subseed_strength"]) for c in calls] == [(None, 0.0), (None, 0.3), (502, 0.6)]
    calls.clear()
    sweep(generate, {"prompt": "p", "seed": 1, "subseed": 7}, axis)
    assert [c["subseed"] for c in calls] == [7, 7, 7]


def test_controlnet_units_from_the_command_line_over_the_infotexts(tmp_path: Path) -> None:
    from client import ControlNetUnit
    from client.cli import UsageError

    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 64)).save(control)
    recorded = {
        "module": "canny",
        "model": "edges",
        "weight": 0.5,
        "resize_mode": "Resize and Fill",
        "processor_res": 256,
        "threshold_a": 50.0,
        "threshold_b": 150.0,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "pixel_perfect": True,
        "control_mode": "Balanced",
    }
    info = {"prompt": "a house", "seeds": [7], "steps": 4, "controlnets": [recorded]}
    png = tmp_path / "recorded.png"
    result = GenerationResult([Image.new("RGB", (64, 64))], info)
    save_png(result.images[0], png, result.infotexts()[0])
    assert (
        'ControlNet 0: "Module: canny, Model: edges, Weight: 0.5, Resize Mode: Resize and Fill'
        in read_infotext(png)
    )

    request = _request("generate", "--infotext", str(png), "--controlnet", f"canny:{control}:0.8:0.1:0.9:2")
    [unit] = request["controlnets"]
    assert unit == ControlNetUnit(
        "canny",
        control.read_bytes(),
        weight=0.8,
        guidance_start=0.1,
        guidance_end=0.9,
        control_mode="ControlNet is more important",
        module="canny",
        resize_mode="Resize and Fill",
        processor_res=256,
        threshold_a=50.0,
        threshold_b=150.0,
        pixel_perfect=True,
    )  # the command line's model, weight, window and mode; the rest as recorded
    inputs = dict(build_request_inputs(GenerateOptions("a house", controlnets=(unit,))))
    assert inputs["controlnet_0_control_mode"][0] == b"ControlNet is more important"
    assert request_from_inputs(inputs).controlnets[0].weight == pytest.approx(0.8)
    for bad in ("canny", f"canny:{control}:x", f"canny:{control}:1:0", f"canny:{tmp_path / 'missing.png'}"):
        with pytest.raises(UsageError, match="--controlnet"):
            _request("generate", "a house", "--controlnet", bad)
