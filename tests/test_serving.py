"""End to end through a real tritonserver: the pipeline model over BLS, real gRPC and HTTP clients.

Images served must equal what diffusers' StableDiffusionPipeline makes from the same tiny checkpoint,
seed and scheduler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from client import GenerationError, StableDiffusionClient, parse_infotext, read_infotext
from tests.conftest import CPU_TARGETS, cpu_repository
from tests.parity import TOLERANCE, diffusers_images, max_pixel_diff, png_bytes, smooth_picture
from tests.triton_server import TritonServer

pytestmark = pytest.mark.integration

PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
STEPS = 5


@pytest.fixture(scope="module", params=CPU_TARGETS)
def server(request: pytest.FixtureRequest):
    """The tiny checkpoint served from its onnx target's repository, and from its openvino target's: every
    test here runs against both."""
    repo = cpu_repository(request)
    with TritonServer(repo) as running:
        yield running


def client_for(server: TritonServer, protocol: str) -> StableDiffusionClient:
    return StableDiffusionClient(
        server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol
    )


@cache
def reference(checkpoint: Path, scheduler: str, width: int, height: int, guidance: float, num_images: int):
    return diffusers_images(
        checkpoint,
        PROMPT,
        negative_prompt=NEGATIVE,
        width=width,
        height=height,
        steps=STEPS,
        guidance_scale=guidance,
        seed=2024,
        scheduler=scheduler,
        num_images=num_images,
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    ("scheduler", "diffusers_class"),
    [("pndm", "PNDMScheduler"), ("ddim", "DDIMScheduler"), ("Euler a", "EulerAncestralDiscreteScheduler")],
)
@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64)])
def test_served_images_match_diffusers(
    server, tiny_checkpoint, protocol, scheduler, diffusers_class, width, height
):
    result = client_for(server, protocol).generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        seed=2024,
        scheduler=scheduler,
        width=width,
        height=height,
    )
    served = np.stack([np.asarray(image) for image in result.images])
    expected = reference(tiny_checkpoint, diffusers_class, width, height, 7.5, 1)
    assert max_pixel_diff(served, expected) <= TOLERANCE


@pytest.mark.parametrize(("guidance", "num_images"), [(1.0, 1), (7.5, 2)])
def test_guidance_one_and_several_images_match_diffusers(server, tiny_checkpoint, guidance, num_images):
    result = client_for(server, "grpc").generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        seed=2024,
        guidance_scale=guidance,
        num_images=num_images,
        width=64,
        height=64,
    )
    served = np.stack([np.asarray(image) for image in result.images])
    expected = reference(tiny_checkpoint, "PNDMScheduler", 64, 64, guidance, num_images)
    assert max_pixel_diff(served, expected) <= TOLERANCE
    assert result.info["seeds"] == [2024 + i for i in range(num_images)]


def test_same_request_twice_gives_the_same_images(server):
    client = client_for(server, "grpc")
    first, second = (client.generate(PROMPT, steps=3, seed=11, width=64, height=64) for _ in range(2))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


def test_random_seeds_differ_and_are_reported(server):
    client = client_for(server, "grpc")
    first, second = (client.generate(PROMPT, steps=3, seed=-1, width=64, height=64) for _ in range(2))
    assert first.info["seeds"] != second.info["seeds"]
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    replay = client.generate(PROMPT, steps=3, seed=first.info["seeds"][0], width=64, height=64)
    assert np.array_equal(np.asarray(replay.images[0]), np.asarray(first.images[0]))


def test_png_parameters_round_trip(server, tmp_path):
    result = client_for(server, "http").generate(
        "a cat, sitting: on a mat",
        negative_prompt=NEGATIVE,
        steps=3,
        seed=5,
        scheduler="Euler a",
        width=96,
        height=64,
    )
    [path] = result.save(tmp_path)
    prompt, negative, params = parse_infotext(read_infotext(path))
    assert (prompt, negative) == ("a cat, sitting: on a mat", NEGATIVE)
    assert params["Steps"] == "3" and params["Sampler"] == "Euler a" and params["CFG scale"] == "7.5"
    assert params["Seed"] == "5" and params["Size"] == "96x64"


BAD_VALUES = [
    ("width", {"width": 100}),
    ("height", {"height": 56}),
    ("height", {"height": 264}),
    ("num_inference_steps", {"steps": 0}),
    ("num_inference_steps", {"steps": 1001}),
    ("num_images", {"num_images": 0}),
    ("num_images", {"num_images": 5}),
    ("guidance_scale", {"guidance_scale": float("nan")}),
    ("guidance_scale", {"guidance_scale": float("inf")}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("seed", {"seed": -7}),
    ("scheduler", {"scheduler": "warp drive"}),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(("field", "change"), BAD_VALUES)
def test_bad_values_are_invalid_arg_naming_the_field(server, protocol, field, change):
    arguments = {"width": 64, "height": 64, "steps": 2, **change}
    with pytest.raises(GenerationError) as raised:
        client_for(server, protocol).generate(PROMPT, **arguments)
    assert raised.value.is_invalid_argument, raised.value.status
    assert field in raised.value.message
    assert client_for(server, protocol).is_ready()


def _raw_infer(server: TritonServer, inputs: list[tuple[str, np.ndarray, str]]):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = []
    for name, array, dtype in inputs:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer("pipeline", tensors)


PROMPT_TENSOR = ("prompt", np.array([PROMPT.encode()], np.object_), "BYTES")


@pytest.mark.parametrize(
    ("field", "inputs"),
    [
        ("width", [PROMPT_TENSOR, ("width", np.array([64.0], np.float32), "FP32")]),  # wrong dtype
        ("width", [PROMPT_TENSOR, ("width", np.array([64, 64], np.int32), "INT32")]),  # wrong shape
        ("seed", [PROMPT_TENSOR, ("seed", np.array([1], np.int32), "INT32")]),
        ("prompt", [("prompt", np.array([b"\xff\xfe"], np.object_), "BYTES")]),  # not UTF-8
        ("prompt", [("width", np.array([64], np.int32), "INT32")]),  # missing
    ],
)
def test_malformed_tensors_are_invalid_arg_naming_the_field(server, field, inputs):
    with pytest.raises(InferenceServerException) as raised:
        _raw_infer(server, inputs)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert field in raised.value.message()
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


def test_info_output(server):
    client = httpclient.InferenceServerClient(server.http_url)
    prompt = httpclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([PROMPT.encode()], np.object_))
    steps = httpclient.InferInput("num_inference_steps", [1], "INT32")
    steps.set_data_from_numpy(np.array([2], np.int32))
    size = [httpclient.InferInput(n, [1], "INT32") for n in ("width", "height")]
    for tensor in size:
        tensor.set_data_from_numpy(np.array([64], np.int32))
    response = client.infer("pipeline", [prompt, steps, *size])
    info = json.loads(response.as_numpy("info")[0])
    assert response.as_numpy("images").shape == (1, 64, 64, 3)
    assert info["scheduler"] == "pndm" and info["steps"] == 2 and info["guidance_scale"] == 7.5
    assert len(info["seeds"]) == 1 and info["warnings"] == []
    assert info["timings_ms"]["total"] >= info["timings_ms"]["denoise"] > 0


def test_sd_client_cli(server, tmp_path):
    def sd_client(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "client.cli", *args, "--url", server.grpc_url]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    generated = sd_client(
        "generate",
        PROMPT,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--num-images",
        "2",
        "--seed",
        "9",
        "--out",
        str(tmp_path),
    )
    assert generated.returncode == 0, generated.stderr
    paths = [Path(line) for line in generated.stdout.split()]
    assert len(paths) == 2 and all(p.exists() for p in paths)
    assert "Seed: 10" in read_infotext(paths[1])

    rejected = sd_client("generate", PROMPT, "--width", "100")
    assert rejected.returncode == 2 and "width" in rejected.stderr

    streamed = sd_client(
        "generate",
        PROMPT,
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "64",
        "--scheduler",
        "euler",
        "--progress",
        "--preview-dir",
        str(tmp_path / "previews"),
        "--preview-every",
        "2",
        "--out",
        str(tmp_path),
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "4/4" in streamed.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step-0002.png", "step-0004.png"]

    listing = sd_client("schedulers")
    assert listing.returncode == 0 and "euler_a" in listing.stdout and "DPM++ 2M Karras" in listing.stdout


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_img2img_matches_diffusers(server, tiny_checkpoint, protocol):
    picture = smooth_picture(96, 64)
    result = client_for(server, protocol).generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=8,
        seed=31,
        width=96,
        height=64,
        image=png_bytes(picture),
        strength=0.6,
        scheduler="Euler a",
    )
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=8,
        guidance_scale=7.5,
        seed=31,
        scheduler="EulerAncestralDiscreteScheduler",
        pipeline_class="StableDiffusionImg2ImgPipeline",
        image=picture,
        strength=0.6,
    )
    served = np.stack([np.asarray(image) for image in result.images])
    assert max_pixel_diff(served, expected) <= TOLERANCE


def test_served_inpainting_matches_diffusers(server, tiny_checkpoint):
    from PIL import Image, ImageDraw

    picture = smooth_picture(96, 64)
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 16, 72, 48), fill=255)
    result = client_for(server, "grpc").generate(
        PROMPT,
        steps=8,
        seed=32,
        width=96,
        height=64,
        image=png_bytes(picture),
        mask=png_bytes(mask),
        mask_blur=0,
        strength=0.8,
    )
    expected = diffusers_images(
        tiny_checkpoint,
        PROMPT,
        steps=8,
        guidance_scale=7.5,
        seed=32,
        scheduler="PNDMScheduler",
        pipeline_class="StableDiffusionInpaintPipeline",
        image=picture,
        mask_image=mask,
        strength=0.8,
        width=96,
        height=64,
    )
    served = np.stack([np.asarray(image) for image in result.images])
    assert max_pixel_diff(served, expected) <= TOLERANCE


def test_served_hires_fix_and_variation_seeds(server):
    result = client_for(server, "grpc").generate(
        PROMPT,
        steps=3,
        seed=7,
        width=64,
        height=64,
        enable_hr=True,
        hr_scale=2.0,
        subseed=9,
        subseed_strength=0.4,
    )
    assert result.images[0].size == (128, 128)
    assert result.info["subseeds"] == [9] and result.info["hr_upscaler"] == "Latent"


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("image", {"image": b"not an image"}),
        ("strength", {"image": "PICTURE", "strength": 1.5}),
        ("mask_blur", {"image": "PICTURE", "mask": "PICTURE", "mask_blur": 100}),
        ("hr_scale", {"enable_hr": True, "hr_scale": 9.0}),
    ],
)
def test_bad_image_and_hires_values_are_invalid_arg(server, field, arguments):
    picture = png_bytes(smooth_picture(64, 64))
    arguments = {k: picture if v == "PICTURE" else v for k, v in arguments.items()}
    with pytest.raises(GenerationError) as raised:
        client_for(server, "grpc").generate(PROMPT, steps=2, width=64, height=64, **arguments)
    assert raised.value.is_invalid_argument and field in raised.value.message
    assert client_for(server, "grpc").is_ready()


def test_streaming_sends_progress_and_previews_then_the_same_images(server):
    client = client_for(server, "grpc")
    seen: list[tuple[dict, bytes | None]] = []
    streamed = client.generate(
        PROMPT,
        steps=6,
        seed=41,
        width=64,
        height=64,
        scheduler="euler",
        on_progress=lambda status, preview: seen.append((status, preview)),
        preview_every=2,
    )
    assert [status["step"] for status, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert {status["total"] for status, _ in seen} == {6}
    previews = [preview for _, preview in seen if preview is not None]
    assert len(previews) == 3
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(previews[0])).size == (8, 8)  # the latents' size
    plain = client.generate(PROMPT, steps=6, seed=41, width=64, height=64, scheduler="euler")
    assert np.array_equal(np.asarray(streamed.images[0]), np.asarray(plain.images[0]))


def test_streaming_errors_keep_their_status(server):
    # Triton's stream messages carry no error code; the client asks for it as the stream's gRPC status.
    with pytest.raises(GenerationError) as raised:
        client_for(server, "grpc").generate(PROMPT, steps=2, width=63, on_progress=lambda *_: None)
    assert raised.value.is_invalid_argument and raised.value.message.startswith("width: ")


def _unet_calls(server: TritonServer) -> int:
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("unet")
    return int(stats.model_stats[0].inference_stats.success.count)


def test_cancelling_the_stream_stops_the_denoising_loop(server):
    import time

    class Stop(Exception):
        pass

    def stop_after_three(status: dict, preview: bytes | None) -> None:
        if status["step"] == 3:
            raise Stop

    before = _unet_calls(server)
    with pytest.raises(Stop):
        client_for(server, "grpc").generate(
            PROMPT, steps=400, seed=1, width=64, height=64, on_progress=stop_after_three
        )
    time.sleep(2)  # let the server notice and wind down
    calls = _unet_calls(server) - before
    assert 3 <= calls < 60, calls  # 400 steps were asked for; it stopped within a few
    # ... and the instance is free for the next request.
    after = client_for(server, "grpc").generate(PROMPT, steps=2, seed=1, width=64, height=64)
    assert after.images[0].size == (64, 64)


def test_pipeline_metrics_are_scraped_from_tritons_endpoint(server):
    import time
    import urllib.request

    client = client_for(server, "grpc")
    client.generate(PROMPT, steps=3, seed=1, width=64, height=64, num_images=2)
    with pytest.raises(GenerationError):
        client.generate(PROMPT, width=100)

    def stop(status: dict, preview: bytes | None) -> None:
        raise KeyboardInterrupt  # as Ctrl-C in sd-client --progress

    with pytest.raises(KeyboardInterrupt):
        client.generate(PROMPT, steps=200, width=64, height=64, on_progress=stop)
    time.sleep(1)  # the server notices at its next step
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()

    def value(line_start: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])

    assert value('sd_images_generated_total{model="pipeline"}') >= 2
    assert value('sd_requests_failed_total{model="pipeline",reason="invalid_input"}') >= 1
    assert value('sd_stage_duration_seconds_count{model="pipeline",stage="denoise"}') >= 1
    assert value('sd_denoising_steps_per_second{model="pipeline"}') > 0
    assert value('sd_requests_cancelled_total{model="pipeline_stream"}') >= 1
