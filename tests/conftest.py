"""Shared fixtures: one tiny checkpoint and one model repository built from it, per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engines import cli as build_cli
from build_engines.tiny_checkpoint import write_tiny_checkpoint
from python_backend.engines import Engines, OnnxRuntimeEngines, OpenVinoEngines
from python_backend.pipeline import PipelineAssets

# Small enough to be quick on 2 cores, large enough for a non-square size above the minimum.
PROFILE_ARGS = ["--min-size", "64", "--max-size", "256", "--max-batch", "4"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repository") / "repo"
    assert build_cli.main(["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS]) == 0
    return repo


CPU_TARGETS = ["onnx", "openvino"]  # what fixtures that run a test on both CPU targets are parametrized with


def cpu_repository(request: pytest.FixtureRequest) -> Path:
    """The tiny checkpoint's repository for the CPU target a fixture is parametrized with (CPU_TARGETS)."""
    return request.getfixturevalue("model_repository" if request.param == "onnx" else "openvino_repository")


@pytest.fixture(scope="session")
def openvino_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint built for the openvino target (fp32)."""
    repo = tmp_path_factory.mktemp("repository") / "openvino"
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(repo),
        "--target",
        "openvino",
        *PROFILE_ARGS,
    ]
    assert build_cli.main(args) == 0
    return repo


# Few calibration samples keep the int8 build quick; they still span the schedule (openvino_int8.Calibration).
INT8_ARGS = ["--target", "openvino", "--precision", "int8-hybrid", "--calibration-samples", "4"]


@pytest.fixture(scope="session")
def int8_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint built for the openvino target at --precision int8-hybrid."""
    repo = tmp_path_factory.mktemp("repository") / "openvino-int8"
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *INT8_ARGS, *PROFILE_ARGS]
    assert build_cli.main(args) == 0
    return repo


@pytest.fixture(scope="session")
def tiny_inpainting_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("checkpoint") / "tiny-sd-inpainting", inpainting=True
    )


@pytest.fixture(scope="session")
def inpainting_repository(tiny_inpainting_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repository") / "inpainting"
    args = ["--checkpoint", str(tiny_inpainting_checkpoint), "--output", str(repo), *PROFILE_ARGS]
    assert build_cli.main(args) == 0
    return repo


@pytest.fixture(scope="session")
def assets(model_repository: Path) -> PipelineAssets:
    """The tiny repository's pipeline assets (tokenizer, scheduler config, manifest) for the core."""
    return PipelineAssets.load(model_repository / "pipeline" / "1")


@pytest.fixture(scope="session", params=CPU_TARGETS)
def engines(request: pytest.FixtureRequest, assets: PipelineAssets) -> Engines:
    """The tiny checkpoint's engines in this process: the onnx target's on ONNX Runtime sessions, and the
    openvino target's on OpenVINO (fp32), so that every test of the core runs on both."""
    if request.param == "onnx":
        return OnnxRuntimeEngines(cpu_repository(request), assets.manifest.geometry)
    return OpenVinoEngines(cpu_repository(request), assets.manifest.geometry, "fp32")
