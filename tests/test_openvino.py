"""The openvino target: IR conversion and reuse, the compiled-shape cache, precision, the native backend's
configs and sd-serve's precision check. Parity of its images with diffusers' is proved by the core and
serving tests, which run on both CPU targets (tests/conftest.py `engines`, tests/test_serving.py `server`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from build_engines import cli as build_cli
from build_engines import openvino_engine, repository
from python_backend.engines import OnnxRuntimeEngines, OpenVinoEngines
from python_backend.ov_sessions import (
    DYNAMIC,
    RELEASE_AFTER_RUN,
    STATIC,
    CompiledGraph,
    compile_config,
    host_supports,
    ov,
)
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest
from python_backend.shapes import ENGINE_NAMES, UNET, engine_specs
from services import serve
from tests.conftest import PROFILE_ARGS
from tests.parity import max_pixel_diff

BF16_HOST = host_supports("bf16")
NEEDS_BF16 = pytest.mark.skipif(not BF16_HOST, reason="this CPU has neither AVX512_BF16 nor AMX")


def unet_feeds(batch: int, side: int, seed: int = 0, tokens: int = 77) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
        "timestep": np.full((batch, 1), 500, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, tokens, 32), dtype=np.float32),
    }


def test_build_writes_ir_and_python_models_and_keeps_them(openvino_repository, tiny_checkpoint, capsys):
    for engine in ENGINE_NAMES:
        version = openvino_repository / engine / "1"
        assert {"model.xml", "model.bin", "model.xml.json", "model.py"} <= {p.name for p in version.iterdir()}
        assert not (version / "model.onnx").exists()  # the ONNX export is the IR's source, kept in onnx/
        config = repository.read_config(openvino_repository / engine)
        assert config.backend == "python"
        assert config.parameters["precision"].string_value == "fp32"
        assert config.parameters["shapes"].string_value == STATIC
        # Activations are given back after each run by the engines that run once per request.
        assert (RELEASE_AFTER_RUN in config.parameters) == (engine != UNET)
    assert repository.read_config(openvino_repository / UNET).HasField("dynamic_batching")
    # A second build over it keeps every IR (same ONNX record, precision and OpenVINO).
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(openvino_repository),
        "--target",
        "openvino",
    ]
    assert build_cli.main([*args, *PROFILE_ARGS]) == 0
    assert capsys.readouterr().out.count("IR up to date, kept") == len(ENGINE_NAMES)


def test_ir_matches_onnx_runtime_and_reports_its_error(openvino_repository):
    record = json.loads((openvino_repository / UNET / "1" / "model.xml.json").read_text())
    assert record["key"]["precision"] == "fp32"
    assert record["rel_error"] < 1e-5
    spec = engine_specs(PipelineAssets.load(openvino_repository / "pipeline" / "1").manifest.geometry)[UNET]
    error = openvino_engine.check_against_onnx(
        spec,
        openvino_repository / UNET / "1" / "model.xml",
        openvino_repository / UNET / "onnx" / "model.onnx",
    )
    assert error == pytest.approx(record["rel_error"], rel=0.5)


def test_static_shapes_compile_once_per_shape_within_the_limit(openvino_repository, tmp_path):
    cache = tmp_path / "cache"
    graph = CompiledGraph(
        ov.Core(), openvino_repository / UNET / "1" / "model.xml", compile_config("fp32", cache), STATIC, 2
    )
    small, large = unet_feeds(2, 8), unet_feeds(4, 12)
    first = graph(small)
    assert len(graph.compiled_shapes) == 1 and any(cache.iterdir())  # compiled, and written to disk
    np.testing.assert_array_equal(graph(small)[0], first[0])
    assert len(graph.compiled_shapes) == 1  # the same shape runs its compiled model
    graph(large)
    graph(unet_feeds(1, 8))
    shapes = graph.compiled_shapes
    assert len(shapes) == 2 and shapes[-1] == ((1, 8, 8), (1,), (1,))  # the least recently used went
    np.testing.assert_array_equal(graph(small)[0], first[0])  # compiled again (from the disk cache)


def test_static_shapes_key_on_the_images_and_leave_the_prompt_length_dynamic(openvino_repository):
    """Mixed traffic: a compiled model per prompt length too would compile on nearly every request."""
    path = openvino_repository / UNET / "1" / "model.xml"
    static = CompiledGraph(ov.Core(), path, compile_config("fp32", None), STATIC, 1)
    dynamic = CompiledGraph(ov.Core(), path, compile_config("fp32", None), DYNAMIC)
    for tokens in (77, 154, 231):
        feeds = unet_feeds(2, 8, tokens=tokens)
        np.testing.assert_allclose(static(feeds)[0], dynamic(feeds)[0], atol=1e-5)
    assert static.compiled_shapes == [((2, 8, 8), (2,), (2,))] and len(static.compile_seconds) == 1


def test_an_ir_that_does_not_name_its_axes_is_refused(openvino_repository, tmp_path):
    """IRs from before the axes were named (or converted by hand) cannot be compiled per image size."""
    ir = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(openvino_repository / UNET / "onnx" / "model.onnx"), ir)
    with pytest.raises(ValueError, match="does not name its axes: rebuild it"):
        CompiledGraph(ov.Core(), ir, compile_config("fp32", None))


def test_dynamic_shapes_compile_once_and_agree_with_static(openvino_repository):
    path = openvino_repository / UNET / "1" / "model.xml"
    dynamic = CompiledGraph(ov.Core(), path, compile_config("fp32", None), DYNAMIC)
    static = CompiledGraph(ov.Core(), path, compile_config("fp32", None), STATIC)
    for batch, side in ((2, 8), (3, 12)):
        feeds = unet_feeds(batch, side)
        np.testing.assert_allclose(dynamic(feeds)[0], static(feeds)[0], atol=1e-5)
    assert dynamic.compiled_shapes == [()]


def _resident_bytes(path: Path) -> int:
    """The resident bytes of this process's memory maps of `path` (/proc/self/smaps)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


