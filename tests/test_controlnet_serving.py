"""ControlNet served by a real Triton (issue 16): the ControlNet engines and the residual-taking UNet as
Triton models, units sent as pipeline inputs by the Python client; images as diffusers' ControlNet pipeline
gives them, concurrent requests with different units (and none) sharing UNet runs, bad units refused naming
unit and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from build_engines import cli as build_cli
from client import ControlNetUnit, GenerationError, StableDiffusionClient
from tests.conftest import CPU_TARGETS, PROFILE_ARGS, cpu_repository
from tests.parity import max_pixel_diff
from tests.test_controlnet import PROMPT, SCHEDULER, SEED, SIZE, STEPS, _control_image, _diffusers, _png
from tests.triton_server import TritonServer, concurrent_unet_runs

CONCURRENT = 4


@pytest.fixture(scope="module")
def controlnets(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from build_engines.controlnet import write_tiny_controlnet

    folder = tmp_path_factory.mktemp("served-controlnets")
    return {n: write_tiny_controlnet(folder / n, tiny_checkpoint, s) for n, s in (("canny", 1), ("depth", 2))}


@pytest.fixture(scope="module", params=CPU_TARGETS)
def server(request: pytest.FixtureRequest, tiny_checkpoint: Path, controlnets, tmp_path_factory):
    """ControlNets served on each CPU target."""
    built = cpu_repository(request)
    repo = tmp_path_factory.mktemp("controlnet-serving") / "repo"
    shutil.copytree(built, repo)  # the plain exports are reused
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(repo),
        "--target",
        request.param,
        *PROFILE_ARGS,
        "--controlnet-units",
        "2",
    ]
    units = [a for name, path in controlnets.items() for a in ("--controlnet", f"{name}={path}")]
    serving = ["--max-concurrent-requests", str(CONCURRENT), "--unet-batch-delay", "20"]
    assert build_cli.main([*args, *units, *serving]) == 0
    with TritonServer(repo) as running:
        yield running


def _generate(server, *units: ControlNetUnit):
    client = StableDiffusionClient(server.grpc_url)
    result = client.generate(
        PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, scheduler=SCHEDULER[0], controlnets=units
    )
    return np.stack([np.asarray(image) for image in result.images]), result


def _unit(model: str, seed: int, **fields) -> ControlNetUnit:
    return ControlNetUnit(model, _png(_control_image(seed)), resize_mode="Just Resize", **fields)


def test_served_controlnet_matches_diffusers(server, tiny_checkpoint, controlnets):
    served, result = _generate(server, _unit("canny", 1, weight=0.8))
    expected = _diffusers(
        tiny_checkpoint, controlnets, ["canny"], image=_control_image(1), controlnet_conditioning_scale=0.8
    )
    assert max_pixel_diff(served, expected) <= 2
    [unit] = result.info["controlnets"]
    assert unit["model"] == "canny" and unit["module"] == "none" and unit["weight"] == pytest.approx(0.8)


def test_mixed_units_share_unet_runs_and_give_their_solo_images(server):
    requests = [
        (),
        (_unit("canny", 1),),
        (_unit("canny", 1, weight=0.6), _unit("depth", 2, guidance_end=0.5)),
        (_unit("depth", 2, weight=0.5, control_mode="ControlNet is more important"),),
    ]
    solo = [_generate(server, *units)[0] for units in requests]
    assert len({image.tobytes() for image in solo}) == len(requests)

    jobs = [lambda units=units: _generate(server, *units)[0] for units in requests]
    results, calls, runs = concurrent_unet_runs(server.grpc_url, jobs)
    assert calls == len(requests) * STEPS
    assert runs < calls, (runs, calls)  # runs carried rows of different units, and rows with none
    for i, image in enumerate(results):
        assert image is not None, f"request {i} did not finish"
        assert max_pixel_diff(image, solo[i]) <= 1, i


@pytest.mark.parametrize(
    ("units", "message"),
    [
        (
            (ControlNetUnit("openpose", _png(_control_image(1))),),
            "controlnet_0_model: unknown ControlNet 'openpose'",
        ),
        ((ControlNetUnit("canny", b"not an image"),), "controlnet_0_image: "),
        ((_unit("canny", 1, weight=float("inf")),), "controlnet_0_weight: must be in 0..2.0"),
        ((_unit("canny", 1, guidance_start=0.9, guidance_end=0.1),), "controlnet_0_guidance_start: "),
        ((_unit("canny", 1, module="depth_midas"),), "controlnet_0_module: "),
        # built for 2 units: Triton refuses the third's inputs, naming one
        (
            (_unit("canny", 1), _unit("canny", 1), _unit("canny", 1)),
            "unexpected inference input 'controlnet_2_",
        ),
    ],
)
def test_bad_units_are_invalid_arguments_naming_unit_and_field(server, units, message):
    with pytest.raises(GenerationError) as refused:
        _generate(server, *units)
    assert refused.value.is_invalid_argument, refused.value
    assert message in str(refused.value)
    _generate(server)  # and the server still serves


def test_the_gateway_takes_the_extensions_units_and_lists_models_and_modules(server):
    import requests
    import webuiapi

    from services.gateway.app import GatewayConfig
    from tests.test_gateway import running_gateway

    with running_gateway(GatewayConfig(triton_url=server.grpc_url)) as gateway:
        assert requests.get(f"{gateway}/controlnet/model_list", timeout=30).json() == {
            "model_list": ["canny", "depth"]
        }
        modules = requests.get(f"{gateway}/controlnet/module_list", timeout=30).json()["module_list"]
        assert {"none", "canny", "invert"} <= set(modules)
        host, port = gateway.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        # As A1111's clients name a model: its title, with the file's hash.
        unit = webuiapi.ControlNetUnit(
            image=_control_image(1), model="canny [0123abcd]", weight=0.8, resize_mode="Just Resize"
        )
        result = api.txt2img(
            prompt=PROMPT,
            width=SIZE,
            height=SIZE,
            steps=STEPS,
            seed=SEED,
            sampler_name=SCHEDULER[0],
            cfg_scale=7.5,
            controlnet_units=[unit],
            alwayson_scripts={},  # webuiapi writes units into its default dict: later calls would send them
        )
        direct, _ = _generate(
            server, _unit("canny", 1, weight=0.8, processor_res=512, threshold_a=64, threshold_b=64)
        )
        assert np.array_equal(np.asarray(result.image.convert("RGB")), direct[0])
        assert 'ControlNet 0: "Module: none, Model: canny, Weight: 0.8' in result.info["infotexts"][0]
        bad = webuiapi.ControlNetUnit(image=_control_image(1), model="openpose")
        response = requests.post(
            f"{gateway}/sdapi/v1/txt2img",
            json={
                "prompt": PROMPT,
                "width": SIZE,
                "height": SIZE,
                "alwayson_scripts": {"controlnet": {"args": [bad.to_dict()]}},
            },
            timeout=120,
        )
        assert (
            response.status_code == 422
            and "controlnet_0_model: unknown ControlNet 'openpose'" in response.text
        )
