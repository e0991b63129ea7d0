"""What the GPU image (deploy/docker/Dockerfile) installs, read statically (it is never built here): TensorRT
by its real packages, and the project without the bundled Triton the NGC image does not need."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_deploy import DOCKERFILES, dockerfile_args, final_stage, instructions

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _pip_install() -> str:
    [install] = [a for k, a in final_stage(DOCKERFILES["gpu"]) if k == "RUN" and "pip install" in a]
    return install


def test_tensorrt_is_installed_by_its_real_packages_as_wheels():
    install, version = _pip_install(), dockerfile_args(DOCKERFILES["gpu"])["TENSORRT_VERSION"]
    assert version == "10.8.0.43"  # the 25.01 image's TensorRT
    assert '"tensorrt-cu12-bindings==${TENSORRT_VERSION}"' in install
    assert '"tensorrt-cu12-libs==${TENSORRT_VERSION}"' in install
    # Not the tensorrt-cu12 sdist, whose dependencies depend on how pip was called.
    assert not re.search(r"\btensorrt-cu12==", install)
    # PyPI's tensorrt-cu12-libs is a stub sdist: only NVIDIA's wheels will do.
    assert "--only-binary tensorrt-cu12-bindings,tensorrt-cu12-libs" in install
    assert "--extra-index-url https://pypi.nvidia.com" in install


def test_gpu_image_has_no_second_tritonserver():
    install = _pip_install()
    [extras] = re.findall(r'-e "\.\[([\w,-]+)\]"', install)
    assert set(extras.split(",")) == {"runtime", "build"}
    declared = _extras()

    def closure(name: str) -> set[str]:
        """Every requirement an extra pulls, through sd-triton[...] references."""
        found: set[str] = set()
        for requirement in declared[name]:
            if nested := re.fullmatch(r"sd-triton\[([\w,-]+)\]", requirement):
                for inner in nested[1].split(","):
                    found |= closure(inner)
            else:
                found.add(re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0])
        return found

    assert not any("nvidia-pytriton" in closure(extra) for extra in extras.split(","))
    # ...while `serve` (the CPU image, the test suite) and `dev` keep the bundled server.
    assert "nvidia-pytriton" in closure("serve") and "nvidia-pytriton" in closure("dev")
    cpu_install = " ".join(
        a for k, a in instructions(DOCKERFILES["cpu"]) if k == "RUN" and "pip install" in a
    )
    assert '-e ".[serve,build]"' in cpu_install  # the CPU image serves with the bundled tritonserver
    assert "torch" in closure("runtime") and "onnx" in closure("build")
