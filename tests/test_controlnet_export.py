"""ControlNet engines (issue 16), build side: the residuals a ControlNet gives and the UNet takes, as
diffusers computes them; the tiny random ControlNet; the exports; and perf.controlnet_residuals end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from build_engines import controlnet
from build_engines.onnx_export import CHECK_SIZES, ModuleLoader, read_geometry, sample_inputs
from python_backend.shapes import (
    ModelGeometry,
    Profile,
    control_residuals,
    controlled_unet_spec,
    controlnet_model,
    controlnet_spec,
)
from tests.triton_server import PROJECT_ROOT


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return controlnet.write_tiny_controlnet(
        tmp_path_factory.mktemp("controlnet") / "canny", tiny_checkpoint, 1
    )


def test_sd_v1_residuals_are_thirteen_maps_down_to_an_eighth():
    residuals = control_residuals(ModelGeometry())
    assert [t.name for t in residuals] == [*(f"down_residual_{i}" for i in range(12)), "mid_residual"]
    channels = [t.dims[1] for t in residuals]
    assert channels == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280]
    assert [t.dims[2] for t in residuals] == [
        *["latent_height"] * 3,
        *["latent_height_2"] * 3,
        *["latent_height_4"] * 3,
        *["latent_height_8"] * 4,
    ]
    # A stride-2 convolution with padding 1 rounds up: a 72 px side is 9 latent cells, then 5, 3, 2.
    ranges = Profile.square(72, 512, 1024).axis_ranges()
    assert [ranges[f"latent_height_{f}"][0] for f in (2, 4, 8)] == [5, 3, 2]
    assert (
        controlnet_model("", "canny") == "controlnet_canny"
        and controlnet_model("sd15", "canny") == "sd15_controlnet_canny"
    )


def test_the_tiny_controlnet_gives_the_residuals_the_unet_takes(tiny_checkpoint, tiny_controlnet):
    """Shapes as the specs say, at sizes other than the trace's; not zero (its zero convolutions are random);
    the UNet with zero residuals is the plain UNet, and with these it is diffusers' ControlNet step."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    geometry = read_geometry(tiny_checkpoint)
    inputs = {
        k: torch.from_numpy(v) for k, v in sample_inputs(controlnet_spec(geometry), CHECK_SIZES).items()
    }
    with torch.inference_mode():
        residuals = controlnet.load_controlnet(tiny_controlnet, geometry)(*inputs.values())
    expected = sample_inputs(controlled_unet_spec(geometry), CHECK_SIZES)
    for spec, got in zip(control_residuals(geometry), residuals, strict=True):
        assert tuple(got.shape) == expected[spec.name].shape
        assert float(got.abs().mean()) > 1e-3

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint, subfolder="unet").eval()
    net = ControlNetModel.from_pretrained(tiny_controlnet).eval()
    sample, timestep, text, cond = inputs.values()
    with torch.inference_mode():
        down, mid = net(sample, timestep.reshape(-1), text, cond, return_dict=False)
        reference = unet(
            sample,
            timestep.reshape(-1),
            text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        controlled = controlnet._ControlledUNet(ModuleLoader(tiny_checkpoint).component("unet"))
        got = controlled(sample, timestep, text, *down, mid)
        zero = controlled(sample, timestep, text, *(torch.zeros_like(r) for r in (*down, mid)))
        plain = unet(sample, timestep.reshape(-1), text).sample
    torch.testing.assert_close(got, reference)
    assert torch.equal(zero, plain)


def test_a_controlnet_for_another_architecture_is_refused_naming_it(tiny_controlnet, tmp_path):
    with pytest.raises(
        controlnet.ControlNetError, match=r"not a ControlNet for this checkpoint .*block_out_channels"
    ):
        controlnet.load_controlnet(tiny_controlnet, ModelGeometry())
    with pytest.raises(controlnet.ControlNetError, match="not a diffusers ControlNet folder"):
        controlnet.load_controlnet(tmp_path, ModelGeometry())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exports_match_torch(tiny_checkpoint, tiny_controlnet, tmp_path, precision):
    geometry = read_geometry(tiny_checkpoint)
    net = controlnet.export_controlnet(tiny_controlnet, geometry, tmp_path / "controlnet", precision)
    unet = controlnet.export_controlled_unet(
        ModuleLoader(tiny_checkpoint), geometry, "d", tmp_path / "unet", precision
    )
    limit = 1e-5 if precision == "fp32" else 5e-3
    assert net.max_abs_diff <= limit and unet.max_abs_diff <= limit
    session = ort.InferenceSession(str(net.path))
    assert [o.name for o in session.get_outputs()] == [t.name for t in control_residuals(geometry)]
    assert controlnet.export_controlnet(tiny_controlnet, geometry, tmp_path / "controlnet", precision).reused


def test_residual_cost_benchmark_reports_every_variant(tiny_checkpoint, tmp_path):
    out = tmp_path / "report.md"
    command = [sys.executable, "-m", "perf.controlnet_residuals", "--checkpoint", str(tiny_checkpoint)]
    options = ["--size", "64", "--rounds", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run([*command, *options], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    for key in "abc":
        [row] = [line for line in text.splitlines() if line.startswith(f"| ({key}) ")]
        assert len(row.split("|")[-2].split(",")) == 2
    assert re.search(r"no-ControlNet cost, median \(b\) ÷ median \(a\) − 1: \*\*[+-]\d+\.\d\d%\*\* \(", text)
    [diff] = re.findall(r"\(b\)'s output vs \(a\)'s: max abs difference (\S+)", text)
    assert float(diff) == 0.0  # zero residuals: the plain graph's output
    assert np.isfinite(float(re.findall(r"residual inputs per call: (\S+) MiB", text)[0]))


def test_tensorrt_build_makes_controlnet_plans_and_a_residual_unet_plan(
    tiny_checkpoint, tiny_controlnet, tmp_path, monkeypatch
):
    """Against the ONNX-backed stand-in for TensorRT (tests/test_tensorrt_lora.py): every residual axis gets
    a profile range, the ControlNet is a tensorrt_plan model batched like the UNet, and the plans run."""
    from tritonclient.grpc import model_config_pb2 as mc

    from build_engines import cli as build_cli
    from build_engines import repository
    from build_engines import tensorrt_engine as te
    from python_backend.trt_sessions import TensorRTPlan
    from tests.test_tensorrt_lora import install_fake_tensorrt, tensorrt_build

    install_fake_tensorrt(monkeypatch)
    repo = tmp_path / "repo"
    options = ["--controlnet", f"canny={tiny_controlnet}", "--timing-cache", str(tmp_path / "tc")]
    assert build_cli.main(tensorrt_build(tiny_checkpoint, repo, *options)) == 0

    config = repository.read_config(repo / "controlnet_canny")
    assert config.platform == "tensorrt_plan" and config.HasField("dynamic_batching")
    assert [o.name for o in config.output] == [
        t.name for t in control_residuals(read_geometry(tiny_checkpoint))
    ]
    record = te.read_plan_record(repo / "unet" / "1" / "model.plan.json")
    ranges = Profile.square(64, 256, 256, max_batch=4).axis_ranges()  # PROFILE_ARGS
    assert record.profiles[0]["mid_residual"]["max"][2:] == [
        ranges["latent_height_8"][2],
        ranges["latent_width_8"][2],
    ]
    assert (
        record.precision
        == te.read_plan_record(repo / "controlnet_canny" / "1" / "model.plan.json").precision
        == "fp16"
    )

    geometry = read_geometry(tiny_checkpoint)
    inputs = sample_inputs(controlnet_spec(geometry), {**CHECK_SIZES, "text_sequence": 77})
    net = TensorRTPlan(repo / "controlnet_canny" / "1" / "model.plan", torch.device("cpu"))
    residuals = net.run(inputs)
    unet = TensorRTPlan(repo / "unet" / "1" / "model.plan", torch.device("cpu"))
    unet_inputs = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    [noise] = unet.run({**unet_inputs, **dict(zip(net.outputs, residuals, strict=True))})
    assert (
        noise.shape == inputs["sample"].shape
        and mc.ModelInstanceGroup.KIND_GPU == config.instance_group[0].kind
    )


def test_a_single_file_controlnet_converts_to_the_same_weights(tiny_checkpoint, tiny_controlnet, tmp_path):
    """The original (lllyasviel/A1111) layout, written from the tiny ControlNet, read back by diffusers'
    single-file loading with a config made from the checkpoint's UNet: the same weights, none fetched."""
    import json

    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    single = controlnet.write_single_file(tiny_controlnet, tmp_path / "control_tiny.safetensors")
    unet_config = json.loads((tiny_checkpoint / "unet" / "config.json").read_text())
    converted = controlnet.convert_single_file(single, unet_config, tmp_path / "converted")
    expected = ControlNetModel.from_pretrained(tiny_controlnet).state_dict()
    got = ControlNetModel.from_pretrained(converted).state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    not_controlnet = tmp_path / "weights.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(not_controlnet))
    with pytest.raises(controlnet.ControlNetError, match="weights.safetensors: not a ControlNet"):
        controlnet.convert_single_file(not_controlnet, unet_config, tmp_path / "x")
    full_size = dict(unet_config, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768)
    with pytest.raises(
        controlnet.ControlNetError, match="control_tiny.safetensors: not an SD v1.x ControlNet for"
    ):
        controlnet.convert_single_file(single, full_size, tmp_path / "y")


def test_build_engines_takes_a_single_file_controlnet(tiny_checkpoint, tiny_controlnet, tmp_path):
    from build_engines import cli as build_cli
    from tests.conftest import PROFILE_ARGS

    single = controlnet.write_single_file(tiny_controlnet, tmp_path / "control_tiny.safetensors")
    repo = tmp_path / "repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS]
    assert build_cli.main([*args, "--controlnet", f"tiny={single}"]) == 0
    assert not (repo / ".controlnets").exists()
    geometry = read_geometry(tiny_checkpoint)
    inputs = sample_inputs(controlnet_spec(geometry), CHECK_SIZES)
    session = ort.InferenceSession(str(repo / "controlnet_tiny" / "1" / "model.onnx"))
    with torch.inference_mode():
        expected = controlnet.load_controlnet(tiny_controlnet, geometry)(
            *map(torch.from_numpy, inputs.values())
        )
    for got, want in zip(session.run(None, inputs), expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
