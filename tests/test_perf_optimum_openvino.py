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
import re
from pathlib import Path

import numpy as np
import pytest

from perf import optimum_openvino as ov
from perf.compare import (
    Measurement,
    Settings,
    diffusers_eager,
    max_pixel_diff,
    optimum_openvino,
    process_tree,
)
from perf.quality import psnr_ssim
from python_backend.ov_sessions import host_supports

SKIP_ENV = "SD_TRITON_SKIP_OPENVINO"
# Measured on the tiny checkpoint, 64 px, 2 steps, seed 42: 1/255 (OpenVINO f32 against eager torch, the
# same weights and scheduler: only the kernels' float rounding differs). 3/255 leaves a margin for other
# CPUs' kernels; a text encoder with random weights or another scheduler moves pixels by far more.
MAX_DIFF = 3
# Measured 37.3 dB (int8-hybrid on 4 samples against diffusers' fp32 image, the settings below): the int8
# budget's tiny floor (perf/quality.py, 32 dB) leaves room for other CPUs and calibrations.
MIN_INT8_PSNR = 32.0


@pytest.fixture(scope="module")
def venv() -> Path:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: optimum-intel's venv is not made or used")
    try:
        return ov.ensure_venv()
    except ov.OpenVinoError as e:
        pytest.skip(f"optimum-intel's venv ({ov.venv_dir()}) cannot be made (no package registry?): {e}")


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported IRs of this session's checkpoint: in a folder of this module, not in the user's cache."""
    return tmp_path_factory.mktemp("optimum-intel")


def workers() -> list[int]:
    """This process's children running the worker script."""
    found = []
    for pid in process_tree(os.getpid())[1:]:
        with contextlib.suppress(OSError):
            if ov.WORKER.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


PROMPT = "a photo of an astronaut riding a horse on mars"


def contestant_image(s: Settings, precision: str) -> tuple[Measurement, np.ndarray]:
    """Contestant (e) at `precision` and its image; its worker runs only while the run's stack is open."""
    with contextlib.ExitStack() as stack:
        m = optimum_openvino(s, precision, stack)
        assert not m.skipped, m.skipped
        assert m.call is not None
        image = m.call()
        assert len(workers()) == 1
    assert workers() == []  # the run's end stops the worker
    assert image.dtype == np.uint8 and image.shape == (1, s.size, s.size, 3)
    return m, image


def diffusers_image(s: Settings) -> np.ndarray:
    reference = diffusers_eager(s).call
    assert reference is not None
    return reference()


def test_openvino_contestant_makes_diffusers_image(
    venv: Path, tiny_checkpoint: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ov, "export_cache_dir", lambda: export_cache)
    s = Settings(tiny_checkpoint, 64, 2, 1, 42, 7.5, PROMPT, None)
    m, image = contestant_image(s, "fp32")
    assert "UNet compiled at f32" in m.note, m.note
    diff = max_pixel_diff(image, diffusers_image(s))
    assert diff <= MAX_DIFF, f"{diff}/255 from diffusers' image"


def test_int8_hybrid_contestant_is_optimum_intels_hybrid_quantization(
    venv: Path, tiny_checkpoint: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(e) at int8-hybrid: the exported IR quantized by optimum-intel itself (its UNet gets FakeQuantize ops,
    which an fp32 export has none of), compiled with the f32 hint as ours is, and still near diffusers' fp32
    image, as the int8 budget asks of ours."""
    monkeypatch.setattr(ov, "export_cache_dir", lambda: export_cache)
    s = Settings(tiny_checkpoint, 64, 2, 1, 42, 7.5, PROMPT, None, calibration_samples=4)
    m, image = contestant_image(s, "int8-hybrid")
    assert "UNet compiled at f32" in m.note, m.note
    fake_quantize = re.search(r"(\d+) FakeQuantize ops in its UNet", m.note)
    assert fake_quantize and int(fake_quantize[1]) > 0, m.note
    assert len(list(export_cache.glob("*/ir-int8-hybrid-*/unet/openvino_model.xml"))) == 1
    psnr, _ = psnr_ssim(diffusers_image(s)[0], image[0])
    assert psnr >= MIN_INT8_PSNR, f"{psnr:.1f} dB from diffusers' fp32 image"


@pytest.mark.skipif(not host_supports("bf16"), reason="this CPU has neither AVX512_BF16 nor AMX")
def test_int8_hybrid_bf16_contestant_is_the_same_quantization_compiled_in_bf16(
    venv: Path, tiny_checkpoint: Path, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(e) at int8-hybrid-bf16, as ours: optimum-intel's hybrid quantization on the same samples (one IR for
    both int8-hybrid precisions), its UNet compiled with the bf16 hint."""
    monkeypatch.setattr(ov, "export_cache_dir", lambda: export_cache)
    s = Settings(tiny_checkpoint, 64, 2, 1, 42, 7.5, PROMPT, None, calibration_samples=4)
    m, image = contestant_image(s, "int8-hybrid-bf16")
    assert "INFERENCE_PRECISION_HINT bf16" in m.note and "UNet compiled at bf16" in m.note, m.note
    assert re.search(r"[1-9]\d* FakeQuantize ops in its UNet", m.note), m.note
    assert len(list(export_cache.glob("*/ir-int8-hybrid-*/unet/openvino_model.xml"))) == 1
    psnr, _ = psnr_ssim(diffusers_image(s)[0], image[0])
    assert psnr >= MIN_INT8_PSNR, f"{psnr:.1f} dB from diffusers' fp32 image"


def test_ensure_venv_reuses_a_finished_venv_and_remakes_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pip here: the commands are recorded. A venv made from other requirements, or never finished (no
    marker), is made again; one whose making failed is removed, and the failure says what pip said."""
    commands: list[list[str]] = []
    venv = tmp_path / "venv"

    def record(command: list[str]) -> None:
        commands.append(list(command))
        if command[1:3] == ["-m", "venv"]:
            (venv / "bin").mkdir(parents=True)

    monkeypatch.setattr(ov, "_run", record)

    assert ov.ensure_venv(venv) == venv / "bin" / "python"
    assert [c[-len(ov.NO_DEPS) :] for c in commands[2:]] == [list(ov.NO_DEPS)]
    assert all(r in commands[1] for r in ov.REQUIREMENTS) and "--no-deps" in commands[2]
    assert ov.venv_ready(venv)

    commands.clear()
    ov.ensure_venv(venv)
    assert commands == []  # reused

    (venv / "requirements.txt").write_text("optimum-intel==0.0.1\n")
    (venv / "stale").write_text("")
    ov.ensure_venv(venv)
    assert len(commands) == 3 and not (venv / "stale").exists()

    def failing(command: list[str]) -> None:
        if "pip" in command:
            raise ov.OpenVinoError("pip install failed (exit code 1): no registry")
        (venv / "bin").mkdir(parents=True)

    (venv / "requirements.txt").unlink()
    monkeypatch.setattr(ov, "_run", failing)
    with pytest.raises(ov.OpenVinoError, match="no registry"):
        ov.ensure_venv(venv)
    assert not venv.exists()
