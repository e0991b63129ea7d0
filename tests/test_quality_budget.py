"""The quality budget for reduced precision (perf/quality.py) on the tiny checkpoint: the fp16 graphs the
TensorRT target builds from, run by ONNX Runtime, are within the fp16 budget at both levels (per engine, end
to end), and a candidate known to be worse is not, at either level."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from perf import quality
from python_backend.engines import OnnxRuntimeEngines
from python_backend.ov_sessions import host_supports
from python_backend.pipeline import PipelineAssets
from python_backend.shapes import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER

# What the thresholds were measured with (python -m perf.quality's defaults on the tiny checkpoint).
SETTINGS = quality.Settings(size=64, steps=20)
IMAGE_CHECKS = {"PSNR min (dB)", "PSNR mean (dB)", "SSIM min", "SSIM mean"}


@pytest.fixture(scope="module")
def fp16_repository(
    tiny_checkpoint: Path, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("quality") / "fp16-onnx"
    exported = quality.export_fp16_repository(tiny_checkpoint, model_repository, out)
    # build-engines --target tensorrt's precisions (default --vae-precision fp32)
    assert {name: precision for name, (precision, _) in exported.items()} == {
        TEXT_ENCODER: "fp32",
        UNET: "fp16",
        VAE_DECODER: "fp32",
        VAE_ENCODER: "fp32",
    }
    return out


@pytest.fixture(scope="module")
def engines(model_repository: Path, assets: PipelineAssets) -> OnnxRuntimeEngines:
    """The reference: the fp32 onnx repository on ONNX Runtime (the budget's reference, as perf.quality's)."""
    return OnnxRuntimeEngines(model_repository, assets.manifest.geometry)


def failed(checks: list[quality.Check]) -> set[str]:
    return {c.name for c in checks if not c.ok}


def test_the_fp16_repository_links_fp32_graphs_and_exports_the_fp16_unet(
    fp16_repository: Path, model_repository: Path
) -> None:
    unet = fp16_repository / UNET / "1" / "model.onnx"
    assert unet.is_file() and not unet.is_symlink()
    for engine in (TEXT_ENCODER, VAE_DECODER, VAE_ENCODER):
        graph = fp16_repository / engine / "1" / "model.onnx"
        assert graph.resolve() == (model_repository / engine / "1" / "model.onnx").resolve()


def test_the_fp16_onnx_graphs_are_within_the_fp16_budget(
    fp16_repository: Path, engines: OnnxRuntimeEngines, assets: PipelineAssets
) -> None:
    geometry = assets.manifest.geometry
    assert quality.architecture(geometry) == quality.TINY
    candidate = OnnxRuntimeEngines(fp16_repository, geometry)
    report = quality.evaluate(engines, candidate, assets, SETTINGS)

    checks = quality.judge(report, quality.BUDGETS["fp16"], quality.TINY)
    assert not failed(checks), quality.markdown(
        report, quality.BUDGETS["fp16"], quality.TINY, SETTINGS, "fp16-onnx", {}
    )
    assert len(report.images) == len(quality.PROMPTS) * len(quality.SEEDS) * len(quality.SCHEDULERS)
    # It is a candidate of its own: the fp16 UNet's outputs, and so the images, differ from fp32's.
    unet = next(d for d in report.engines if d.engine == UNET)
    assert 0 < unet.rel_l2 and report.psnr_min < float("inf")
    others = [d for d in report.engines if d.engine != UNET]
    assert all(d.rel_l2 == 0 for d in others)  # the same fp32 graphs


def test_a_worse_candidate_is_out_of_budget_at_both_levels(
    engines: OnnxRuntimeEngines, assets: PipelineAssets
) -> None:
    # Noise of 5% of the UNet output's RMS: far above fp16's rounding (6e-4 measured), below what changes
    # the tiny model's picture.
    noisy = quality.NoisyEngines(engines, relative=0.05)
    settings = replace(SETTINGS, prompts=quality.PROMPTS[:2], seeds=quality.SEEDS[:1])  # 4 images suffice
    report = quality.evaluate(engines, noisy, assets, settings)

    unet = next(d for d in report.engines if d.engine == UNET)
    assert unet.rel_l2 == pytest.approx(0.05, rel=0.1)
    checks = quality.judge(report, quality.BUDGETS["fp16"], quality.TINY)
    assert failed(checks) == {"unet.noise_pred relative L2", *IMAGE_CHECKS}
    text = quality.markdown(report, quality.BUDGETS["fp16"], quality.TINY, settings, "noisy-unet", {})
    assert "**OUT OF the fp16 budget.**" in text and "| unet | noise_pred |" in text
    assert not quality.within(report, quality.BUDGETS["fp16"], quality.TINY)


def test_psnr_and_ssim_of_known_images() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(64, 64, 3), dtype=np.uint8)
    assert quality.psnr_ssim(image, image) == (float("inf"), 1.0)
    psnr, ssim = quality.psnr_ssim(image, image + 1)  # off by one level everywhere: 20·log10(255)
    assert psnr == pytest.approx(48.13, abs=0.01)
    assert 0.99 < ssim < 1


def test_weights_rounded_as_bf16_and_int8_store_them() -> None:
    import torch

    weights = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    bf16 = quality.round_weights(weights, "bf16")
    assert np.array_equal(bf16, torch.from_numpy(weights).bfloat16().float().numpy())
    int8 = quality.round_weights(weights, "int8")
    for row, rounded in zip(weights, int8, strict=True):  # 255 levels per output channel, ends kept
        step = np.abs(row).max() / 127
        assert np.allclose(rounded / step, np.round(rounded / step), atol=1e-4)
        assert np.abs(rounded - row).max() <= step / 2 + 1e-6


def test_every_budget_names_every_engine_and_architecture() -> None:
    for precision, budget in quality.BUDGETS.items():
        assert budget.precision == precision
        assert set(budget.engine_rel_l2) == {TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER}
        assert set(budget.images) == {quality.TINY, quality.SD_V1}
    # Lower precision, looser budget.
    fp16, bf16, int8 = (quality.BUDGETS[p] for p in ("fp16", "bf16", "int8"))
    for arch in (quality.TINY, quality.SD_V1):
        assert fp16.images[arch].psnr_min_db > bf16.images[arch].psnr_min_db > int8.images[arch].psnr_min_db


def test_cli_scheduler_names() -> None:
    assert quality.parse_schedulers("own, DPM++ 2M Karras,euler_a") == (None, "dpmpp_2m_karras", "euler_a")


@pytest.mark.skipif(not host_supports("bf16"), reason="this CPU has neither AVX512_BF16 nor AMX")
def test_the_openvino_bf16_engines_are_within_the_bf16_budget(
    tiny_checkpoint: Path, engines: OnnxRuntimeEngines, assets: PipelineAssets, tmp_path: Path
) -> None:
    context = quality.CandidateContext(
        tiny_checkpoint, tmp_path, lambda: engines, assets.manifest.geometry, tmp_path
    )
    candidate = quality.CANDIDATES["openvino-bf16"]
    report = quality.evaluate(engines, candidate.make(context), assets, SETTINGS)
    checks = quality.judge(report, quality.BUDGETS["bf16"], quality.TINY)
    assert not failed(checks), quality.markdown(
        report, quality.BUDGETS["bf16"], quality.TINY, SETTINGS, "openvino-bf16", {}
    )


def test_the_openvino_int8_hybrid_engines_are_within_the_int8_budget(
    int8_repository: Path, engines: OnnxRuntimeEngines, assets: PipelineAssets
) -> None:
    """The openvino target at --precision int8-hybrid (tests/conftest.py: 4 calibration samples at the
    profile's opt size, 256 px), in-process as served, against the fp32 reference."""
    from python_backend.engines import OpenVinoEngines

    candidate = OpenVinoEngines(int8_repository, assets.manifest.geometry, "int8-hybrid")
    report = quality.evaluate(engines, candidate, assets, SETTINGS)
    budget = quality.BUDGETS[quality.CANDIDATES["openvino-int8-hybrid"].precision]
    checks = quality.judge(report, budget, quality.TINY)
    assert not failed(checks), quality.markdown(report, budget, quality.TINY, SETTINGS, "int8-hybrid", {})
    assert len(report.images) == len(quality.PROMPTS) * len(quality.SEEDS) * len(quality.SCHEDULERS)
    # Every engine is its own int8 candidate: none gives fp32's outputs.
    assert all(d.rel_l2 > 0 for d in report.engines if d.output != "latent_std")


@pytest.mark.skipif(not host_supports("bf16"), reason="this CPU has neither AVX512_BF16 nor AMX")
def test_the_openvino_int8_hybrid_bf16_engines_are_within_the_int8_budget(
    int8_repository: Path, engines: OnnxRuntimeEngines, assets: PipelineAssets
) -> None:
    """int8-hybrid's IR with its other ops in bf16 (--precision int8-hybrid-bf16 keeps that build's IRs), in
    process as served, against the fp32 reference: the int8 budget, as the candidate is judged by."""
    from python_backend.engines import OpenVinoEngines

    candidate = OpenVinoEngines(int8_repository, assets.manifest.geometry, "int8-hybrid-bf16")
    report = quality.evaluate(engines, candidate, assets, SETTINGS)
    budget = quality.BUDGETS[quality.CANDIDATES["openvino-int8-hybrid-bf16"].precision]
    assert budget.precision == "int8"
    checks = quality.judge(report, budget, quality.TINY)
    assert not failed(checks), quality.markdown(
        report, budget, quality.TINY, SETTINGS, "int8-hybrid-bf16", {}
    )


def test_calibration_samples_is_an_option_of_the_int8_hybrid_candidate() -> None:
    from perf.quality import parse_args

    hybrid = ["--checkpoint", "x", "--candidate", "openvino-int8-hybrid"]
    assert parse_args([*hybrid, "--calibration-samples", "32"]).calibration_samples == 32
    assert parse_args(hybrid).calibration_samples is None  # build-engines' default
    bf16 = ["--checkpoint", "x", "--candidate", "openvino-int8-hybrid-bf16", "--calibration-samples", "32"]
    assert parse_args(bf16).calibration_samples == 32
    for bad in (
        [*hybrid, "--calibration-samples", "0"],
        ["--checkpoint", "x", "--candidate", "openvino-bf16", "--calibration-samples", "32"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
