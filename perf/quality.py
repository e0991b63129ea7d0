"""The quality budget for reduced precision: a candidate's engines judged against the fp32 reference.

    python -m perf.quality --checkpoint DIR [--candidate NAME (default fp16-onnx; see CANDIDATES)]
                           [--vae-precision fp32|fp16] [--noise 0.05] [--size N] [--steps N]
                           [--schedulers own,dpmpp_2m_karras] [--work-dir DIR] [--out FILE.md]

Reduced precision (fp16 TensorRT plans, bf16 or int8-hybrid OpenVINO IR) cannot give fp32's images to 2/255,
so it is judged by the budget below, defined once here and used by tests/test_quality_budget.py, at two
levels:

1. per engine: on fixed seeded inputs of realistic ranges (token ids of fixed prompts; latents ~N(0, 1) at
   timesteps across the schedule with the reference text encoder's embeddings; decoder latents as the pipeline
   feeds them, N(0, 1) / scaling factor; images in [-1, 1]), each output's relative L2 error
   ‖candidate − reference‖ / ‖reference‖ (judged) and max abs difference (shown);
2. end to end: PSNR and SSIM (scikit-image) of the final uint8 images of `python_backend.pipeline.generate` on
   the candidate vs on the reference, over PROMPTS × SEEDS × schedulers (the checkpoint's own and A1111's
   "DPM++ 2M Karras" by default); judged by their minimum and mean.

Engines of a repository built with --controlnet (the UNet then takes residuals) are not supported.

The reference and the candidate are any two `python_backend.engines.Engines`: a new engine target plugs in as
one entry of CANDIDATES. `fp16-onnx` is the graphs the TensorRT target builds its plans from
(`build_engines.cli.precisions("tensorrt", ...)`: fp16 UNet, fp32 text encoder, VAE fp32 unless
--vae-precision fp16), run by ONNX Runtime on the CPU. That measures fp16 storage and rounding of weights and
of activations between ops (ONNX Runtime's CPU provider lacks fp16 kernels for most ops and runs them in fp32
between inserted casts), not TensorRT's fp16 kernels (fp16 accumulation, fused attention). Why the thresholds
are what they are: perf/README.md, "Quality budget for reduced precision".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch

from python_backend.engines import Engines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest
from python_backend.shapes import (
    ENGINE_NAMES,
    TEXT_ENCODER,
    TOKENS_PER_CHUNK,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ModelGeometry,
)

# ------------------------------------------------------------------------------------------------
# The budget


@dataclass(frozen=True)
class ImageBudget:
    """Lower bounds on the final images of one architecture vs the reference's (PSNR in dB; SSIM ≤ 1)."""

    psnr_min_db: float  # the worst image
    psnr_mean_db: float  # mean over the images
    ssim_min: float
    ssim_mean: float
    basis: str  # measured, or provisional (perf/README.md has the reasoning)


@dataclass(frozen=True)
class Budget:
    """What a candidate of one precision must meet against the fp32 reference: each engine output's
    relative L2 error at most `engine_rel_l2[engine]`, and the images at least `images[architecture]`.
    Image thresholds are per architecture (`architecture()`): how far an engine's error moves the final image
    depends on the model (the tiny random-weight one barely amplifies it), an engine's own error far less."""

    precision: str
    engine_rel_l2: Mapping[str, float]  # per engine, each of its outputs
    images: Mapping[str, ImageBudget]  # by architecture: "sd-v1", "tiny"
    basis: str


SD_V1 = "sd-v1"  # SD v1's own architecture (real checkpoints, sd-tiny-checkpoint --full-size)
TINY = "tiny"  # any smaller one: the tiny random-weight test checkpoints


def architecture(geometry: ModelGeometry) -> str:
    v1 = ModelGeometry()  # its defaults are SD v1's
    same = (geometry.unet_block_channels, geometry.text_hidden_size, geometry.text_layers) == (
        v1.unet_block_channels,
        v1.text_hidden_size,
        v1.text_layers,
    )
    return SD_V1 if same else TINY


def _engines(rel_l2: float) -> dict[str, float]:
    return dict.fromkeys(ENGINE_NAMES, rel_l2)