def test_the_irs_mapped_weights_are_given_back_after_the_first_run(openvino_repository, tmp_path):
    """The compiled model holds the weights in its own layout: the IR's mapped pages would count twice.
    (A copy of the IR: the kernel gives back only pages no other mapping holds, and this process has other
    engines on the repository's.)"""
    shutil.copytree(openvino_repository / UNET / "1", tmp_path / "unet")
    weights = tmp_path / "unet" / "model.bin"
    for shapes in (STATIC, DYNAMIC):
        graph = CompiledGraph(ov.Core(), weights.with_suffix(".xml"), compile_config("fp32", None), shapes)
        expected = graph(unet_feeds(2, 8))[0]
        assert _resident_bytes(weights) < 0.05 * weights.stat().st_size, shapes
        np.testing.assert_array_equal(graph(unet_feeds(2, 8))[0], expected)  # read again where needed


def test_releasing_activations_after_each_run_keeps_the_results(openvino_repository):
    path = openvino_repository / "vae_decoder" / "1" / "model.xml"
    graphs = [
        CompiledGraph(ov.Core(), path, compile_config("fp32", None), release_after_run=release)
        for release in (False, True)
    ]
    latent = {"latent": np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)}
    expected = graphs[0](latent)[0]
    for _ in range(2):  # the second run allocates again what the first gave back
        np.testing.assert_array_equal(graphs[1](latent)[0], expected)


