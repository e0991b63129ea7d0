"""build-engines on the tiny checkpoint: ONNX parity with torch, caching, and the configs it writes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import cli as build_cli
from build_engines import onnx_export, repository
from build_engines.digests import digest_folder
from python_backend import schedulers
from python_backend.request import CONTROL_INPUTS, REQUEST_INPUTS
from python_backend.shapes import ENGINE_NAMES, UNET, PipelineManifest, Profile, engine_specs
from tests.conftest import PROFILE_ARGS

ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT32: np.int32}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_onnx_matches_torch(model_repository, tiny_checkpoint, engine):
    geometry = onnx_export.read_geometry(tiny_checkpoint)
    module = onnx_export.ModuleLoader(tiny_checkpoint).module(engine)
    path = model_repository / engine / "1" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    diff = onnx_export.check_against_torch(engine_specs(geometry)[engine], module, path)
    assert diff < 1e-4
    recorded = json.loads((path.parent / "model.onnx.json").read_text())
    assert recorded["max_abs_diff"] < onnx_export.MAX_ABS_DIFF["fp32"]
    assert recorded["key"]["opset"] >= 17


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_config_matches_onnx_graph(model_repository, tiny_checkpoint, engine):
    config = repository.read_config(model_repository / engine)
    graph = onnx.load(str(model_repository / engine / "1" / "model.onnx"), load_external_data=False).graph
    for ours, theirs in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in ours] == [t.name for t in theirs]
        for tensor, value_info in zip(ours, theirs, strict=True):
            onnx_type = value_info.type.tensor_type
            expected_dtype = repository.TRITON_DTYPES[ONNX_TO_NUMPY[onnx_type.elem_type]]
            assert tensor.data_type == expected_dtype, tensor.name
            onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in onnx_type.shape.dim]
            assert [-1, *tensor.dims] == onnx_dims, tensor.name  # Triton owns the leading batch axis
    assert config.backend == "python"
    # --max-batch 4: the UNet takes 2 rows per image (guided), the text encoder 2 per prompt chunk (3 chunks).
    assert config.max_batch_size == {"text_encoder": 6, "unet": 8}.get(engine, 4)
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert config.HasField("dynamic_batching") == (engine == "unet")


def test_pipeline_config(model_repository):
    config = repository.read_config(model_repository / "pipeline")
    inputs = {t.name: t for t in config.input}
    assert list(inputs) == [*REQUEST_INPUTS, *CONTROL_INPUTS]
    assert [name for name, t in inputs.items() if not t.optional] == ["prompt"]
    assert all(list(t.dims) == [1] for t in inputs.values())
    assert inputs["seed"].data_type == mc.TYPE_INT64 and inputs["guidance_scale"].data_type == mc.TYPE_FP32
    outputs = {t.name: (t.data_type, list(t.dims)) for t in config.output}
    assert outputs == {"images": (mc.TYPE_UINT8, [-1, -1, -1, 3]), "info": (mc.TYPE_STRING, [1])}
    listing = json.loads(config.parameters["schedulers"].string_value)
    assert [s["name"] for s in listing if s.get("default")] == ["pndm"]
    assert {"name": "euler_a", "a1111": "Euler a"} in listing
    checkpoint = json.loads(config.parameters["checkpoint"].string_value)
    assert checkpoint["model"] == "tiny-sd" and len(checkpoint["model_hash"]) == 10
    # One instance generates --max-concurrent-requests requests at once (default --max-batch: that many
    # one-image requests fill the UNet's batch).
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert config.parameters["max_concurrent_requests"].string_value == "4"
    assert not config.response_cache.enable
    control = repository.read_config(model_repository / "pipeline_control")
    assert [(t.name, t.optional) for t in control.input] == [("job_id", False), ("action", True)]
    assert [t.name for t in control.output] == ["found"]


def test_concurrency_and_response_cache_options(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--max-size", "64"]
    assert build_cli.main([*args, "--max-concurrent-requests", "2", "--response-cache"]) == 0
    unary, stream = (repository.read_config(tmp_path / name) for name in ("pipeline", "pipeline_stream"))
    for config in (unary, stream):
        assert config.parameters["max_concurrent_requests"].string_value == "2"
    assert unary.response_cache.enable
    assert not stream.response_cache.enable  # Triton refuses a cache for decoupled models


def test_pipeline_manifest_and_assets(model_repository, tiny_checkpoint):
    version = model_repository / "pipeline" / "1"
    manifest = PipelineManifest.read(version / "pipeline.json")
    assert manifest.profile == Profile.square(64, 256, 256, max_batch=4)
    assert manifest.geometry == onnx_export.read_geometry(tiny_checkpoint)
    assert manifest.model_name == tiny_checkpoint.name
    assert (version / "tokenizer" / "vocab.json").exists()
    assert json.loads((version / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1


def test_rebuild_reuses_finished_work(model_repository, tiny_checkpoint, capsys):
    onnx_files = {e: model_repository / e / "1" / "model.onnx" for e in ENGINE_NAMES}
    before = {e: p.stat().st_mtime_ns for e, p in onnx_files.items()}
    assert (
        build_cli.main(
            ["--checkpoint", str(tiny_checkpoint), "--output", str(model_repository), *PROFILE_ARGS]
        )
        == 0
    )
    assert {e: p.stat().st_mtime_ns for e, p in onnx_files.items()} == before
    assert capsys.readouterr().out.count("up to date, kept") == len(ENGINE_NAMES)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.mark.parametrize("failure", ["export fails", "crash while writing the pipeline"])
def test_a_failed_build_leaves_the_repository_as_it_was(model_repository, tiny_checkpoint, tmp_path, failure):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    before = _files(repo)
    # A changed profile rewrites every config: the build would change files all over the repository.
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), "--max-size", "128"]
    with pytest.MonkeyPatch.context() as patch:
        if failure == "export fails":

            def fail_unet(spec, *rest, **kwargs):
                if spec.name == UNET:
                    raise onnx_export.ExportError("unet: ONNX Runtime differs from torch")
                return export_engine(spec, *rest, **kwargs)

            export_engine = onnx_export.export_engine
            patch.setattr(onnx_export, "export_engine", fail_unet)
            assert build_cli.main(args) == 1
        else:

            def disk_full(*args, **kwargs):
                raise OSError("disk full")

            patch.setattr(repository, "write_pipeline_model", disk_full)
            with pytest.raises(OSError, match="disk full"):
                build_cli.main(args)
    assert _files(repo) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no stage left behind


def test_a_rebuild_replaces_whole_models_and_keeps_exports_by_link(
    model_repository, tiny_checkpoint, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    (repo / UNET / "1" / "leftover.txt").write_text("from an older build")
    unet_onnx = (repo / UNET / "1" / "model.onnx").stat().st_ino
    manifest = repo / "pipeline" / "1" / "pipeline.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), "--max-size", "128"]
    assert PipelineManifest.read(manifest).profile.width[2] == 256
    assert build_cli.main(args) == 0
    assert (repo / UNET / "1" / "model.onnx").stat().st_ino == unet_onnx  # kept: linked, not exported again
    assert PipelineManifest.read(manifest).profile.width[2] == 128  # the new build's
    assert not (repo / UNET / "1" / "leftover.txt").exists()  # the model folder was replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_changed_weights_are_exported_again(tiny_checkpoint, tmp_path):
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))["text_encoder"]
    loader = onnx_export.ModuleLoader(tiny_checkpoint)
    first = onnx_export.export_engine(spec, lambda: loader.module("text_encoder"), "digest-a", tmp_path)
    again = onnx_export.export_engine(spec, lambda: loader.module("text_encoder"), "digest-a", tmp_path)
    changed = onnx_export.export_engine(spec, lambda: loader.module("text_encoder"), "digest-b", tmp_path)
    assert (first.reused, again.reused, changed.reused) == (False, True, False)


def test_digest_follows_file_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    first = digest_folder(tmp_path / "a")
    (tmp_path / "a" / "w.bin").write_bytes(b"124")
    assert digest_folder(tmp_path / "a") != first


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        build_cli.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "repo")])
    assert exited.value.code == 2
    assert "not a diffusers checkpoint folder: no model_index.json, unet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # nor a file of a checkpoint format
        build_cli.main(["--checkpoint", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "repo")])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-size", "60"], "width sizes must be positive multiples of 8"),
        (["--min-size", "512", "--max-size", "256"], "width sizes must satisfy min <= opt <= max"),
        (["--static", "512x500"], "height sizes must be positive multiples of 8"),
        (["--static", "512"], "--static must look like 512x768"),
        (["--max-batch", "0"], "1 <= opt_batch <= max_batch"),
        (["--max-concurrent-requests", "0"], "--max-concurrent-requests must be at least 1"),
    ],
)
def test_bad_profile_is_a_clear_error(tiny_checkpoint, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        build_cli.main(["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "repo"), *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_axis_ranges():
    ranges = Profile.square(64, 512, 1024, max_batch=4).axis_ranges()
    assert ranges["latent_height"] == (8, 64, 128)
    static = Profile.static(512, 768).axis_ranges()
    assert static["latent_width"] == (64, 64, 64) and static["height"] == (768, 768, 768)
    assert ranges["guided_batch"] == (1, 2, 8)
    assert ranges["text_sequence"] == (77, 77, 231)  # 3 prompt chunks by default
    assert ranges["text_rows"] == (1, 2, 6)  # a row per chunk of prompt and negative prompt


@pytest.mark.parametrize("max_batch", [1, 2, 8])
@pytest.mark.parametrize("chunks", [1, 3, 5])
def test_text_encoder_rows_follow_prompt_chunks_not_images(max_batch, chunks):
    """One text encoder call per request: a row per chunk of prompt and negative prompt, images or not."""
    ranges = Profile(max_batch=max_batch, max_prompt_chunks=chunks).axis_ranges()
    assert ranges["text_rows"] == (1, 2, 2 * chunks)
    assert ranges["guided_batch"][2] == 2 * max_batch


def test_models_past_the_protobuf_limit_keep_weights_in_one_external_file(
    tiny_checkpoint, tmp_path, monkeypatch
):
    # The full-size UNet (3.4 GB) takes this path; a tiny limit sends the tiny VAE decoder down it too.
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1024)
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))["vae_decoder"]
    loader = onnx_export.ModuleLoader(tiny_checkpoint)
    result = onnx_export.export_engine(spec, lambda: loader.module("vae_decoder"), "digest", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.onnx.json"]
    assert (tmp_path / "model.onnx").stat().st_size < (tmp_path / "model.onnx.data").stat().st_size
    assert result.max_abs_diff < 1e-4  # checked by loading through ONNX Runtime, external data included


@pytest.mark.parametrize("prefix", ["a/b", "..", "-x", "sd 1.5", "é"])
def test_prefix_must_be_a_safe_model_name(tiny_checkpoint, tmp_path, capsys, prefix):
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "repo"), f"--prefix={prefix}"]
    with pytest.raises(SystemExit) as exited:
        build_cli.main(args)
    assert exited.value.code == 2
    assert "--prefix must be letters, digits, '-' and '_'" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_unet_batch_delay_is_the_unet_batchers_window(tiny_checkpoint, tmp_path, capsys):
    specs = engine_specs(onnx_export.read_geometry(tiny_checkpoint))
    unet = repository.python_engine_config(specs["unet"], Profile(), unet_batch_delay_ms=12.5)
    assert unet.dynamic_batching.max_queue_delay_microseconds == 12500
    vae = repository.python_engine_config(specs["vae_decoder"], Profile(), unet_batch_delay_ms=12.5)
    assert not vae.HasField("dynamic_batching")  # the VAE and text encoder calls are one per request
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "repo")]
    with pytest.raises(SystemExit) as exited:
        build_cli.main([*args, "--unet-batch-delay", "-1"])
    assert exited.value.code == 2
    assert "--unet-batch-delay must be 0 to 1000 milliseconds, got -1.0" in capsys.readouterr().err


def test_prefixed_configs_name_their_models(tiny_checkpoint):
    geometry = onnx_export.read_geometry(tiny_checkpoint)
    unet = engine_specs(geometry)["unet"]
    config = repository.python_engine_config(unet, Profile(), prefix="sd15")
    assert config.name == "sd15_unet" and config.HasField("dynamic_batching")
    manifest = PipelineManifest(Profile(), geometry, "v1-5", prefix="sd15")
    default = schedulers.SCHEDULERS[0]
    names = [repository.pipeline_config(default, stream, manifest=manifest).name for stream in (False, True)]
    assert names == ["sd15_pipeline", "sd15_pipeline_stream"]
