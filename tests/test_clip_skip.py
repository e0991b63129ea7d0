"""clip_skip (A1111's: 1 = the last layer, 2 = the penultimate) inside the exported text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPTextModel
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import onnx_export, repository
from python_backend.engines import OnnxRuntimeEngines
from python_backend.shapes import (
    PIPELINE_MANIFEST,
    TEXT_ENCODER,
    TOKENS_PER_CHUNK,
    PipelineManifest,
    Profile,
    engine_specs,
)

BATCH = 3


@pytest.fixture(scope="module")
def text_encoder(tiny_checkpoint: Path) -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(tiny_checkpoint, subfolder="text_encoder").eval()


@pytest.fixture(scope="module")
def session(model_repository: Path) -> ort.InferenceSession:
    path = model_repository / TEXT_ENCODER / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def input_ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 49406, size=(BATCH, TOKENS_PER_CHUNK), dtype=np.int32)


def _expected(text_encoder: CLIPTextModel, input_ids: np.ndarray, clip_skip: int) -> np.ndarray:
    """A1111's definition, from torch: layer L - clip_skip + 1's output through the final layer norm."""
    with torch.inference_mode():
        out = text_encoder(torch.from_numpy(input_ids).long(), output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state.numpy()
        # transformers 4 keeps the norm under `text_model`, transformers 5 on the model itself.
        norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        return norm(out.hidden_states[-clip_skip]).numpy()


def _run(session: ort.InferenceSession, input_ids: np.ndarray, clip_skip: list[int]) -> np.ndarray:
    skip = np.array(clip_skip, dtype=np.int32).reshape(-1, 1)
    return session.run(["last_hidden_state"], {"input_ids": input_ids, "clip_skip": skip})[0]


def test_tiny_text_encoder_has_two_layers(tiny_checkpoint):
    assert onnx_export.read_geometry(tiny_checkpoint).text_layers == 2


def test_clip_skip_1_is_the_last_hidden_state(session, text_encoder, input_ids):
    got = _run(session, input_ids, [1] * BATCH)
    assert np.max(np.abs(got - _expected(text_encoder, input_ids, 1))) < 1e-5


def test_clip_skip_2_is_the_penultimate_layer_normed(session, text_encoder, input_ids):
    got = _run(session, input_ids, [2] * BATCH)
    expected = _expected(text_encoder, input_ids, 2)
    assert np.max(np.abs(got - expected)) < 1e-5
    assert np.max(np.abs(expected - _expected(text_encoder, input_ids, 1))) > 1e-2  # a different layer


def test_one_batch_mixes_clip_skip_values(session, text_encoder, input_ids):
    skips = [2, 1, 2]
    got = _run(session, input_ids, skips)
    for row, skip in enumerate(skips):
        expected = _expected(text_encoder, input_ids[row : row + 1], skip)[0]
        assert np.max(np.abs(got[row] - expected)) < 1e-5, f"row {row}, clip_skip {skip}"


def test_engines_send_clip_skip_for_every_row(model_repository, tiny_checkpoint, text_encoder, input_ids):
    geometry = onnx_export.read_geometry(tiny_checkpoint)
    engines = OnnxRuntimeEngines(model_repository, geometry)
    ids = torch.from_numpy(input_ids)
    assert torch.equal(engines.encode_text(ids), engines.encode_text(ids, clip_skip=1))
    got = engines.encode_text(ids, clip_skip=2).numpy()
    assert np.max(np.abs(got - _expected(text_encoder, input_ids, 2))) < 1e-5


def test_export_check_samples_valid_clip_skip_values(tiny_checkpoint):
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[TEXT_ENCODER]
    skip = onnx_export.sample_inputs(spec, onnx_export.CHECK_SIZES, seed=1)["clip_skip"]
    assert skip.shape == (onnx_export.CHECK_SIZES["text_rows"], 1) and skip.dtype == np.int32
    assert set(skip.ravel()) == {1, 2}  # the export check compares both layers against torch


def test_configs_declare_clip_skip_per_row(model_repository, tiny_checkpoint):
    spec = engine_specs(onnx_export.read_geometry(tiny_checkpoint))[TEXT_ENCODER]
    onnx_runtime = repository.read_config(model_repository / TEXT_ENCODER)
    tensorrt = repository.tensorrt_engine_config(spec, Profile())
    for config in (onnx_runtime, tensorrt):  # Triton owns the batch axis: one layer index per row
        assert config.max_batch_size > 0
        assert {t.name: list(t.dims) for t in config.input}["clip_skip"] == [1]
    assert all(t.data_type == mc.TYPE_INT32 for t in (*onnx_runtime.input, *tensorrt.input))


def test_the_layer_is_picked_inside_the_graph(model_repository):
    graph = onnx.load(str(model_repository / TEXT_ENCODER / "1" / "model.onnx")).graph
    assert "GatherElements" in {node.op_type for node in graph.node}


def test_manifests_written_before_clip_skip_still_read(model_repository, tmp_path):
    data = json.loads((model_repository / "pipeline" / "1" / PIPELINE_MANIFEST).read_text())
    del data["geometry"]["text_layers"]
    (tmp_path / PIPELINE_MANIFEST).write_text(json.dumps(data))
    assert PipelineManifest.read(tmp_path / PIPELINE_MANIFEST).geometry.text_layers == 12  # SD v1.x's CLIP