def test_precision_is_explicit_and_checked():
    assert compile_config("fp32", None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config("bf16", None)["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(KeyError):
        compile_config("fp8", None)


def test_in_process_openvino_matches_onnx_runtime_at_several_sizes(openvino_repository, model_repository):
    """The same request on both CPU targets, at sizes the UNet compiles separately."""
    assets = PipelineAssets.load(openvino_repository / "pipeline" / "1")
    openvino = OpenVinoEngines(openvino_repository, assets.manifest.geometry, "fp32")
    onnx = OnnxRuntimeEngines(model_repository, assets.manifest.geometry)
    for width, height, images in ((64, 64, 1), (96, 64, 2)):
        request = GenerationRequest(
            prompt="a cat", width=width, height=height, num_inference_steps=3, seed=5, num_images=images
        )
        ours, theirs = generate(request, openvino, assets).images, generate(request, onnx, assets).images
        assert max_pixel_diff(ours, theirs) <= 1


def test_bf16_build_stores_fp16_weights_and_converts_correctly(openvino_repository, tmp_path):
    """A bf16 IR holds its weights in fp16 (half the file); run in f32 it is the fp32 IR within their
    rounding."""
    spec = engine_specs(PipelineAssets.load(openvino_repository / "pipeline" / "1").manifest.geometry)[UNET]
    onnx = tmp_path / "onnx"
    shutil.copytree(openvino_repository / UNET / "onnx", onnx)
    converted = openvino_engine.convert_engine(onnx / "model.onnx", spec, tmp_path / "bf16", "bf16")
    assert not converted.reused and converted.rel_error < openvino_engine.MAX_REL_ERROR["bf16"]
    fp32_bytes = (openvino_repository / UNET / "1" / "model.bin").stat().st_size
    assert (tmp_path / "bf16" / "model.bin").stat().st_size < 0.6 * fp32_bytes
    assert openvino_engine.convert_engine(onnx / "model.onnx", spec, tmp_path / "bf16", "bf16").reused


@NEEDS_BF16
def test_bf16_engines_run_in_bf16(openvino_repository):
    graph = CompiledGraph(
        ov.Core(), openvino_repository / UNET / "1" / "model.xml", compile_config("bf16", None)
    )
    feeds = unet_feeds(2, 8)
    graph(feeds)
    (compiled,) = graph._compiled.values()
    assert compiled.model.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


def test_native_backend_configs(tiny_checkpoint, tmp_path):
    repo = tmp_path / "native"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), "--target", "openvino"]
    assert build_cli.main([*args, *PROFILE_ARGS, "--openvino-backend", "native", "--precision", "bf16"]) == 0
    geometry = PipelineAssets.load(repo / "pipeline" / "1").manifest.geometry
    for engine, spec in engine_specs(geometry).items():
        config = repository.read_config(repo / engine)
        assert config.backend == "openvino" and config.max_batch_size == 0
        assert not (repo / engine / "1" / "model.py").exists()
        assert config.parameters["HINT_BF16"].string_value == "YES"
        model = ov.Core().read_model(repo / engine / "1" / "model.xml")
        # The config's dims are the IR's, batch axis included (max_batch_size 0).
        ir_inputs = {
            p.get_any_name(): [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()]
            for p in model.inputs
        }
        assert {t.name: list(t.dims) for t in config.input} == ir_inputs
        assert [t.name for t in config.output] == [t.name for t in spec.outputs]


def test_native_backend_refuses_lora(tiny_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "r"), "--target", "openvino"]
    with pytest.raises(SystemExit):
        build_cli.main([*args, "--openvino-backend", "native", "--lora"])
    assert "--openvino-backend native cannot run LoRA" in capsys.readouterr().err