# Each number's reasoning, and the measurements behind it: perf/README.md, "Quality budget for reduced
# precision". fp16's and int8's tiny entries are measured and enforced by tests/test_quality_budget.py (bf16's
# too where the CPU has bf16). The SD v1 image entries are floors for trained weights: on random full-size
# weights every precision measured as on the tiny checkpoint, tens of dB above them.
BUDGETS: dict[str, Budget] = {
    "fp16": Budget(
        "fp16",
        # Measured (tiny): UNet 6.1e-4, VAE decoder 9.2e-4, VAE encoder 7.5e-4: one or two fp16 roundoffs
        # (4.9e-4). 5e-3 leaves room for SD v1's depth and TensorRT's kernels, and is what bf16 weights alone
        # give (5.6e-3 on the tiny UNet): an error of bf16's size is not fp16's.
        _engines(5e-3),
        {
            # Measured (VAE fp32 / fp16): PSNR min 65.2 / 64.0 dB, mean 66.2 / 64.4; SSIM min 0.999986 /
            # 0.999981. ≈ 6 dB below: UNet noise of 3e-3 (5× fp16's error) and bf16 weights fail it.
            TINY: ImageBudget(
                58.0, 60.0, 0.9998, 0.9999, "measured: fp16-onnx gave PSNR min 64.0 dB, SSIM min 0.99998"
            ),
            # Measured (full-size architecture, random weights): PSNR min 65.3 dB, the tiny one's: the
            # architecture does not amplify the error; trained weights may, and cannot be run here. So these
            # are floors for real checkpoints (perf/README.md, "The full-size numbers").
            SD_V1: ImageBudget(
                30.0,
                35.0,
                0.93,
                0.96,
                "floors for trained weights; random full-size weights measured 65.3 dB",
            ),
        },
        "fp16 ONNX graphs of the TensorRT target on ONNX Runtime (CPU)",
    ),
    "bf16": Budget(
        "bf16",
        # bf16 keeps 8 significant bits to fp16's 11: roundoff 8× fp16's (3.9e-3). bf16 weights alone (tiny,
        # bf16-weights-onnx): UNet 5.6e-3, VAE decoder 7.3e-3; bf16 activations add about as much again.
        _engines(3e-2),
        {
            TINY: ImageBudget(
                44.0, 46.0, 0.998, 0.999, "provisional: bf16 weights alone gave PSNR min 54.6 dB"
            ),
            SD_V1: ImageBudget(
                20.0, 24.0, 0.75, 0.85, "floors for trained weights; random full-size weights: 48.7 dB"
            ),
        },
        "the openvino target's bf16 IR, measured on the tiny checkpoint and at full size (AVX512_BF16); tiny "
        "images provisional",
    ),
    "int8": Budget(
        "int8",
        # int8 weights alone (tiny, int8-weights-onnx): UNet 7.9e-2, VAE decoder 1.6e-2. Measured (tiny,
        # openvino-int8-hybrid, build-engines' default calibration): UNet 8.3e-2, text encoder 1.8e-2, VAE
        # decoder 1.5e-2, encoder 1.0e-2. 2e-1 leaves 2.4× for SD v1's depth.
        _engines(2e-1),
        {
            # Measured (openvino-int8-hybrid): PSNR min 38.6 dB, mean 39.8; SSIM min 0.9965, mean 0.9973.
            # ≈ 6 dB below, as fp16's: UNet noise of 10% of its RMS (noisy-unet --noise 0.1) fails it.
            TINY: ImageBudget(
                32.0,
                34.0,
                0.985,
                0.989,
                "measured: openvino-int8-hybrid gave PSNR min 38.6 dB, SSIM min 0.9965",
            ),
            SD_V1: ImageBudget(
                16.0, 20.0, 0.60, 0.70, "floors for trained weights; random full-size weights: 38.2 dB"
            ),
        },
        "the openvino target's int8-hybrid IR, measured on the tiny checkpoint and at full size (AVX-512 "
        "VNNI); SD v1 images floors for trained weights",
    ),
}

# ------------------------------------------------------------------------------------------------
# What is compared

PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse on a cliff at dusk",
    "portrait of an old fisherman, detailed skin, 85mm, soft light",
    "a bowl of fruit on a wooden table, still life, oil on canvas",
)
SEEDS = (42, 1234)
# None: the checkpoint's own scheduler (v1-4: PNDM); A1111's most used sampler beside it.
SCHEDULERS: tuple[str | None, ...] = (None, "dpmpp_2m_karras")
GUIDANCE = 7.5
UNET_TIMESTEPS = (999, 857, 714, 571, 428, 285, 142, 1)  # one per UNet input row, across the schedule


