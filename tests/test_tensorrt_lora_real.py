"""LoRA on the real TensorRT target: runs only where TensorRT and a GPU exist (never on CI machines). The same
build and hosting code is tested on CPU against a stand-in for TensorRT in tests/test_tensorrt_lora.py (its
stand-in lives in that module's fixtures, so these tests live apart from it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from build_engines import cli as build_cli
from python_backend.ort_sessions import EngineSessions
from python_backend.shapes import TEXT_ENCODER, UNET
from python_backend.trt_sessions import PlanSessions
from tests.conftest import PROFILE_ARGS
from tests.test_tensorrt_lora import MAX_RANK, _set, tensorrt_build, write_loras
from tests.test_tensorrt_target import REAL_TENSORRT_REASON, _tensorrt_present


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_loras(tmp_path_factory.mktemp("trt-loras"), tiny_checkpoint)


@pytest.fixture(scope="module")
def real_plan_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _tensorrt_present():
        pytest.skip(REAL_TENSORRT_REASON)
    repo = tmp_path_factory.mktemp("trt-lora-real") / "repo"
    assert (
        build_cli.main(tensorrt_build(tiny_checkpoint, repo, "--lora", "--lora-max-rank", str(MAX_RANK))) == 0
    )
    return repo


def test_real_branch_plans_match_onnx_runtime_row_by_row(
    real_plan_repository, tiny_checkpoint, lora_dir, tmp_path
):
    """The real plans, with rows of no LoRA, one and two in one run, against ONNX Runtime's fp32 graphs of an
    onnx --lora build, within the fp16 engines' tolerance (tests/test_tensorrt_target.py)."""
    onnx_repo = tmp_path / "onnx-repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(onnx_repo), *PROFILE_ARGS, "--lora"]
    assert build_cli.main(args) == 0
    keys = [
        "",
        _set(lora_dir, ("ink.safetensors", 0.8)),
        _set(lora_dir, ("ink.safetensors", 1.0), ("paper.safetensors", -0.5)),
    ]
    rng = np.random.default_rng(0)
    unet_feeds = {
        "sample": rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([[10.0], [500.0], [900.0]], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, 32)).astype(np.float32),
    }
    text_feeds = {
        "input_ids": np.tile(np.arange(77, dtype=np.int32), (3, 1)),
        "clip_skip": np.ones((3, 1), np.int32),
    }
    for engine, feeds, limit in ((UNET, unet_feeds, 2e-2), (TEXT_ENCODER, text_feeds, 1e-3)):
        gpu = PlanSessions(real_plan_repository / engine / "1", torch.device("cuda"), engine, lora_dir)
        cpu = EngineSessions(onnx_repo / engine / "1", engine, lora_dir)
        np.testing.assert_allclose(gpu.run(feeds, keys)[0], cpu.run(feeds, keys)[0], atol=limit, rtol=1e-2)
        np.testing.assert_allclose(
            gpu.run(feeds, [""] * 3)[0], cpu.run(feeds, [""] * 3)[0], atol=limit, rtol=1e-2
        )


def test_real_served_lora_images_match_diffusers_with_them_fused(
    real_plan_repository, tiny_checkpoint, lora_dir
):
    import shutil

    from client import StableDiffusionClient
    from tests.parity import max_pixel_diff
    from tests.test_lora_serving import PROMPT, SCHEDULER, SEED, SIZE, STEPS, _fused_reference
    from tests.triton_server import TritonServer

    server_binary = shutil.which("tritonserver")
    if server_binary is None or not (Path(server_binary).parents[1] / "backends" / "tensorrt").is_dir():
        pytest.skip("needs tritonserver with the TensorRT backend on PATH (the NGC container)")
    tags = "<lora:ink:0.6> <lora:paper:-0.4:0.9>"
    with TritonServer(real_plan_repository, serve_args=["--lora-dir", str(lora_dir)]) as server:
        result = StableDiffusionClient(server.grpc_url).generate(
            f"{PROMPT} {tags}", width=SIZE, height=SIZE, steps=STEPS, scheduler=SCHEDULER[0], seed=SEED
        )
    expected = _fused_reference(
        tiny_checkpoint,
        lora_dir,
        f"{PROMPT} {tags}",
        {"ink.safetensors": (0.6, 0.6), "paper.safetensors": (-0.4, 0.9)},
    )
    # fp16 UNet: as the real plain-engine test (tests/test_tensorrt_target.py), a few levels.
    assert max_pixel_diff(np.asarray(result.images[0])[None], expected[None]) <= 8