def test_precision_options_belong_to_the_openvino_target(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_cli.main(
            ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--precision", "bf16"]
        )
    assert "options of --target openvino" in capsys.readouterr().err


def _with_precision(repo: Path, tmp_path: Path, precision: str) -> Path:
    """A copy of `repo` whose engine models are configured to compile at `precision` (what sd-serve reads)."""
    copy = tmp_path / f"repo-{precision}"
    shutil.copytree(repo, copy)
    for config in copy.glob("*/config.pbtxt"):
        if (config.parent / "1" / "model.xml").exists():
            config.write_text(
                config.read_text().replace('string_value: "fp32"', f'string_value: "{precision}"')
            )
    return copy


def test_sd_serve_refuses_bf16_engines_on_a_cpu_without_bf16(openvino_repository, tmp_path):
    bf16 = _with_precision(openvino_repository, tmp_path, "bf16")
    with pytest.raises(
        serve.ServeError,
        match=r"unet \(bf16\).* built for bf16 inference, which this CPU does not run .*AVX512_BF16",
    ):
        serve.check_openvino_precision(bf16, host_supports=lambda precision: precision != "bf16")
    assert serve.check_openvino_precision(bf16, host_supports=lambda precision: True) == []
    assert serve.check_openvino_precision(openvino_repository, host_supports=lambda p: p != "bf16") == []


def test_sd_serve_warns_of_fp32_on_the_native_backend_of_a_bf16_cpu(openvino_repository, tmp_path):
    native = tmp_path / "native"
    shutil.copytree(openvino_repository, native)
    config = native / UNET / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "python"', 'backend: "openvino"'))
    (warning,) = serve.check_openvino_precision(native, host_supports=lambda precision: True)
    assert warning.startswith(
        "unet: OpenVINO engines built for f32 inference (fp32, int8-hybrid) on Triton's"
    )
    assert "openvino backend run in bf16" in warning


@pytest.mark.skipif(BF16_HOST, reason="this CPU runs bf16")
def test_sd_serve_command_line_says_why_it_will_not_start(openvino_repository, tmp_path):
    from tests.triton_server import run_sd_serve

    bf16 = _with_precision(openvino_repository, tmp_path, "bf16")
    result = run_sd_serve("--model-repository", str(bf16))
    assert result.returncode == 1
    assert "were built for bf16 inference, which this CPU does not run" in result.stdout


def _stub_maps(server, model: str) -> str:
    from perf.compare import model_of_process, process_tree

    (pid,) = [p for p in process_tree(server.triton_pid()) if model_of_process(p) == model]
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.integration
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_models_only_some_requests_use_open_with_the_first_of_them(request, target):
    """A server whose clients send no images never loads the VAE encoder's runtime or weights: its process
    maps neither OpenVINO's nor ONNX Runtime's library until the first img2img request. And clients use one
    of the two pipeline models: each imports torch with its first request."""
    from client import StableDiffusionClient
    from tests.parity import png_bytes, smooth_picture
    from tests.triton_server import TritonServer

    repo = request.getfixturevalue("model_repository" if target == "onnx" else "openvino_repository")
    for model in ("vae_encoder", "pipeline", "pipeline_stream"):
        assert repository.read_config(repo / model).parameters["open_on_first_request"].string_value == "true"
    assert "open_on_first_request" not in repository.read_config(repo / "vae_decoder").parameters
    library = "libopenvino" if target == "openvino" else "onnxruntime"
    with TritonServer(repo) as server:
        assert "libtorch" not in _stub_maps(server, "pipeline")
        client = StableDiffusionClient(server.grpc_url)
        first = client.generate("a cat", steps=2, width=64, height=64, seed=1)
        assert library in _stub_maps(server, "vae_decoder")
        assert library not in _stub_maps(server, "vae_encoder")
        assert "libtorch" in _stub_maps(server, "pipeline")
        assert "libtorch" not in _stub_maps(server, "pipeline_stream")
        image = png_bytes(smooth_picture(64, 64))
        result = client.generate("a cat", steps=2, width=64, height=64, seed=1, image=image, strength=0.5)
        assert len(result.images) == 1
        assert library in _stub_maps(server, "vae_encoder")
        steps = []
        streamed = client.generate(
            "a cat", steps=2, width=64, height=64, seed=1, on_progress=lambda status, _: steps.append(status)
        )
        assert steps and steps[-1]["step"] == steps[-1]["total"]  # it streamed progress
        np.testing.assert_array_equal(np.asarray(streamed.images[0]), np.asarray(first.images[0]))


def test_openvino_sends_no_telemetry(openvino_repository, tmp_path):
    """OpenVINO's package phones home as it is imported, and again as it converts a model, unless told not
    to: our import of it must not, nor must a conversion (the build is offline)."""
    from tests.test_single_file import run_offline

    onnx = openvino_repository / "vae_decoder" / "onnx" / "model.onnx"
    code = (
        "import time; from python_backend.ov_sessions import ov; "
        f"ov.save_model(ov.convert_model({str(onnx)!r}), {str(tmp_path / 'model.xml')!r}); time.sleep(2)"
    )
    done = run_offline(tmp_path, code, who="OpenVINO")
    assert done.returncode == 0, done.stderr