@dataclass(frozen=True)
class Settings:
    size: int  # image side, pixels (engine inputs and images)
    steps: int
    prompts: tuple[str, ...] = PROMPTS
    seeds: tuple[int, ...] = SEEDS
    schedulers: tuple[str | None, ...] = SCHEDULERS
    guidance: float = GUIDANCE
    input_seed: int = 0  # of the engine-level inputs


@dataclass(frozen=True)
class EngineDiff:
    engine: str
    output: str
    rel_l2: float  # ‖candidate − reference‖ / ‖reference‖ over the whole output
    max_abs: float  # max |candidate − reference|
    ref_max_abs: float  # max |reference|, for scale


@dataclass(frozen=True)
class ImageDiff:
    prompt: str
    seed: int
    scheduler: str  # the name the pipeline used
    psnr_db: float  # inf for identical images
    ssim: float
    max_pixel_diff: int  # of 255


@dataclass
class QualityReport:
    engines: list[EngineDiff]
    images: list[ImageDiff]
    seconds: dict[str, float] = field(default_factory=dict)  # "reference", "candidate": generate() total

    @property
    def psnr_min(self) -> float:
        return min(i.psnr_db for i in self.images)

    @property
    def psnr_mean(self) -> float:
        return float(np.mean([i.psnr_db for i in self.images]))

    @property
    def ssim_min(self) -> float:
        return min(i.ssim for i in self.images)

    @property
    def ssim_mean(self) -> float:
        return float(np.mean([i.ssim for i in self.images]))


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float
    at_least: bool  # the value must be >= threshold (else <=)

    @property
    def ok(self) -> bool:
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold


def judge(report: QualityReport, budget: Budget, arch: str) -> list[Check]:
    """Every threshold of `budget` (image thresholds: those of architecture `arch`) against `report`; the
    candidate is within budget when all are ok."""
    checks = [
        Check(f"{d.engine}.{d.output} relative L2", d.rel_l2, budget.engine_rel_l2[d.engine], at_least=False)
        for d in report.engines
    ]
    if report.images:
        images = budget.images[arch]
        checks += [
            Check("PSNR min (dB)", report.psnr_min, images.psnr_min_db, at_least=True),
            Check("PSNR mean (dB)", report.psnr_mean, images.psnr_mean_db, at_least=True),
            Check("SSIM min", report.ssim_min, images.ssim_min, at_least=True),
            Check("SSIM mean", report.ssim_mean, images.ssim_mean, at_least=True),
        ]
    return checks


def within(report: QualityReport, budget: Budget, arch: str) -> bool:
    return all(c.ok for c in judge(report, budget, arch))


# ------------------------------------------------------------------------------------------------
# Level 1: per engine


