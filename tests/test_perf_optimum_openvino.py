"""perf.compare's contestant (e), optimum-intel's OVStableDiffusionPipeline in its own venv and worker
process: one image on the tiny checkpoint, against diffusers' on the same weights, seed and scheduler.

The venv (perf/optimum_openvino.py: ≈1.5 min to make with a package registry, 1.6 GB, in
~/.cache/sd-triton/perf/optimum-intel-venv) is made on first use and kept; the test skips when it cannot be
made (no registry), or when SD_TRITON_SKIP_OPENVINO=1 asks. Each session exports the tiny checkpoint again
(a fresh folder): ≈1 min in all once the venv exists.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from perf import optimum_openvino as ov
from perf.compare import Settings, diffusers_eager, max_pixel_diff, optimum_openvino, process_tree

SKIP_ENV = "SD_TRITON_SKIP_OPENVINO"
# Measured on the tiny checkpoint, 64 px, 2 steps, seed 42: 1/255 (OpenVINO f32 against eager torch, the
# same weights and scheduler: only the kernels' float rounding differs). 3/255 leaves a margin for other
# CPUs' kernels; a text encoder with random weights or another scheduler moves pixels by far more.
MAX_DIFF = 3


@pytest.fixture(scope="module")
def venv() -> Path:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: optimum-intel's venv is not made or used")
    try:
        return ov.ensure_venv()
    except ov.OpenVinoError as e:
        pytest.skip(f"optimum-intel's venv ({ov.venv_dir()}) cannot be made (no package registry?): {e}")


def workers() -> list[int]:
    """This process's children running the worker script."""
    found = []
    for pid in process_tree(os.getpid())[1:]:
        with contextlib.suppress(OSError):
            if ov.WORKER.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def test_openvino_contestant_makes_diffusers_image(
    venv: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The exported IR of this session's checkpoint in tmp_path, not in the user's cache.
    monkeypatch.setattr(ov, "export_cache_dir", lambda: tmp_path / "openvino")
    s = Settings(tiny_checkpoint, 64, 2, 1, 42, 7.5, "a photo of an astronaut riding a horse on mars", None)
    with contextlib.ExitStack() as stack:
        m = optimum_openvino(s, "fp32", stack)
        assert not m.skipped, m.skipped
        assert m.call is not None
        image = m.call()
        assert "UNet compiled at f32" in m.note, m.note
        assert len(workers()) == 1
    assert workers() == []  # the run's end stops the worker

    reference = diffusers_eager(s).call
    assert reference is not None
    expected = reference()
    assert image.dtype == np.uint8 and image.shape == (1, 64, 64, 3)
    diff = max_pixel_diff(image, expected)
    assert diff <= MAX_DIFF, f"{diff}/255 from diffusers' image"
