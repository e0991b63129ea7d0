"""Several checkpoints in one Triton repository (`build-engines --prefix`), through a real tritonserver.

The repository holds the session's tiny checkpoint unprefixed (`pipeline`, `unet`, ...) and a second tiny
checkpoint, other random weights, as `other_pipeline`, `other_unet`, ... Each pipeline must generate with its
own engines: its images equal those of a repository holding its checkpoint alone. Then the ways to pick one:
`StableDiffusionClient(model_name=...)` (streaming too), `sd-client --model`, and sd-gateway's A1111 model
switching driven by the real `webuiapi` package.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import webuiapi
from PIL import Image

from build_engines import cli as build_cli
from build_engines.tiny_checkpoint import write_tiny_checkpoint
from client import StableDiffusionClient
from client import cli as client_cli
from python_backend.shapes import ENGINE_NAMES
from services.gateway.app import GatewayConfig
from tests.conftest import PROFILE_ARGS
from tests.test_gateway import running_gateway
from tests.test_reliability import stub_of
from tests.triton_server import TritonServer

pytestmark = pytest.mark.integration

PREFIX = "other"
OTHER = "other_pipeline"
MODELS = ("pipeline", "pipeline_stream", "text_encoder", "unet", "vae_decoder", "vae_encoder")
# webuiapi's defaults for what it sends, so that gateway and client images compare.
REQUEST: dict[str, Any] = {
    "seed": 21,
    "steps": 3,
    "width": 64,
    "height": 64,
    "scheduler": "Euler a",
    "guidance_scale": 7.0,
}
PROMPT = "a lighthouse"


def _files(repo: Path) -> dict[str, str]:
    """Every file of the repository (relative path) with the sha256 of its contents; not the bytecode a
    server that ran the models left (a build writes the model folders afresh)."""
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _build(checkpoint: Path, repo: Path, *args: str) -> None:
    assert build_cli.main(["--checkpoint", str(checkpoint), "--output", str(repo), *PROFILE_ARGS, *args]) == 0


def _image(url: str, model: str, **options: Any) -> np.ndarray:
    with StableDiffusionClient(url, model_name=model) as client:
        return np.asarray(client.generate(PROMPT, **REQUEST, **options).images[0])


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd-other", seed=1)


@pytest.fixture(scope="module")
def other_alone(other_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding the second checkpoint alone, unprefixed."""
    repo = tmp_path_factory.mktemp("alone") / "repo"
    _build(other_checkpoint, repo)
    return repo


@pytest.fixture(scope="module")
def shared(
    model_repository: Path,
    other_checkpoint: Path,
    other_alone: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, str]]:
    """The repository holding both checkpoints, and its files before the second one was built into it."""
    repo = tmp_path_factory.mktemp("shared") / "repo"
    shutil.copytree(model_repository, repo)  # the session's checkpoint, built unprefixed
    before = _files(repo)
    # Only to save an export: build-engines keeps an ONNX file whose sidecar says it is this checkpoint's.
    for engine in ENGINE_NAMES:
        shutil.copytree(other_alone / engine / "1", repo / f"{PREFIX}_{engine}" / "1")
    _build(other_checkpoint, repo, "--prefix", PREFIX)
    return repo, before


@pytest.fixture(scope="module")
def alone(model_repository: Path, other_alone: Path) -> dict[str, np.ndarray]:
    """The image each checkpoint gives served from a repository that holds it alone, by checkpoint name."""
    images = {}
    for name, repo in (("tiny-sd", model_repository), ("tiny-sd-other", other_alone)):
        with TritonServer(repo) as server:
            images[name] = _image(server.grpc_url, "pipeline")
    return images


@pytest.fixture(scope="module")
def triton(shared: tuple[Path, dict[str, str]]) -> Iterator[TritonServer]:
    with TritonServer(shared[0]) as server:
        yield server


def _executions(server: TritonServer, model: str) -> int:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return int(client.get_inference_statistics(model).model_stats[0].inference_stats.success.count)


