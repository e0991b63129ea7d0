"""build-engines --target openvino --precision int8-hybrid (build_engines/openvino_int8.py): what NNCF makes
of each IR, the calibration on our own fp32 pipeline, reuse of the IRs, the options' checks, serving's view
of the precision and NNCF's telemetry. Its images are judged by the int8 quality budget
(tests/test_quality_budget.py)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from build_engines import cli as build_cli
from build_engines import openvino_engine, openvino_int8, repository
from python_backend.engines import OpenVinoEngines
from python_backend.ov_sessions import INFERENCE_PRECISION, CompiledGraph, compile_config, host_supports, ov
from python_backend.pipeline import PipelineAssets
from python_backend.shapes import ENGINE_NAMES, TEXT_ENCODER, UNET, VAE_DECODER, engine_specs
from services import serve
from tests.conftest import INT8_ARGS, PROFILE_ARGS


def op_types(model: ov.Model) -> list[str]:
    return [op.get_type_name() for op in model.get_ops()]


def fp32_weight_ops(model: ov.Model) -> list[str]:
    """Ops that still take an fp32 weight (a constant of 2 or more dims) as it is."""
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() in ("MatMul", "Convolution", "Gather")
        and any(
            port.get_node().get_type_name() == "Constant"
            and port.get_element_type() == ov.Type.f32
            and len(port.get_shape()) >= 2
            for port in op.input_values()
        )
    ]


def int8_constants(model: ov.Model) -> int:
    return sum(
        op.get_type_name() == "Constant" and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8)
        for op in model.get_ops()
    )


def test_the_unet_gets_int8_activations_in_its_convolutions_and_every_weight_is_int8(int8_repository):
    core = ov.Core()
    for engine in ENGINE_NAMES:
        model = core.read_model(int8_repository / engine / "1" / "model.xml")
        assert not fp32_weight_ops(model), engine  # every weight compressed
        assert int8_constants(model) > 0, engine
        config = repository.read_config(int8_repository / engine)
        assert config.parameters["precision"].string_value == "int8-hybrid"
        if engine != UNET:  # weight-only: no activation quantizers
            assert "FakeQuantize" not in op_types(model), engine
    unet = core.read_model(int8_repository / UNET / "1" / "model.xml")
    convolutions = [op for op in unet.get_ops() if op.get_type_name() == "Convolution"]
    quantized = [op for op in convolutions if op.input_value(0).get_node().get_type_name() == "FakeQuantize"]
    assert len(quantized) > len(convolutions) / 2
    # Attention's products of activations are quantized; the projections and feed-forward layers (their
    # MatMuls, with int8 weights) keep fp32 activations: no quantizer feeds a MatMul.
    attention = [op for op in unet.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert attention and all(
        op.input_value(0).get_node().get_type_name() == "FakeQuantize" for op in attention
    )
    for op in unet.get_ops():
        if op.get_type_name() == "MatMul":
            assert all(p.get_node().get_type_name() != "FakeQuantize" for p in op.input_values())
    # Half the fp32 weights' bytes and less (int8 plus scales and zero points).
    fp32_bytes = sum(p.stat().st_size for p in (int8_repository / UNET / "onnx").glob("model.onnx*"))
    assert (int8_repository / UNET / "1" / "model.bin").stat().st_size < 0.4 * fp32_bytes


def test_the_sidecars_record_the_compression_and_the_check_error(int8_repository):
    limit = openvino_engine.MAX_REL_ERROR["int8-hybrid"]
    for engine in ENGINE_NAMES:
        record = json.loads((int8_repository / engine / "1" / "model.xml.json").read_text())
        key = record["key"]
        assert key["precision"] == "int8-hybrid" and key["compression"]["weights"] == "int8_asym"
        assert 0 < record["rel_error"] <= limit
        calibration = key["compression"].get("calibration")
        assert (calibration is not None) == (engine == UNET)
    unet = json.loads((int8_repository / UNET / "1" / "model.xml.json").read_text())["key"]
    calibration = unet["compression"]["calibration"]
    assert calibration["samples"] == 4 and calibration["size"] == [256, 256] and calibration["steps"] == 4
    text_encoder = json.loads((int8_repository / TEXT_ENCODER / "onnx" / "model.onnx.json").read_text())
    assert calibration[TEXT_ENCODER] == text_encoder["key"]  # its embeddings are what the UNet saw
    assert not (int8_repository / ".openvino-fp32").exists()  # the calibration's fp32 IRs are gone


def test_a_rebuild_keeps_the_irs_and_redoes_only_the_unet_when_the_calibration_changes(
    int8_repository, tiny_checkpoint, tmp_path, capsys
):
    repo = tmp_path / "repo"
    shutil.copytree(int8_repository, repo)
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *INT8_ARGS, *PROFILE_ARGS]
    capsys.readouterr()
    assert build_cli.main(args) == 0
    assert capsys.readouterr().out.count("int8-hybrid IR up to date, kept") == len(ENGINE_NAMES)

    assert build_cli.main([*args, "--calibration-samples", "5"]) == 0
    out = capsys.readouterr().out
    assert "unet: OpenVINO int8-hybrid IR converted" in out
    assert out.count("int8-hybrid IR up to date, kept") == len(ENGINE_NAMES) - 1
    record = json.loads((repo / UNET / "1" / "model.xml.json").read_text())
    assert record["key"]["compression"]["calibration"]["samples"] == 5


def test_calibration_records_the_unet_inputs_of_the_fp32_pipeline_across_the_schedule(openvino_repository):
    """Only the text encoder and UNet are opened: the VAE never runs (each request stops after its last
    step)."""
    assets = PipelineAssets.load(openvino_repository / "pipeline" / "1")
    engines = OpenVinoEngines(
        openvino_repository, assets.manifest.geometry, "fp32", only=[TEXT_ENCODER, UNET]
    )
    calibration = openvino_int8.Calibration(samples=6, width=64, height=96)
    feeds = openvino_int8.record_unet_feeds(engines, assets, calibration)

    assert len(feeds) == 6
    assert {name: feeds[0][name].shape for name in feeds[0]} == {
        "sample": (2, 4, 12, 8),  # guided: unconditional and prompt rows
        "timestep": (2, 1),
        "encoder_hidden_states": (2, 77, 32),
    }
    timesteps = [float(f["timestep"][0, 0]) for f in feeds]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] > 800 and timesteps[-1] < 200
    assert not np.array_equal(feeds[0]["sample"], feeds[1]["sample"])  # a copy of each step's latents
    # More samples than one prompt's steps: the next prompt, from noise again.
    more = openvino_int8.record_unet_feeds(engines, assets, openvino_int8.Calibration(25, 64, 64))
    timesteps = [float(f["timestep"][0, 0]) for f in more]
    (restart,) = [i for i in range(1, len(more)) if timesteps[i] > timesteps[i - 1]]
    assert len(more) == 25 and restart >= 20 and timesteps[restart] > 900


def test_only_the_unets_plain_graph_is_calibrated_lora_branch_graphs_get_int8_weights_only(
    int8_repository, tmp_path
):
    """A LoRA branch graph's factors are run-time inputs: its activations are not calibrated (build-engines
    --lora with int8-hybrid; the text encoder then has only its branch graph, still the calibration's)."""
    geometry = PipelineAssets.load(int8_repository / "pipeline" / "1").manifest.geometry
    specs = engine_specs(geometry)

    def graph(engine: str, branches: bool = False) -> openvino_int8.Graph:
        onnx = int8_repository / engine / "onnx" / "model.onnx"
        return openvino_int8.Graph(engine, onnx, specs[engine], tmp_path / engine, branches)

    text_encoder, unet, branched = graph(TEXT_ENCODER, True), graph(UNET), graph(UNET, True)
    assets = PipelineAssets.load(int8_repository / "pipeline" / "1")
    converter = openvino_int8.Int8Converter(
        [text_encoder, unet, branched], openvino_int8.Calibration(4, 256, 256), assets, tmp_path / "scratch"
    )
    assert [g.calibrated for g in (text_encoder, unet, branched)] == [False, True, False]
    weights_only = converter.compression(branched).key
    assert weights_only["weights"] == "int8_asym" and "calibration" not in weights_only
    assert converter.compression(text_encoder).key == weights_only
    assert converter.compression(unet).key["calibration"]["samples"] == 4
    with pytest.raises(ValueError, match="calibration needs the text encoder's and the UNet's graphs"):
        openvino_int8.Int8Converter([text_encoder, branched], openvino_int8.Calibration(), assets, tmp_path)