def engine_inputs(
    reference: Engines, assets: PipelineAssets, size: int, seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Fixed inputs per engine, of the ranges the pipeline gives them; the UNet's text embeddings are the
    reference text encoder's (so that the UNet is measured on its own)."""
    geometry = assets.manifest.geometry
    generator = torch.Generator().manual_seed(seed)
    latent = size // 8
    rows = len(UNET_TIMESTEPS)
    texts = ["", *PROMPTS]  # the unconditional prompt first, as classifier-free guidance has it
    ids = assets.tokenizer(
        texts, padding="max_length", max_length=TOKENS_PER_CHUNK, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int32)
    clip_skip = torch.ones((len(texts), 1), dtype=torch.int32)
    embeddings = reference.encode_text(ids).cpu()
    # Rows alternate unconditional / a prompt, as a guided batch does.
    text_rows = torch.stack(
        [embeddings[0] if r % 2 == 0 else embeddings[1 + (r // 2) % len(PROMPTS)] for r in range(rows)]
    )
    sample = torch.randn((rows, geometry.unet_in_channels, latent, latent), generator=generator)
    timestep = torch.tensor(UNET_TIMESTEPS, dtype=torch.float32).reshape(rows, 1)
    decoder_latent = torch.randn((2, geometry.latent_channels, latent, latent), generator=generator)
    # Images with structure at several scales: coarse uniform noise upsampled, plus fine noise, in [-1, 1].
    coarse = torch.rand((2, 3, max(size // 16, 1), max(size // 16, 1)), generator=generator) * 2 - 1
    fine = (torch.rand((2, 3, size, size), generator=generator) * 2 - 1) * 0.2
    image = (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 0.8 + fine).clamp(
        -1, 1
    )
    return {
        TEXT_ENCODER: {"input_ids": ids, "clip_skip": clip_skip},
        UNET: {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_rows},
        VAE_DECODER: {"latent": decoder_latent / geometry.vae_scaling_factor},
        VAE_ENCODER: {"image": image},
    }


def compare_engines(
    reference: Engines, candidate: Engines, assets: PipelineAssets, size: int, seed: int = 0
) -> list[EngineDiff]:
    inputs = engine_inputs(reference, assets, size, seed)
    diffs = []
    for engine in ENGINE_NAMES:
        ref = reference.run(engine, {k: v.to(reference.device) for k, v in inputs[engine].items()})
        got = candidate.run(engine, {k: v.to(candidate.device) for k, v in inputs[engine].items()})
        for name, r in ref.items():
            r64, c64 = r.detach().cpu().double(), got[name].detach().cpu().double()
            diffs.append(
                EngineDiff(
                    engine,
                    name,
                    rel_l2=float(torch.linalg.vector_norm(c64 - r64) / torch.linalg.vector_norm(r64)),
                    max_abs=float((c64 - r64).abs().max()),
                    ref_max_abs=float(r64.abs().max()),
                )
            )
    return diffs


# ------------------------------------------------------------------------------------------------
# Level 2: end to end


def psnr_ssim(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """PSNR (dB; inf when identical) and SSIM of two uint8 [H, W, 3] images (scikit-image's, data range 255,
    SSIM's default 7×7 window over each channel, averaged)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(reference, candidate):
        return math.inf, 1.0
    psnr = peak_signal_noise_ratio(reference, candidate, data_range=255)
    ssim = structural_similarity(reference, candidate, data_range=255, channel_axis=-1)
    return float(psnr), float(ssim)


def request(settings: Settings, prompt: str, seed: int, scheduler: str | None) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        negative_prompt="",
        width=settings.size,
        height=settings.size,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        seed=seed,
        scheduler=scheduler,
    )


def compare_images(
    reference: Engines, candidate: Engines, assets: PipelineAssets, settings: Settings
) -> tuple[list[ImageDiff], dict[str, float]]:
    """One image per prompt × seed × scheduler from each; their PSNR/SSIM, and each side's total seconds."""
    diffs, seconds = [], {"reference": 0.0, "candidate": 0.0}
    for scheduler in settings.schedulers:
        for prompt in settings.prompts:
            for seed in settings.seeds:
                req = request(settings, prompt, seed, scheduler)
                images = {}
                for side, engines in (("reference", reference), ("candidate", candidate)):
                    started = time.perf_counter()
                    result = generate(req, engines, assets)
                    seconds[side] += time.perf_counter() - started
                    images[side] = result.images[0]
                ref, got = images["reference"], images["candidate"]
                psnr, ssim = psnr_ssim(ref, got)
                max_diff = int(np.abs(ref.astype(np.int16) - got.astype(np.int16)).max())
                diffs.append(ImageDiff(prompt, seed, result.info["scheduler"], psnr, ssim, max_diff))
    return diffs, seconds


def evaluate(
    reference: Engines, candidate: Engines, assets: PipelineAssets, settings: Settings
) -> QualityReport:
    """Both levels of the budget for `candidate` against `reference` (any two Engines on one checkpoint)."""
    engines = compare_engines(reference, candidate, assets, settings.size, settings.input_seed)
    images, seconds = compare_images(reference, candidate, assets, settings)
    return QualityReport(engines, images, seconds)


# ------------------------------------------------------------------------------------------------
# Candidates


class NoisyEngines(Engines):
    """`inner` with Gaussian noise added to one engine's outputs, `relative` × each output's RMS (so its
    relative L2 error is ≈ `relative`); seeded, so a run is reproducible. A candidate known to be worse, to
    show that the budget fails what it should."""

    def __init__(self, inner: Engines, relative: float, engine: str = UNET, seed: int = 0) -> None:
        self.inner = inner
        self.device = inner.device
        self.relative = relative
        self.engine = engine
        self._generator = torch.Generator().manual_seed(seed)

    def run(self, engine: str, inputs: dict[str, torch.Tensor], lora: str = "") -> dict[str, torch.Tensor]:
        outputs = self.inner.run(engine, inputs, lora)
        if engine != self.engine:
            return outputs
        noisy = {}
        for name, t in outputs.items():
            rms = t.float().pow(2).mean().sqrt()
            noise = torch.randn(t.shape, generator=self._generator) * rms * self.relative
            noisy[name] = t + noise.to(t.device, t.dtype)
        return noisy


def export_fp16_repository(
    checkpoint: Path, reference_repository: Path, out: Path, vae_precision: str = "fp32"
) -> dict[str, tuple[str, float]]:
    """The ONNX graphs the TensorRT target builds its plans from (`build_engines.cli.precisions("tensorrt",
    vae_precision)`), as a repository-like folder `out/<engine>/1/model.onnx` that
    `OnnxRuntimeEngines(out, geometry)` runs. fp16 engines are exported as build-engines exports them (and
    kept on a later call, as build-engines keeps them); fp32 ones are the same graphs as the fp32 onnx
    repository's, so they are linked from there. Returns per engine its precision and max abs difference
    from fp32 torch (the export's own check). `checkpoint`: a diffusers folder or a single file."""
    import json

    from build_engines import inputs as checkpoint_inputs
    from build_engines import onnx_export
    from build_engines.cli import precisions
    from build_engines.digests import digest_folder
    from python_backend.shapes import engine_specs

    precision = precisions("tensorrt", vae_precision)
    done: dict[str, tuple[str, float]] = {}
    with checkpoint_inputs.prepare(checkpoint) as prepared:
        folder = prepared.folder
        geometry = onnx_export.read_geometry(folder)
        loader = onnx_export.ModuleLoader(folder)
        for name, spec in engine_specs(geometry).items():
            version = out / name / "1"
            if precision[name] == "fp32":
                source = reference_repository / name / "1"
                version.mkdir(parents=True, exist_ok=True)
                for file in ("model.onnx", "model.onnx.data", "model.onnx.json"):
                    (version / file).unlink(missing_ok=True)
                for file in ("model.onnx", "model.onnx.data"):
                    if (source / file).exists():
                        (version / file).symlink_to((source / file).resolve())
                recorded = json.loads((source / "model.onnx.json").read_text())
                done[name] = ("fp32", float(recorded["max_abs_diff"]))
                continue
            for file in ("model.onnx", "model.onnx.data"):  # links left by a call with other precisions
                if (version / file).is_symlink():
                    (version / file).unlink()
            digest = digest_folder(folder / onnx_export.COMPONENT_OF[name])
            module = partial(loader.module, name)
            exported = onnx_export.export_engine(spec, module, digest, version, precision[name])
            done[name] = (precision[name], exported.max_abs_diff)
    return done


def round_weights(array: np.ndarray, kind: str) -> np.ndarray:
    """`array` (fp32) as `kind` would store it, back in fp32: "bf16" rounds to nearest (even) with bf16's 8
    significant bits; "int8" quantizes each row of the stored tensor (a convolution's output channels)
    symmetrically to 255 levels."""
    if kind == "bf16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded: np.ndarray = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return rounded.astype(np.uint32).view(np.float32).reshape(array.shape)
    if kind == "int8":
        rows = array.reshape(array.shape[0], -1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / 127
        scale[scale == 0] = 1
        return (np.round(rows / scale) * scale).astype(np.float32).reshape(array.shape)
    raise ValueError(f"unknown rounding {kind!r}")


def rounded_weights_repository(reference_repository: Path, out: Path, kind: str) -> Path:
    """The fp32 repository's graphs with their weights rounded by `round_weights(kind)` (bf16: every fp32
    weight; int8: those of two or more dimensions, as int8 quantization leaves biases and norms alone) and
    kept in fp32, as `out/<engine>/1/model.onnx`: what storing the weights at that precision costs, with
    activations still in fp32 (a lower bound on that precision's error). Kept on a later call."""
    import json

    import onnx
    from onnx import numpy_helper

    for engine in ENGINE_NAMES:
        source, version = reference_repository / engine / "1", out / engine / "1"
        key = {"source": json.loads((source / "model.onnx.json").read_text())["key"], "rounding": kind}
        sidecar = version / "model.onnx.json"
        if sidecar.exists() and json.loads(sidecar.read_text()) == key:
            continue
        version.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(source / "model.onnx"))
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype == np.float32 and (kind == "bf16" or array.ndim >= 2):
                init.CopyFrom(numpy_helper.from_array(round_weights(array, kind), init.name))
        external = (source / "model.onnx.data").exists()  # past protobuf's 2 GB: the full-size UNet
        (version / "model.onnx.data").unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(version / "model.onnx"),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
        )
        sidecar.write_text(json.dumps(key, indent=2) + "\n")
    return out


@dataclass
class CandidateContext:
    """What a candidate is made from. `reference` (the fp32 engines) is loaded on first use: main() makes the
    candidate first, so that an export's torch modules are gone before the reference's sessions load."""

    checkpoint: Path
    reference_repository: Path
    load_reference: Callable[[], Engines]
    geometry: ModelGeometry
    work_dir: Path
    vae_precision: str = "fp32"  # fp16-onnx: the VAE engines' precision
    noise: float = 0.05  # noisy-unet: the noise's size relative to the UNet output's RMS
    calibration_samples: int | None = None  # openvino-int8-hybrid: build-engines --calibration-samples
    notes: list[str] = field(default_factory=list)  # lines the candidate adds to the report

    @cached_property
    def reference(self) -> Engines:
        return self.load_reference()


@dataclass(frozen=True)
class Candidate:
    precision: str  # the budget it is judged by
    description: str
    make: Callable[[CandidateContext], Engines]


def fp16_onnx(context: CandidateContext) -> Engines:
    from python_backend.engines import OnnxRuntimeEngines

    out = context.work_dir / ("fp16-onnx" if context.vae_precision == "fp32" else "fp16-onnx-vae-fp16")
    exported = export_fp16_repository(
        context.checkpoint, context.reference_repository, out, context.vae_precision
    )
    context.notes.append(f"candidate folder: `{out}`")
    context.notes.extend(
        f"{name}: {precision} graph (export check: max abs diff vs fp32 torch {diff:.2e})"
        for name, (precision, diff) in exported.items()
    )
    return OnnxRuntimeEngines(out, context.geometry)


def rounded_weights(kind: str) -> Callable[[CandidateContext], Engines]:
    def make(context: CandidateContext) -> Engines:
        from python_backend.engines import OnnxRuntimeEngines

        out = rounded_weights_repository(
            context.reference_repository, context.work_dir / f"{kind}-weights", kind
        )
        context.notes.append(f"candidate folder: `{out}`")
        return OnnxRuntimeEngines(out, context.geometry)

    return make


def openvino(precision: str) -> Callable[[CandidateContext], Engines]:
    """The openvino target's engines (build-engines --target openvino --precision), in-process as served."""

    def make(context: CandidateContext) -> Engines:
        from perf.compare import build_repository
        from python_backend.engines import OpenVinoEngines
        from python_backend.ov_sessions import IR_PRECISION, host_supports

        if not host_supports(precision):
            raise SystemExit(f"perf.quality: this CPU does not run {precision} (it needs AVX512_BF16 or AMX)")
        args = ["--target", "openvino", "--precision", precision]
        if IR_PRECISION[precision] == "int8-hybrid" and context.calibration_samples is not None:
            args += ["--calibration-samples", str(context.calibration_samples)]
        repo = build_repository(
            context.checkpoint, context.work_dir, f"repository-openvino-{precision}", *args
        )
        context.notes.append(f"candidate repository: `{repo}`")
        return OpenVinoEngines(repo, context.geometry, precision)

    return make


def noisy_unet(context: CandidateContext) -> Engines:
    context.notes.append(f"noise: {context.noise:g} × the RMS of each UNet output")
    return NoisyEngines(context.reference, context.noise)


CANDIDATES: dict[str, Candidate] = {
    "fp16-onnx": Candidate(
        "fp16",
        "the TensorRT target's ONNX graphs (fp16 UNet; text encoder fp32; VAE per --vae-precision) on "
        "ONNX Runtime, CPU",
        fp16_onnx,
    ),
    # Calibration: an error of known size on the UNet alone, judged by the fp16 budget (--noise).
    "noisy-unet": Candidate(
        "fp16",
        "the fp32 engines with Gaussian noise (--noise × its RMS) added to every UNet output",
        noisy_unet,
    ),
    # What storing the weights alone at bf16 or int8 costs: lower bounds for those budgets.
    "bf16-weights-onnx": Candidate(
        "bf16",
        "the fp32 graphs with every weight rounded to bf16 (activations fp32)",
        rounded_weights("bf16"),
    ),
    "int8-weights-onnx": Candidate(
        "int8",
        "the fp32 graphs with weight matrices rounded to int8 per row (activations fp32)",
        rounded_weights("int8"),
    ),
    "openvino-bf16": Candidate(
        "bf16", "the openvino target at --precision bf16 (needs AVX512_BF16 or AMX)", openvino("bf16")
    ),
    "openvino-int8-hybrid": Candidate(
        "int8",
        "the openvino target at --precision int8-hybrid (NNCF: int8 weights; int8 activations into the "
        "UNet's convolutions and attention, calibrated on --calibration-samples UNet calls)",
        openvino("int8-hybrid"),
    ),
    # The same IR, its ops outside int8 in bf16: judged by the int8 budget, as what it adds to int8's error
    # (bf16 arithmetic, 3e-2 at most) is small beside it.
    "openvino-int8-hybrid-bf16": Candidate(
        "int8",
        "the openvino target at --precision int8-hybrid-bf16 (int8-hybrid's IR, the ops it leaves out of "
        "int8 in bf16; needs AVX512_BF16 or AMX)",
        openvino("int8-hybrid-bf16"),
    ),
}

# ------------------------------------------------------------------------------------------------
# Report


def _num(value: float, digits: int = 2) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown(
    report: QualityReport,
    budget: Budget,
    arch: str,
    settings: Settings,
    title: str,
    header: Mapping[str, str],
    notes: Sequence[str] = (),
) -> str:
    checks = judge(report, budget, arch)
    passed = all(c.ok for c in checks)
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [f"- {note}" for note in notes]
    lines += [
        "",
        "## Per engine (fixed seeded inputs)",
        "",
        "| engine | output | relative L2 | max abs diff | max abs of reference | threshold (rel. L2) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in report.engines:
        lines.append(
            f"| {d.engine} | {d.output} | {d.rel_l2:.2e} | {d.max_abs:.2e} | {d.ref_max_abs:.2e} "
            f"| {budget.engine_rel_l2[d.engine]:.1e} |"
        )
    lines += [
        "",
        f"## End to end ({settings.size}×{settings.size} px, {settings.steps} steps, "
        f"guidance {settings.guidance})",
        "",
        "| scheduler | seed | prompt | PSNR (dB) | SSIM | max pixel diff |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for i in report.images:
        lines.append(
            f"| {i.scheduler} | {i.seed} | {i.prompt} | {_num(i.psnr_db)} | {i.ssim:.6f} "
            f"| {i.max_pixel_diff}/255 |"
        )
    if report.images:
        lines += [
            "",
            f"- PSNR min {_num(report.psnr_min)} dB, mean {_num(report.psnr_mean)} dB; "
            f"SSIM min {report.ssim_min:.6f}, mean {report.ssim_mean:.6f} ({len(report.images)} images)",
        ]
    if report.seconds:
        lines.append(
            "- generate() total: reference {reference:.1f} s, candidate {candidate:.1f} s (a diagnostic: "
            "not the target hardware's speed)".format(**report.seconds)
        )
    lines += [
        "",
        f"## Verdict: budget `{budget.precision}`, images as `{arch}`",
        "",
        f"Budget: {budget.basis}; images: {budget.images[arch].basis}.",
        "",
        "| threshold | measured | limit | verdict |",
        "|---|---:|---:|---|",
    ]
    for c in checks:
        sign = "≥" if c.at_least else "≤"
        value = _num(c.value, 2 if "PSNR" in c.name else 6) if c.at_least else f"{c.value:.2e}"
        limit = f"{c.threshold:g}" if c.at_least else f"{c.threshold:.1e}"
        lines.append(f"| {c.name} | {value} | {sign} {limit} | {'ok' if c.ok else '**OUT OF BUDGET**'} |")
    lines += ["", f"**{'Within' if passed else 'OUT OF'} the {budget.precision} budget.**", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI


def default_settings(arch: str, size: int | None, steps: int | None) -> Settings:
    """64 px × 20 steps on the tiny checkpoint (seconds); 256 px × 10 steps on SD v1's architecture (minutes
    per image on 2 cores: a full-size fp32 call at 256 px × 10 steps takes ≈ 26 s, the fp16 graphs' more)."""
    full = arch == SD_V1
    return Settings(size=size or (256 if full else 64), steps=steps or (10 if full else 20))


def parse_schedulers(text: str) -> tuple[str | None, ...]:
    from python_backend import schedulers

    names: list[str | None] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "own":
            names.append(None)
            continue
        try:
            names.append(schedulers.lookup(name).name)
        except schedulers.UnknownScheduler as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("give at least one scheduler")
    return tuple(names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="SD v1.x checkpoint: diffusers folder or single file"
    )
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="fp16-onnx")
    parser.add_argument(
        "--vae-precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="the fp16-onnx candidate's VAE engines, as build-engines --target tensorrt (default fp32)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.05,
        help="the noisy-unet candidate's noise, relative to the UNet output's RMS (default %(default)s)",
    )
    parser.add_argument(
        "--calibration-samples",
        type=int,
        help="the openvino-int8-hybrid(-bf16) candidates' build-engines --calibration-samples (default its "
        "own)",
    )
    parser.add_argument("--size", type=int, help="image side, pixels (default 64 tiny, 256 full-size)")
    parser.add_argument("--steps", type=int, help="inference steps (default 20 tiny, 10 full-size)")
    parser.add_argument(
        "--schedulers",
        type=parse_schedulers,
        default=SCHEDULERS,
        help="comma-separated, 'own' for the checkpoint's (default: own,dpmpp_2m_karras)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the fp32 repository and the candidate are built (default: perf.compare's cache folder)",
    )
    parser.add_argument("--out", type=Path, help="write the report here as Markdown")
    args = parser.parse_args(argv)
    if args.size is not None and (args.size < 64 or args.size % 8):
        parser.error(f"--size must be a multiple of 8, at least 64, got {args.size}")
    if args.calibration_samples is not None and (
        not args.candidate.startswith("openvino-int8-hybrid") or args.calibration_samples < 1
    ):
        parser.error(
            "--calibration-samples is a positive count, with --candidate openvino-int8-hybrid(-bf16)"
        )
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def work_dir_for(checkpoint: Path) -> Path:
    """perf.compare's cache folder for the checkpoint, so that both reuse one fp32 repository."""
    from services.serve import default_cache_dir

    digest = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:8]
    return default_cache_dir() / "perf" / f"{checkpoint.name}-{digest}"


def main(argv: list[str] | None = None) -> int:
    from perf.compare import build_repository, machine, publish
    from python_backend.engines import OnnxRuntimeEngines

    args = parse_args(argv)
    checkpoint = args.checkpoint.resolve()
    work_dir = args.work_dir or work_dir_for(checkpoint)
    repo = build_repository(checkpoint, work_dir)
    assets = PipelineAssets.load(repo / "pipeline" / "1")
    arch = architecture(assets.manifest.geometry)
    settings = default_settings(arch, args.size, args.steps)
    settings = Settings(settings.size, settings.steps, schedulers=args.schedulers)
    geometry = assets.manifest.geometry
    candidate = CANDIDATES[args.candidate]
    context = CandidateContext(
        checkpoint,
        repo,
        partial(OnnxRuntimeEngines, repo, geometry),
        geometry,
        work_dir,
        args.vae_precision,
        args.noise,
        args.calibration_samples,
    )
    engines = candidate.make(context)
    gc.collect()  # an export's torch modules, before the reference's sessions load
    reference = context.reference
    budget = BUDGETS[candidate.precision]

    started = time.perf_counter()
    report = evaluate(reference, engines, assets, settings)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": f"`{checkpoint}`",
        "reference": f"fp32 ONNX repository `{repo}` (ONNX Runtime, in-process)",
        "candidate": f"`{args.candidate}`: {candidate.description}",
        "architecture": f"{arch} (the image thresholds applied)",
        "settings": f"{settings.size} px, {settings.steps} steps, {len(settings.prompts)} prompts × seeds "
        f"{list(settings.seeds)} × schedulers {[s or 'own' for s in settings.schedulers]}, "
        f'guidance {settings.guidance}, negative prompt ""',
        "command": "`python -m perf.quality " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        **machine(),
        "evaluation time": f"{time.perf_counter() - started:.0f} s",
    }
    title = f"Quality budget: {args.candidate} vs fp32 ({checkpoint.name}, {settings.size} px)"
    text = markdown(report, budget, arch, settings, title, header, context.notes)
    publish(text, args.out, "perf.quality")
    ok = within(report, budget, arch)
    if not ok:
        print(f"perf.quality: {args.candidate} is out of the {budget.precision} budget", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