def test_building_a_prefixed_checkpoint_leaves_the_others_alone(shared: tuple[Path, dict[str, str]]):
    repo, before = shared
    after = _files(repo)
    assert {k: v for k, v in after.items() if not k.startswith(f"{PREFIX}_")} == before
    added = {p.name for p in repo.iterdir()} - {Path(name).parts[0] for name in before}
    assert added == {f"{PREFIX}_{m}" for m in MODELS}


def test_each_pipeline_generates_with_its_own_engines(triton: TritonServer, alone: dict[str, np.ndarray]):
    url = triton.grpc_url
    assert not np.array_equal(alone["tiny-sd"], alone["tiny-sd-other"])  # the weights tell them apart
    engines = ("unet", "text_encoder", "vae_decoder")
    start = {m: _executions(triton, m) for p in ("", f"{PREFIX}_") for m in (f"{p}{e}" for e in engines)}
    assert np.array_equal(_image(url, OTHER), alone["tiny-sd-other"])
    ran = {m: _executions(triton, m) - n for m, n in start.items()}
    assert all(ran[f"{PREFIX}_{e}"] > 0 and ran[e] == 0 for e in engines), ran
    assert np.array_equal(_image(url, "pipeline"), alone["tiny-sd"])
    with StableDiffusionClient(url) as client:
        pipelines = client.pipelines()
    assert {name: c["model"] for name, c in pipelines.items()} == {
        "pipeline": "tiny-sd",
        OTHER: "tiny-sd-other",
    }
    assert pipelines[OTHER]["model_hash"] != pipelines["pipeline"]["model_hash"]


def test_streaming_from_the_prefixed_model(triton: TritonServer, alone: dict[str, np.ndarray]):
    steps: list[int] = []
    before = {m: _executions(triton, m) for m in ("pipeline_stream", f"{OTHER}_stream")}
    with StableDiffusionClient(triton.grpc_url, model_name=OTHER) as client:
        result = client.generate(
            PROMPT, **REQUEST, on_progress=lambda status, _: steps.append(status["step"])
        )
    assert steps == [1, 2, 3] and result.info["model"] == "tiny-sd-other"
    assert np.array_equal(np.asarray(result.images[0]), alone["tiny-sd-other"])
    assert _executions(triton, f"{OTHER}_stream") == before[f"{OTHER}_stream"] + 1
    assert _executions(triton, "pipeline_stream") == before["pipeline_stream"]