def test_calibration_settings_are_checked_and_keyed():
    with pytest.raises(ValueError, match="calibration samples must be at least 1, got 0"):
        openvino_int8.Calibration(samples=0)
    base = openvino_int8.Calibration(8, 256, 256).key()
    assert openvino_int8.Calibration(8, 256, 256).key() == base
    assert openvino_int8.Calibration(9, 256, 256).key() != base
    assert openvino_int8.Calibration(8, 256, 320).key() != base


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--precision", "int8-hybrid", "--calibration-samples", "0"],
            "--calibration-samples must be at least 1",
        ),
        (["--calibration-samples", "8"], "--calibration-samples is an option of --precision int8-hybrid"),
        (
            ["--precision", "int8-hybrid", "--controlnet", "canny=/nowhere"],
            "--precision int8-hybrid does not take --controlnet",
        ),
    ],
)
def test_cli_refuses_nonsense_naming_the_option(tiny_checkpoint, tmp_path, capsys, extra, message):
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "r"), "--target", "openvino"]
    with pytest.raises(SystemExit):
        build_cli.main([*args, *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_without_nncf_the_build_says_what_to_install(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # None in sys.modules: `import nncf` fails
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "r"), "--target", "openvino"]
    with pytest.raises(SystemExit):
        build_cli.main([*args, "--precision", "int8-hybrid"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "--precision int8-hybrid needs NNCF" in line and 'pip install -e ".[build]"' in line


def test_int8_hybrid_compiles_with_an_f32_hint_and_runs_on_any_openvino_cpu(int8_repository):
    assert compile_config("int8-hybrid", None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert host_supports("int8-hybrid")
    assert "INT8" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert serve.check_openvino_precision(int8_repository, host_supports=lambda p: p != "bf16") == []


def test_int8_hybrid_bf16_is_the_int8_hybrid_ir_compiled_with_a_bf16_hint(
    int8_repository, tiny_checkpoint, tmp_path, capsys
):
    """--precision int8-hybrid-bf16: the same calibration makes the same IRs, so a repository rebuilt from
    int8-hybrid keeps them; only the engine models' precision, so their compile hint, changes. sd-serve
    refuses it on a CPU without bf16, and Triton's openvino backend is given HINT_BF16."""
    repo = tmp_path / "repo"
    shutil.copytree(int8_repository, repo)
    bf16_args = [arg if arg != "int8-hybrid" else "int8-hybrid-bf16" for arg in INT8_ARGS]
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *bf16_args, *PROFILE_ARGS]
    capsys.readouterr()
    assert build_cli.main(args) == 0
    assert capsys.readouterr().out.count("int8-hybrid IR up to date, kept") == len(ENGINE_NAMES)
    for engine in ENGINE_NAMES:
        config = repository.read_config(repo / engine)
        assert config.parameters["precision"].string_value == "int8-hybrid-bf16"
        key = json.loads((repo / engine / "1" / "model.xml.json").read_text())["key"]
        assert key["precision"] == "int8-hybrid"
    assert compile_config("int8-hybrid-bf16", None)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert host_supports("int8-hybrid-bf16") == host_supports("bf16")

    without_bf16 = lambda precision: INFERENCE_PRECISION[precision] != "bf16"  # noqa: E731
    with pytest.raises(serve.ServeError, match=r"unet \(int8-hybrid-bf16\).* built for bf16 inference"):
        serve.check_openvino_precision(repo, host_supports=without_bf16)
    assert serve.check_openvino_precision(repo, host_supports=lambda precision: True) == []
    assert serve.check_openvino_precision(int8_repository, host_supports=without_bf16) == []

    geometry = PipelineAssets.load(repo / "pipeline" / "1").manifest.geometry
    native = repository.openvino_native_config(engine_specs(geometry)[UNET], "int8-hybrid-bf16")
    assert native.parameters["HINT_BF16"].string_value == "YES"


@pytest.mark.skipif(not host_supports("bf16"), reason="this CPU has neither AVX512_BF16 nor AMX")
def test_int8_hybrid_bf16_engines_run_their_other_ops_in_bf16(int8_repository):
    """The int8 IR compiled for int8-hybrid-bf16 gets OpenVINO's bf16 hint, and so other outputs than at
    int8-hybrid (f32); both are judged by the int8 budget (tests/test_quality_budget.py)."""
    latent = {"latent": np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)}
    outputs = {}
    for precision, hint in (("int8-hybrid", ov.Type.f32), ("int8-hybrid-bf16", ov.Type.bf16)):
        path = int8_repository / VAE_DECODER / "1" / "model.xml"
        graph = CompiledGraph(ov.Core(), path, compile_config(precision, None))
        outputs[precision] = graph(latent)[0]
        (compiled,) = graph._compiled.values()
        assert compiled.model.get_property("INFERENCE_PRECISION_HINT") == hint
    assert not np.array_equal(outputs["int8-hybrid"], outputs["int8-hybrid-bf16"])


def test_native_backend_configs_of_int8_hybrid_leave_the_hint_to_openvino(int8_repository, tmp_path):
    """Triton's openvino backend takes no f32 hint: like fp32, the IR's unquantized ops run in OpenVINO's
    default precision there (bf16 on a CPU with it: sd-serve warns)."""
    geometry = PipelineAssets.load(int8_repository / "pipeline" / "1").manifest.geometry
    config = repository.openvino_native_config(engine_specs(geometry)[UNET], "int8-hybrid")
    assert config.backend == "openvino" and "HINT_BF16" not in config.parameters
    native = tmp_path / "native"
    shutil.copytree(int8_repository, native)
    unet = native / UNET / "config.pbtxt"
    unet.write_text(unet.read_text().replace('backend: "python"', 'backend: "openvino"'))
    (warning,) = serve.check_openvino_precision(native, host_supports=lambda precision: True)
    assert warning.startswith("unet: OpenVINO engines built for f32 inference (fp32, int8-hybrid)")


def test_the_int8_check_against_onnx_runtime_fails_a_broken_quantization(int8_repository, tmp_path):
    """The conversion check's int8 limit passes the IR NNCF made and fails a broken one (its int8 weights
    zeroed)."""
    spec = engine_specs(PipelineAssets.load(int8_repository / "pipeline" / "1").manifest.geometry)[
        VAE_DECODER
    ]
    onnx = int8_repository / VAE_DECODER / "onnx" / "model.onnx"
    ir = int8_repository / VAE_DECODER / "1" / "model.xml"
    limit = openvino_engine.MAX_REL_ERROR["int8-hybrid"]
    assert openvino_engine.check_against_onnx(spec, ir, onnx) <= limit
    model = ov.Core().read_model(ir)
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.u8:
            zeros = np.zeros(op.get_output_shape(0), np.uint8)
            op.output(0).replace(ov.op.Constant(zeros).output(0))
    ov.save_model(model, tmp_path / "model.xml", compress_to_fp16=False)
    assert openvino_engine.check_against_onnx(spec, tmp_path / "model.xml", onnx) > limit


def test_nncf_sends_no_telemetry(openvino_repository, tmp_path):
    """NNCF reports usage through OpenVINO's telemetry package as it compresses a model (it does, to
    Google Analytics, imported on its own): through our module it must not."""
    from tests.test_single_file import run_offline

    ir = openvino_repository / VAE_DECODER / "1" / "model.xml"
    code = (
        "import time; from build_engines.openvino_int8 import compress_weights; "
        "from python_backend.ov_sessions import ov; "
        f"compress_weights(ov.Core().read_model({str(ir)!r})); time.sleep(2)"
    )
    done = run_offline(tmp_path, code, who="NNCF")
    assert done.returncode == 0, done.stderr
