"""sd-gateway (A1111's /sdapi/v1) against a real tritonserver, driven over real HTTP (uvicorn on a free port):
by the real `webuiapi` client, and by the exact bodies Open WebUI, SillyTavern, Dify and LibreChat send
(from their sources), read back the way their code reads them."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import uvicorn
import webuiapi
from PIL import Image, ImageDraw

from build_engines import cli as build_cli
from client import StableDiffusionClient
from services.gateway.app import GatewayConfig, create_app
from services.serve import free_ports
from tests.conftest import PROFILE_ARGS
from tests.triton_server import PROJECT_ROOT, TritonServer

pytestmark = pytest.mark.integration

SIZE = 64  # within the tiny repository's profile (64..256)
AUTH = ("alice", "s3cret:pass")  # a colon in the password: only the first one splits


@pytest.fixture(scope="module")
def triton(
    model_repository: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("gateway") / "repo"
    shutil.copytree(model_repository, repo)  # the exports are reused: only the configs are rewritten
    # A UNet batch window, so that the concurrent requests' calls meet however busy the machine is (the
    # requests' per-step Python work can outlast a tiny UNet run, and their calls settle into a convoy).
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS]
    assert build_cli.main([*args, "--unet-batch-delay", "20"]) == 0
    with TritonServer(repo) as server:
        yield server


@contextmanager
def running_gateway(config: GatewayConfig) -> Iterator[str]:
    """The gateway app under uvicorn on a free port, in a thread; yields its base URL."""
    [port] = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(triton: TritonServer) -> Iterator[str]:
    with running_gateway(GatewayConfig(triton_url=triton.grpc_url)) as url:
        yield url


@pytest.fixture
def api(gateway: str) -> webuiapi.WebUIApi:
    host, port = gateway.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _picture() -> Image.Image:
    picture = Image.new("RGB", (SIZE, SIZE), (40, 90, 200))
    ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill=(240, 200, 30))
    return picture


def _mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_webuiapi_txt2img_matches_the_client_and_carries_infotext(
    api: webuiapi.WebUIApi, triton: TritonServer
):
    result = api.txt2img(
        prompt="a lighthouse",
        negative_prompt="fog",
        seed=123,
        width=SIZE,
        height=SIZE,
        batch_size=2,
        cfg_scale=6,
    )
    assert len(result.images) == 2 and result.images[0].size == (SIZE, SIZE)
    info = result.info  # webuiapi json.loads the `info` string
    assert info["all_seeds"] == [123, 124] and info["seed"] == 123
    assert (info["width"], info["height"], info["steps"], info["batch_size"]) == (SIZE, SIZE, 3, 2)
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 6
    assert info["sd_model_name"] == "tiny-sd" and len(info["sd_model_hash"]) == 10
    assert info["index_of_first_image"] == 0 and len(info["infotexts"]) == 2
    assert "Seed: 124" in info["infotexts"][1] and "Negative prompt: fog" in info["infotexts"][0]
    assert result.images[0].info["parameters"] == info["infotexts"][0]  # the PNG chunk A1111 writes
    assert result.parameters["prompt"] == "a lighthouse"  # the request, echoed

    # Parity: the project's own client, same settings, same pixels.
    with StableDiffusionClient(triton.grpc_url) as client:
        own = client.generate(
            "a lighthouse",
            negative_prompt="fog",
            seed=123,
            steps=3,
            guidance_scale=6,
            scheduler="Euler a",
            width=SIZE,
            height=SIZE,
            num_images=2,
        )
    assert all(_same(a, b) for a, b in zip(result.images, own.images, strict=True))


def test_n_iter_continues_the_seeds_and_hires_fix_runs(api: webuiapi.WebUIApi):
    result = api.txt2img(prompt="a cat", seed=7, width=SIZE, height=SIZE, batch_size=1, n_iter=2)
    assert result.info["all_seeds"] == [7, 8] and len(result.images) == 2
    hires = api.txt2img(
        prompt="a cat",
        seed=7,
        width=SIZE,
        height=SIZE,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
        denoising_strength=0.6,
    )
    assert hires.image.size == (2 * SIZE, 2 * SIZE)
    assert (hires.info["width"], hires.info["denoising_strength"]) == (SIZE, pytest.approx(0.6))
    assert "Hires upscale: 2" in hires.info["infotexts"][0]


def test_webuiapi_img2img_and_inpainting_match_the_client(api: webuiapi.WebUIApi, triton: TritonServer):
    picture, mask = _picture(), _mask()
    # webuiapi sends both images as data: URLs
    result = api.img2img(
        images=[picture], prompt="a sun", seed=5, width=SIZE, height=SIZE, denoising_strength=0.5
    )
    assert result.image.size == (SIZE, SIZE) and result.info["denoising_strength"] == pytest.approx(0.5)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    inpaint: dict[str, Any] = {
        "images": [picture],
        "mask_image": mask,
        "prompt": "a sun",
        "seed": 5,
        "width": SIZE,
        "height": SIZE,
        "denoising_strength": 0.9,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "mask_blur": 2,
    }
    inpainted = api.img2img(**inpaint)
    assert "Mask blur: 2" in inpainted.info["infotexts"][0]
    inverted = api.img2img(**inpaint, inpainting_mask_invert=1)
    with StableDiffusionClient(triton.grpc_url) as client:
        common: dict[str, Any] = dict(
            seed=5, steps=3, guidance_scale=7.0, scheduler="Euler a", width=SIZE, height=SIZE
        )
        own = client.generate("a sun", image=picture, strength=0.5, resize_mode="just_resize", **common)
        inpaint = dict(
            strength=0.9, mask_blur=2, inpainting_fill="original", inpaint_full_res=False, **common
        )
        own_inpainted = client.generate("a sun", image=picture, mask=mask, **inpaint)
        own_inverted = client.generate(
            "a sun", image=picture, mask=Image.eval(mask, lambda v: 255 - v), **inpaint
        )
    assert _same(result.image, own.images[0])
    assert _same(inpainted.image, own_inpainted.images[0])
    assert _same(inverted.image, own_inverted.images[0])
    assert not _same(inpainted.image, inverted.image)


def test_options_models_and_lists(api: webuiapi.WebUIApi, gateway: str):
    options = api.get_options()
    [model] = api.get_sd_models()
    assert options["sd_model_checkpoint"] == model["title"] == f"tiny-sd [{model['hash']}]"
    assert options["samples_format"] == "png" and options["CLIP_stop_at_last_layers"] == 1
    assert api.util_get_current_model() == model["title"]
    assert api.set_options({"sd_model_checkpoint": model["model_name"]}) is None  # by name, as Dify
    bad = requests.post(f"{gateway}/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
    assert bad.status_code == 422 and "sd_model_checkpoint" in bad.json()["detail"]
    # The default clip skip follows the option, as A1111's.
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        info = api.txt2img(prompt="a cat", seed=1, width=SIZE, height=SIZE).info
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    samplers = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(samplers) and "DPM++ 2M Karras" not in samplers
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    assert [u["name"] for u in api.get_upscalers()] == ["Lanczos"]
    assert api.get_latent_upscale_modes()[0]["name"] == "Latent"
    for route, empty in [
        ("sd-vae", []),
        ("loras", []),
        ("hypernetworks", []),
        ("face-restorers", []),
        ("prompt-styles", []),
        ("embeddings", {"loaded": {}, "skipped": {}}),
    ]:
        answer = requests.get(f"{gateway}/sdapi/v1/{route}")
        assert answer.status_code == 200 and answer.json() == empty, route
    assert requests.get(f"{gateway}/sdapi/v1/cmd-flags").json()["api"] is True
    assert requests.post(f"{gateway}/sdapi/v1/refresh-checkpoints").status_code == 200


def test_png_info_round_trip(api: webuiapi.WebUIApi):
    result = api.txt2img(
        prompt="a red barn, at dusk", negative_prompt="blur", seed=42, width=SIZE, height=SIZE
    )
    read = api.png_info(result.image)  # sent as a data: URL
    assert read.info == result.info["infotexts"][0]
    params = read.parameters
    assert (params["Prompt"], params["Negative prompt"], params["Seed"]) == (
        "a red barn, at dusk",
        "blur",
        "42",
    )
    assert (params["Size-1"], params["Size-2"], params["Sampler"]) == (str(SIZE), str(SIZE), "Euler a")


def test_open_webui_flow(gateway: str):
    # backend/open_webui/routers/images.py: options before every generation, the whole dict posted back on a
    # model change, `authorization: ""` when no auth is configured; reads images[] and stores `info`.
    headers = {"authorization": ""}
    options = requests.get(f"{gateway}/sdapi/v1/options", headers=headers).json()
    models = requests.get(f"{gateway}/sdapi/v1/sd-models", headers=headers).json()
    assert [{"id": m["title"], "name": m["model_name"]} for m in models][0]["id"] == options[
        "sd_model_checkpoint"
    ]
    posted = requests.post(f"{gateway}/sdapi/v1/options", json={**options}, headers=headers)
    assert posted.status_code == 200 and posted.json() is None
    body = {
        "prompt": "a fox",
        "batch_size": 1,
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "negative_prompt": "x",
    }
    answer = requests.post(f"{gateway}/sdapi/v1/txt2img", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert isinstance(data["info"], str) and not data["images"][0].startswith("data:")
    assert _png(data["images"][0]).size == (SIZE, SIZE)


def test_sillytavern_body(gateway: str):
    # src/endpoints/stable-diffusion.js forwards the extension's body unchanged (its own url/auth keys too).
    body = {
        "url": gateway,
        "auth": "",
        "prompt": "a knight",
        "negative_prompt": "lowres",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "steps": 2,
        "cfg_scale": 7,
        "width": SIZE,
        "height": SIZE,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
        "alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}},
    }
    headers = {"Authorization": "Basic " + base64.b64encode(b"").decode()}  # ST's "Basic " with no auth set
    answer = requests.post(f"{gateway}/sdapi/v1/txt2img", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert _png(data["images"][0]).size == (SIZE, SIZE)  # ST reads images[0] as PNG
    info = json.loads(data["info"])
    assert info["sampler_name"] == "DDIM"
    assert any("ADetailer" in w for w in info["warnings"]) and any("'normal'" in w for w in info["warnings"])


def test_dify_flow_without_content_type(gateway: str):
    # stable_diffusion.py: POST options {sd_model_checkpoint: model_name}, then txt2img with
    # httpx.post(data=json.dumps(...)): no Content-Type; sampler_index "DPM++ SDE Karras", no sampler_name.
    [model] = requests.get(f"{gateway}/sdapi/v1/sd-models").json()
    set_model = requests.post(
        f"{gateway}/sdapi/v1/options", data=json.dumps({"sd_model_checkpoint": "tiny-sd"})
    )
    assert set_model.status_code == 200
    body = {
        "prompt": "lora,a bird",
        "negative_prompt": "",
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "sampler_index": "DPM++ 2M Karras",
        "batch_size": 1,
        "n_iter": 1,
        "steps": 3,
        "cfg_scale": 7,
        "width": SIZE,
        "height": SIZE,
        "restore_faces": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "eta": 0,
        "denoising_strength": 0,
        "s_min_uncond": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 0,
        "override_settings": {"sd_model_checkpoint": model["model_name"]},
        "override_settings_restore_afterwards": True,
        "refiner_switch_at": 0,
        "disable_extra_networks": False,
        "comments": {},
        "enable_hr": False,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "hr_scale": 2,
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "hr_prompt": "",
        "hr_negative_prompt": "",
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    raw = json.dumps(body).encode()
    answer = requests.post(f"{gateway}/sdapi/v1/txt2img", data=raw, headers={"Content-Type": ""})
    assert answer.status_code == 200, answer.text
    assert _png(answer.json()["images"][0]).size == (SIZE, SIZE)  # Dify: b64decode(images[0])
    info = json.loads(answer.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]
    # Its img2img: init_images raw base64, an outpainting script arg with no script_name (ignored).
    buffer = io.BytesIO()
    _picture().save(buffer, format="PNG")
    img2img = {
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "prompt": "a bird",
        "negative_prompt": "",
        "denoising_strength": 0.9,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": 7,
        "sampler_name": "Euler a",
        "restore_faces": False,
        "steps": 3,
        "script_args": ["outpainting mk2"],
        "override_settings": {"sd_model_checkpoint": model["model_name"]},
    }
    answer = requests.post(f"{gateway}/sdapi/v1/img2img", data=json.dumps(img2img))
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"]["init_images"] is None  # A1111 echoes no init images by default


def test_librechat_reads_info(gateway: str):
    body = {
        "prompt": "a tree",
        "negative_prompt": "",
        "cfg_scale": 4.5,
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
    }
    data = requests.post(f"{gateway}/sdapi/v1/txt2img", json=body).json()
    image_b64 = data["images"][0].split(",", 1)[0]  # LibreChat's own split: must be the whole image
    assert _png(image_b64).size == (SIZE, SIZE)
    info = json.loads(data["info"])
    assert isinstance(info["seed"], int) and (info["width"], info["height"]) == (SIZE, SIZE)
    assert info["infotexts"][0].split("\n")[-1].startswith("Steps: 2, Sampler:")


def test_lenient_bodies_and_field_errors(gateway: str):
    url = f"{gateway}/sdapi/v1/txt2img"
    lenient = {
        "prompt": "a cat",
        "steps": 2.0,
        "width": SIZE,
        "height": SIZE,
        "denoising_strength": None,
        "seed": "",
        "sampler_name": None,
        "hr_checkpoint_name": None,
        "unknown_field": {"x": 1},
        "enable_hr": True,
        "hr_second_pass_steps": 2.5,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent (nearest-exact)",
    }
    answer = requests.post(url, json=lenient)
    assert answer.status_code == 200, answer.text
    assert _png(answer.json()["images"][0]).size == (96, 96)
    for field, value, named in [
        ("width", 63, "width"),
        ("steps", 0, "steps"),
        ("cfg_scale", -1, "cfg_scale"),
    ]:
        bad = requests.post(
            url, json={"prompt": "a", "width": SIZE, "height": SIZE, "steps": 2, field: value}
        )
        assert bad.status_code == 422, (field, bad.text)
        error = bad.json()
        assert set(error) == {"error", "detail", "body", "errors"} and error["detail"].startswith(f"{named}:")
    for body, named in [
        ({"prompt": "a", "width": SIZE, "height": SIZE, "init_images": ["%%%"]}, "init_images"),
        ({"prompt": "a", "width": SIZE, "height": SIZE, "init_images": [], "mask": "x"}, "init_images"),
        (
            {"prompt": "a", "width": SIZE, "height": SIZE, "resize_mode": 3, "init_images": ["aGk="]},
            "resize_mode",
        ),
    ]:
        bad = requests.post(f"{gateway}/sdapi/v1/img2img", json=body)
        assert bad.status_code == 422 and named in bad.json()["detail"], bad.text
    not_json = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422
    wrong_type = requests.post(url, json={"prompt": "a", "width": "wide"})
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["loc"] == ["body", "width"]
    assert (
        requests.post(f"{gateway}/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"}).status_code == 422
    )


def test_concurrent_requests_meet_in_the_unet_batcher(gateway: str, triton: TritonServer):
    def unet() -> Any:
        return (
            grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics("unet").model_stats[0]
        )

    before = unet()
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def post(seed: int) -> None:
        barrier.wait()
        body = {"prompt": "a ship", "seed": seed, "steps": 12, "width": 192, "height": 192}
        statuses.append(requests.post(f"{gateway}/sdapi/v1/txt2img", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=post, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = unet()
    assert statuses == [200] * 4
    calls = after.inference_stats.success.count - before.inference_stats.success.count
    runs = after.execution_count - before.execution_count
    assert runs < calls, (runs, calls)  # some UNet runs carried several requests' rows


def test_auth_limits_and_unreachable_triton(triton: TritonServer):
    config = GatewayConfig(
        triton_url=triton.grpc_url,
        credentials=[AUTH, ("bob", "pw")],
        max_body_bytes=4096,
        cors_allow_origins=["http://ui.example"],
    )
    with running_gateway(config) as url:
        # CORS: a browser's preflight needs no credentials; the answers carry the allowed origin.
        origin = {"Origin": "http://ui.example"}
        preflight = requests.options(
            url + "/sdapi/v1/txt2img", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "http://ui.example"
        allowed = requests.get(url + "/sdapi/v1/cmd-flags", headers=origin, auth=AUTH)
        assert allowed.headers["Access-Control-Allow-Origin"] == "http://ui.example"
        other = requests.get(
            url + "/sdapi/v1/cmd-flags", headers={"Origin": "http://evil.example"}, auth=AUTH
        )
        assert "Access-Control-Allow-Origin" not in other.headers
        for route in ("/sdapi/v1/options", "/sdapi/v1/cmd-flags", "/docs", "/openapi.json"):
            refused = requests.get(url + route)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Basic", route
        assert requests.get(url + "/sdapi/v1/cmd-flags", auth=(AUTH[0], "wrong")).status_code == 401
        assert (
            requests.get(url + "/sdapi/v1/cmd-flags", headers={"Authorization": "Basic %%%"}).status_code
            == 401
        )
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), steps=2)
        api.set_auth(*AUTH)
        assert api.get_options()["samples_format"] == "png"
        assert api.txt2img(prompt="a cat", width=SIZE, height=SIZE).image.size == (SIZE, SIZE)
        # Over --max-body-mb: 413 before decoding, declared or streamed (chunked, no Content-Length).
        big = {"prompt": "x" * 5000}
        assert requests.post(url + "/sdapi/v1/txt2img", json=big, auth=AUTH).status_code == 413
        chunks = iter([b'{"prompt": "', b"x" * 3000, b"x" * 3000, b'"}'])
        assert requests.post(url + "/sdapi/v1/txt2img", data=chunks, auth=AUTH).status_code == 413
    [closed] = free_ports(1)
    with running_gateway(GatewayConfig(triton_url=f"127.0.0.1:{closed}")) as url:
        for answer in (
            requests.get(url + "/sdapi/v1/options"),
            requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "a"}),
        ):
            assert answer.status_code == 503 and "cannot reach the Triton server" in answer.json()["detail"]
        assert requests.get(url + "/sdapi/v1/samplers").status_code == 200  # needs no Triton


def test_sd_gateway_command_starts_fast_and_documents_every_endpoint(triton: TritonServer, tmp_path: Path):
    [port] = free_ports(1)
    started = time.monotonic()
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "services.gateway.cli", "--triton-url", triton.grpc_url),
            *("--port", str(port), "--api-auth", "carol:topsecret"),
        ],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    auth = ("carol", "topsecret")
    try:
        while True:
            try:
                spec = requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1, auth=auth).json()
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() - started < 5, "not serving within 5 s"
                time.sleep(0.05)
        assert time.monotonic() - started < 5
        paths = set(spec["paths"])
        for route in (
            "txt2img",
            "img2img",
            "options",
            "sd-models",
            "samplers",
            "schedulers",
            "upscalers",
            "latent-upscale-modes",
            "sd-vae",
            "loras",
            "embeddings",
            "hypernetworks",
            "face-restorers",
            "prompt-styles",
            "png-info",
            "cmd-flags",
            "refresh-checkpoints",
        ):
            assert f"/sdapi/v1/{route}" in paths, route
        assert requests.get(f"http://127.0.0.1:{port}/docs", auth=auth).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/docs", auth=("carol", "topsecreT")).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
    output = (tmp_path / "gateway.log").read_text()
    assert "GET /docs" in output  # the access log is there ...
    assert "topsecret" not in output.lower() and "Y2Fyb2w6" not in output  # ... without the credentials


ODD_BODIES: list[Any] = [
    None,
    [],
    "a string",
    {"prompt": ["per", "image"]},
    {"prompt": "a", "steps": 2**70},
    {"prompt": "a", "seed": 2**70},
    {"prompt": "a", "width": -64, "height": SIZE},
    {"prompt": "a", "width": 2**40, "height": SIZE},
    {"prompt": "a", "batch_size": 10**9, "width": SIZE, "height": SIZE},
    {"prompt": "a", "n_iter": 10**9, "width": SIZE, "height": SIZE},
    {"prompt": "a", "steps": True, "width": SIZE, "height": SIZE, "cfg_scale": "high"},
    {"prompt": "a", "enable_hr": True, "hr_resize_x": 100, "hr_resize_y": 7, "width": SIZE, "height": SIZE},
    {"prompt": "a", "enable_hr": True, "hr_upscaler": "ESRGAN_4x", "width": SIZE, "height": SIZE, "steps": 2},
    {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 99}, "width": SIZE, "height": SIZE},
    {"prompt": "a", "override_settings": "not a dict"},
    {"prompt": "\x00\ud800 bad unicode", "steps": 1, "width": SIZE, "height": SIZE},
]
ODD_IMG2IMG: list[Any] = [
    {"prompt": "a", "init_images": ["bm90IGFuIGltYWdl"], "width": SIZE, "height": SIZE, "steps": 2},
    {"prompt": "a", "init_images": [None]},
    {"prompt": "a", "init_images": ["aGk="], "mask": "bm90", "inpainting_mask_invert": 1},
    {"prompt": "a", "init_images": ["data:image/png;base64,"], "steps": 2},
    {"prompt": "a", "init_images": ["aGk="], "inpaint_full_res_padding": 2**40, "mask": "aGk="},
]


def test_odd_bodies_are_refused_with_a_field_and_never_crash_the_gateway(gateway: str):
    for route, bodies in (("txt2img", ODD_BODIES), ("img2img", ODD_IMG2IMG)):
        for body in bodies:
            answer = requests.post(f"{gateway}/sdapi/v1/{route}", json=body, timeout=60)
            assert answer.status_code == 422, (route, body, answer.status_code, answer.text[:300])
            detail = answer.json()["detail"]
            assert detail, (route, body)
    assert requests.get(f"{gateway}/sdapi/v1/options").status_code == 200  # still serving