def test_sd_client_model_option(
    triton: TritonServer, alone: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    url = ["--url", triton.grpc_url]
    assert client_cli.main(["models", *url]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["MODEL", "CHECKPOINT", "HASH"]
    assert sorted(line.split()[:2] for line in listing[1:]) == [
        [OTHER, "tiny-sd-other"],
        ["pipeline", "tiny-sd"],
    ]
    assert client_cli.main(["schedulers", "--model", OTHER, *url]) == 0
    assert "(default)" in capsys.readouterr().out
    options = ["--seed", "21", "--steps", "3", "--width", "64", "--height", "64", "--scheduler", "Euler a"]
    options += ["--guidance", "7"]
    out = tmp_path / "out"
    assert client_cli.main(["generate", PROMPT, "--model", OTHER, *options, "--out", str(out), *url]) == 0
    [path] = capsys.readouterr().out.split()
    with Image.open(path) as png:
        assert png.info["parameters"].endswith("Model: tiny-sd-other")
        assert np.array_equal(np.asarray(png.convert("RGB")), alone["tiny-sd-other"])
    assert client_cli.main(["generate", PROMPT, "--model", "missing_pipeline", *options, *url]) == 1
    assert "missing_pipeline" in capsys.readouterr().err


@pytest.fixture
def api(triton: TritonServer) -> Iterator[webuiapi.WebUIApi]:
    """A gateway of its own per test: the current checkpoint is global state."""
    with running_gateway(GatewayConfig(triton_url=triton.grpc_url)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
        yield api
        api.session.close()  # uvicorn would wait for its kept-alive connection to stop


def _txt2img(api: webuiapi.WebUIApi, **fields: Any) -> webuiapi.WebUIApiResult:
    return api.txt2img(prompt=PROMPT, seed=21, width=64, height=64, **fields)


def test_gateway_lists_and_switches_checkpoints(api: webuiapi.WebUIApi, alone: dict[str, np.ndarray]):
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert sorted(models) == ["tiny-sd", "tiny-sd-other"]
    titles = {name: m["title"] for name, m in models.items()}
    assert api.util_get_model_names() == sorted(titles.values())
    assert api.util_get_current_model() == titles["tiny-sd"]  # --model-name's: `pipeline`
    first = _txt2img(api)
    assert (
        first.info["sd_model_name"] == "tiny-sd" and first.info["sd_model_hash"] == models["tiny-sd"]["hash"]
    )
    assert np.array_equal(np.asarray(first.image.convert("RGB")), alone["tiny-sd"])

    api.util_set_model(titles["tiny-sd-other"])  # POST options, as Open WebUI and SillyTavern switch
    assert api.util_get_current_model() == titles["tiny-sd-other"]
    switched = _txt2img(api)
    assert switched.info["sd_model_name"] == "tiny-sd-other"
    assert switched.info["sd_model_hash"] == models["tiny-sd-other"]["hash"]
    assert np.array_equal(np.asarray(switched.image.convert("RGB")), alone["tiny-sd-other"])
    assert "Model: tiny-sd-other" in switched.info["infotexts"][0]

    # One request's override_settings (Dify names the model by model_name) leaves the current one as it is.
    once = _txt2img(api, override_settings={"sd_model_checkpoint": "tiny-sd"})
    assert once.info["sd_model_name"] == "tiny-sd" and not once.info["warnings"]
    assert np.array_equal(np.asarray(once.image.convert("RGB")), alone["tiny-sd"])
    assert api.util_get_current_model() == titles["tiny-sd-other"]
    # An unknown one: A1111 keeps the current model; we say so.
    unknown = _txt2img(api, override_settings={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert unknown.info["sd_model_name"] == "tiny-sd-other"
    assert unknown.info["warnings"] == [
        f"checkpoint 'v1-5-pruned.safetensors' is not served here; used {titles['tiny-sd-other']!r}"
    ]

    # By hash and by model name too; an unknown checkpoint is refused, naming the field and what exists.
    assert api.set_options({"sd_model_checkpoint": models["tiny-sd"]["hash"]}) is None
    assert api.get_options()["sd_model_checkpoint"] == titles["tiny-sd"]
    bad = requests.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    assert detail.startswith("sd_model_checkpoint:") and all(t in detail for t in titles.values())
    assert api.util_get_current_model() == titles["tiny-sd"]
    assert api.refresh_checkpoints() is None
    assert api.util_get_model_names() == sorted(titles.values())


def _current(triton: TritonServer, model_name: str) -> tuple[str, list[dict[str, Any]]]:
    """The current checkpoint's title of a new gateway with --model-name `model_name`, and its sd-models."""
    with running_gateway(GatewayConfig(triton_url=triton.grpc_url, model_name=model_name)) as url:
        models = requests.get(f"{url}/sdapi/v1/sd-models").json()
        return requests.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"], models


def test_gateway_default_checkpoint_is_its_model_name_else_the_first(triton: TritonServer):
    current, models = _current(triton, OTHER)
    assert current == next(m["title"] for m in models if m["model_name"] == "tiny-sd-other")
    current, models = _current(triton, "missing_pipeline")
    assert current == models[0]["title"]


def test_a_prefixed_engine_is_reloaded_by_its_own_name(triton: TritonServer, alone: dict[str, np.ndarray]):
    """sd-serve's supervisor finds a dead stub's model from its folder: `other_unet` is reloaded as that."""
    victim = stub_of(triton, f"{PREFIX}_unet")
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while f"{PREFIX}_unet reloaded" not in triton.log():
        assert time.monotonic() < deadline, triton.log()
        time.sleep(0.5)
    assert stub_of(triton, f"{PREFIX}_unet").pid != victim.pid
    assert np.array_equal(_image(triton.grpc_url, OTHER), alone["tiny-sd-other"])
