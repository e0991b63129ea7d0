"""The tensorrt target up to TensorRT itself: fp16 ONNX export, tensorrt_plan configs, and the
clear refusal where TensorRT or a GPU is missing. (Engine builds: tests/test_tensorrt_engine.py.)"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import cli as build_cli
from build_engines import onnx_export, repository, tensorrt_engine
from python_backend.shapes import (
    ENGINE_NAMES,
    PIPELINE,
    PIPELINE_MANIFEST,
    UNET,
    PipelineManifest,
    Profile,
    engine_specs,
    stream_model,
)
from tests.test_build_engines import ONNX_TO_NUMPY

PROFILE = Profile.square(64, 128, 256, max_batch=3, max_prompt_chunks=2)
# Measured on the tiny checkpoint (max abs diff vs fp32 torch): UNet 1.1e-3, VAE decoder 3.3e-3,
# VAE encoder 6.1e-4; these limits leave room for other seeds and ONNX Runtime builds.
FP16_LIMITS = {"unet": 5e-3, "vae_decoder": 1e-2, "vae_encoder": 5e-3}


@pytest.fixture(scope="module")
def fp16_exports(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    repo = tmp_path_factory.mktemp("tensorrt") / "repo"
    geometry = onnx_export.read_geometry(tiny_checkpoint)
    loader = onnx_export.ModuleLoader(tiny_checkpoint)
    precision = build_cli.precisions("tensorrt", vae_precision="fp16")
    paths = {}
    for name, spec in engine_specs(geometry).items():
        out_dir = repository.onnx_dir(repo, name, "tensorrt")
        onnx_export.export_engine(spec, partial(loader.module, name), "digest", out_dir, precision[name])
        repository.write_tensorrt_model(repo, spec, PROFILE)
        paths[name] = out_dir / "model.onnx"
    return paths


def test_precisions_per_engine():
    assert build_cli.precisions("tensorrt", "fp32") == {
        "text_encoder": "fp32",
        "unet": "fp16",
        "vae_decoder": "fp32",
        "vae_encoder": "fp32",
    }
    assert set(build_cli.precisions("onnx", "fp16").values()) == {"fp32"}


@pytest.mark.parametrize("engine", ["unet", "vae_decoder", "vae_encoder"])
def test_fp16_onnx_computes_in_fp16_and_matches_fp32(fp16_exports, tiny_checkpoint, engine):
    path = fp16_exports[engine]
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    # Precision lives in the graph (strongly typed): the weights are fp16; small fp32 constants remain
    # (e.g. the timestep embedding's frequencies, computed in fp32 as in diffusers).
    sizes = {dtype: 0 for dtype in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)}
    for init in graph.initializer:
        if init.data_type in sizes:
            sizes[init.data_type] += int(np.prod(init.dims))
    assert sizes[onnx.TensorProto.FLOAT16] > 100 * sizes[onnx.TensorProto.FLOAT]
    assert {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)} == {onnx.TensorProto.FLOAT}
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[engine]
    module = onnx_export.ModuleLoader(tiny_checkpoint).module(engine)
    assert onnx_export.check_against_torch(spec, module, path) < FP16_LIMITS[engine]


def test_fp16_unet_keeps_fractional_timesteps(fp16_exports, tiny_checkpoint):
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[UNET]
    inputs = onnx_export.sample_inputs(spec, onnx_export.CHECK_SIZES)
    session = ort.InferenceSession(str(fp16_exports[UNET]), providers=["CPUExecutionProvider"])
    at = {
        t: session.run(None, {**inputs, "timestep": np.full_like(inputs["timestep"], t)})[0]
        for t in (500.0, 500.3)
    }
    assert not np.array_equal(at[500.0], at[500.3])  # fp16 would round 500.3 to 500.25 or 500.5 only


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_tensorrt_config_matches_the_onnx_it_is_built_from(fp16_exports, engine):
    config = repository.read_config(fp16_exports[engine].parents[1])
    assert config.platform == "tensorrt_plan"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    graph = onnx.load(str(fp16_exports[engine]), load_external_data=False).graph
    for ours, theirs in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in ours] == [t.name for t in theirs]
        for tensor, value_info in zip(ours, theirs, strict=True):
            onnx_type = value_info.type.tensor_type
            assert tensor.data_type == repository.TRITON_DTYPES[ONNX_TO_NUMPY[onnx_type.elem_type]]
            onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in onnx_type.shape.dim]
            assert [-1, *tensor.dims] == onnx_dims  # Triton owns the leading batch axis
    # The UNet takes 2 rows per image (3), the text encoder 2 per prompt chunk (2), the VAEs 1 per image.
    assert config.max_batch_size == {"text_encoder": 4, "unet": 6}.get(engine, 3)


def test_unet_config_batches_across_requests(fp16_exports):
    config = repository.read_config(fp16_exports[UNET].parents[1])
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == []  # the largest batch the queue holds
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # an idle server adds no wait
    assert {t.name: list(t.dims) for t in config.input}["timestep"] == [1]  # one timestep per sample


def test_profile_batch_ranges_cover_the_config(fp16_exports, tiny_checkpoint):
    for name, spec in engine_specs(onnx_export.read_geometry(tiny_checkpoint)).items():
        config = repository.read_config(fp16_exports[name].parents[1])
        for _, (low, _, high) in tensorrt_engine.profile_shapes(spec, PROFILE).items():
            assert low[0] == 1 and high[0] == config.max_batch_size


def test_pipeline_inputs_arrive_on_the_cpu_with_gpu_engines(tiny_checkpoint, tmp_path):
    """model.py reads every request input with as_numpy(), which fails on a GPU tensor: the pipeline models
    must not set FORCE_CPU_ONLY_INPUT_TENSORS "no" (which lets inputs arrive in GPU memory). Their BLS calls'
    outputs stay on the GPU regardless; the device they work on comes from pipeline.json."""
    manifest = PipelineManifest(PROFILE, onnx_export.read_geometry(tiny_checkpoint), "tiny", device="cuda")
    repository.write_pipeline_model(tmp_path, tiny_checkpoint, manifest)
    for name in (PIPELINE, stream_model(PIPELINE)):
        config = repository.read_config(tmp_path / name)
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in config.parameters, name
        assert PipelineManifest.read(tmp_path / name / "1" / PIPELINE_MANIFEST).device == "cuda"


def _tensorrt_present() -> bool:
    try:
        tensorrt_engine.check_tensorrt_available()
    except tensorrt_engine.TensorRTUnavailable:
        return False
    return True


@pytest.mark.skipif(_tensorrt_present(), reason="TensorRT and a GPU are present: the build would run")
def test_without_tensorrt_the_build_says_what_to_install(tiny_checkpoint, tmp_path, capsys):
    code = build_cli.main(
        ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--target", "tensorrt"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "--target tensorrt" in err and "nvcr.io/nvidia/tritonserver" in err and "Traceback" not in err
    assert not (tmp_path / "unet").exists()  # refused before any export


# --- The real thing: runs only where TensorRT and a GPU exist (never on CI machines) ------------------

REAL_TENSORRT_REASON = "TensorRT and a CUDA GPU are required; TensorRT cannot be installed on CI machines"


@pytest.fixture(scope="module")
def tensorrt_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _tensorrt_present():
        pytest.skip(REAL_TENSORRT_REASON)
    repo = tmp_path_factory.mktemp("tensorrt-real") / "repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), "--target", "tensorrt"]
    assert build_cli.main([*args, "--min-size", "64", "--max-size", "256", "--max-batch", "2"]) == 0
    return repo


def _run_plan(plan: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    from python_backend.trt_sessions import TensorRTPlan

    engine = TensorRTPlan(plan, torch.device("cuda"))
    return {name: t.cpu().numpy() for name, t in zip(engine.outputs, engine.run(inputs), strict=True)}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_real_tensorrt_engine_matches_onnx_runtime(tensorrt_repository, tiny_checkpoint, engine):
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[engine]
    in_profile = {"guided_batch": 2, "text_rows": 2, "batch": 1, "text_sequence": 77}
    sizes = {**onnx_export.CHECK_SIZES, **in_profile}
    inputs = onnx_export.sample_inputs(spec, sizes, seed=3)
    session = ort.InferenceSession(str(tensorrt_repository / engine / "onnx" / "model.onnx"))
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
    got = _run_plan(tensorrt_repository / engine / "1" / "model.plan", inputs)
    for name, array in expected.items():
        np.testing.assert_allclose(got[name], array, atol=2e-2, rtol=1e-2)


def test_real_tensorrt_served_images_match_diffusers(tensorrt_repository, tiny_checkpoint):
    import shutil

    from client import StableDiffusionClient
    from tests.parity import diffusers_images, max_pixel_diff
    from tests.triton_server import TritonServer

    server_binary = shutil.which("tritonserver")
    if server_binary is None or not (Path(server_binary).parents[1] / "backends" / "tensorrt").is_dir():
        pytest.skip("needs tritonserver with the TensorRT backend on PATH (the NGC container)")
    with TritonServer(tensorrt_repository) as server:
        result = StableDiffusionClient(server.grpc_url).generate(
            "a photo of a cat", steps=5, seed=2024, width=96, height=64, scheduler="Euler a"
        )
    served = np.stack([np.asarray(image) for image in result.images])
    expected = diffusers_images(
        tiny_checkpoint,
        "a photo of a cat",
        width=96,
        height=64,
        steps=5,
        guidance_scale=7.5,
        seed=2024,
        scheduler="EulerAncestralDiscreteScheduler",
    )
    # fp16 UNet: measured per-engine differences are ~1e-3; the image may move a few levels.
    assert max_pixel_diff(served, expected) <= 8


def test_prompt_chunks_widen_the_unet_profile(tiny_checkpoint, tmp_path):
    args = build_cli.parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--max-prompt-chunks", "3"]
    )
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[UNET]
    low, _, high = tensorrt_engine.profile_shapes(spec, args.profile)["encoder_hidden_states"]
    assert (low[1], high[1]) == (77, 231)
