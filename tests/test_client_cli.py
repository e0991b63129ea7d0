from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from PIL import Image
from tritonclient.utils import InferenceServerException

from client import GenerationError, GenerationResult, StableDiffusionClient, parse_infotext, read_infotext
from client.api import (
    build_inputs,
    decode_response,
    error_from_exception,
    next_sequence_number,
    triton_inputs,
)
from client.cli import build_parser, format_scheduler_table, main, save_and_report

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
    assert (args.steps, args.guidance, args.seed, args.scheduler) == (30, 6.5, -1, "DPM++ 2M Karras")
    assert (args.width, args.height, args.num_images) == (640, 384, 3)
    assert (args.url, args.protocol, args.out, args.timeout) == ("example:9001", "http", Path("imgs"), 90.0)


def test_parse_generate_defaults_leave_choices_to_the_server() -> None:
    args = build_parser().parse_args(["generate", "a cat"])
    server_decides = (
        "negative_prompt",
        "steps",
        "guidance",
        "seed",
        "scheduler",
        "width",
        "height",
        "num_images",
    )
    assert all(getattr(args, name) is None for name in server_decides)
    assert (args.url, args.protocol, args.out, args.timeout) == (None, "grpc", Path("outputs"), None)


def test_parse_schedulers() -> None:
    args = build_parser().parse_args(["schedulers", "--protocol", "http", "--url", "h:1"])
    assert (args.command, args.protocol, args.url) == ("schedulers", "http", "h:1")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["generate", "x", "--steps", "many"],
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
    [(name, array)] = build_inputs("a cat")
    assert name == "prompt"
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


def test_build_inputs_sends_explicit_empty_negative_and_random_seed() -> None:
    inputs = dict(build_inputs("a", negative_prompt="", seed=-1))
    assert inputs["negative_prompt"][0] == b"" and inputs["seed"][0] == -1


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
