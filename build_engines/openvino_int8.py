"""build-engines --target openvino --precision int8-hybrid (and int8-hybrid-bf16, the same IR): the fp32 IR
compressed to int8 with NNCF, as optimum-intel's "hybrid quantization" does (our own code: no optimum-intel).

- The UNet's plain graph: int8 weights (`nncf.compress_weights`, INT8_ASYM: per output channel, with a zero
  point) for its MatMul and Gather ops with constant weights, then `nncf.quantize` with those ops ignored,
  so that what is left gets int8 activations (FakeQuantize), their ranges calibrated on the UNet's own
  inputs (below): the convolutions (with int8 weights) and attention's products of activations (OpenVINO's
  fused ScaledDotProductAttention, quantized as NNCF's transformer rules do). The projections and
  feed-forward layers keep fp32 activations: plain int8 PTQ of everything "does not work well for Stable
  Diffusion" (optimum-intel's documentation), and SmoothQuant is off, as their weights are compressed.
- The text encoder, the VAE and the UNet's LoRA branch graph (`lora/model.xml`, --lora): int8 weights
  only. The branch graph's LoRA factors are inputs, given per request at run time: those MatMuls have no
  constant weight to compress, and their activations, which depend on whichever LoRAs a request brings,
  would be calibrated on none. So requests with LoRAs run int8 weights with fp32 activations.

Calibration: the UNet's inputs at every step of our own fp32 pipeline (`python_backend.pipeline.generate`
on the fp32 IRs of the text encoder and UNet, converted first into a scratch folder) over a fixed set of
prompts shipped here, at the profile's opt size, with the checkpoint's scheduler and guidance 7.5: the
inputs the served UNet sees, without any data set to download. Its settings and the text encoder's export
record are part of the UNet IR's sidecar key, so a rebuild keeps the IR only when they are the same.

All of it runs at build time; the IR is served as any other (OpenVINO's CPU plugin runs the FakeQuantize'd
ops in int8 and decompresses the int8 weights of the others), compiled with an f32 hint, or for
int8-hybrid-bf16 a bf16 one: the ops left out of int8 then run in bf16 (full-size, 256 px, AVX512_BF16: UNet
0.64 instead of 0.71 s, VAE decoder 1.6 instead of 3.2 s), on a CPU with bf16 only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from build_engines.openvino_engine import Compression, Converted, convert_engine, onnx_record
from python_backend.engines import Engines, OpenVinoEngines
from python_backend.ov_sessions import ov
from python_backend.pipeline import Cancelled, PipelineAssets, Progress, generate
from python_backend.request import GenerationRequest
from python_backend.shapes import TEXT_ENCODER, UNET, EngineSpec

PRECISION = "int8-hybrid"
# UNet calls recorded for calibration. 200 is optimum-intel's default for hybrid quantization (its
# `num_samples`; OpenVINO's SD 2.1 notebook used 300): about 10 prompts × 20 steps, so that every prompt is
# seen at every stage of the schedule. Each costs one fp32 UNet call to record and one to collect statistics.
DEFAULT_SAMPLES = 200
STEPS = 20  # per calibration prompt: a common serving step count (fewer when fewer samples are asked for)
GUIDANCE = 7.5
SEED = 0  # prompt i is generated with seed SEED + i
# Varied subjects, styles and prompt lengths, as a server's traffic has them; cycled with new seeds when more
# samples are asked for than they give.
PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse on a cliff at dusk",
    "portrait of an old fisherman, detailed skin, 85mm, soft light",
    "a bowl of fruit on a wooden table, still life, oil on canvas",
    "a futuristic city skyline at night, neon lights, rain, cinematic",
    "a cute corgi puppy sitting in a field of sunflowers",
    "an ancient stone temple in a misty jungle, highly detailed, concept art",
    "a minimalist logo of a fox, flat vector, white background",
    "a snowy mountain range under a starry sky, long exposure photograph",
    "a cozy reading nook with bookshelves and a cat, warm lighting, illustration",
    "macro photo of a dew drop on a green leaf",
    "a medieval knight in ornate armor, fantasy art, dramatic lighting",
    "a plate of sushi on a black slate, food photography",
    "an abstract painting with bold red and blue shapes",
    "a vintage car parked on a cobblestone street in paris, film photo",
    "a child's crayon drawing of a house and a rainbow",
)


class Int8Unavailable(RuntimeError):
    pass


def require_nncf() -> ModuleType:
    """NNCF, imported after OpenVINO's telemetry is blocked (python_backend.ov_sessions): NNCF sends its own
    events through OpenVINO's telemetry package when it can import it, and uses a no-op stub when not."""
    try:
        import nncf
    except ImportError:
        raise Int8Unavailable(
            '--precision int8-hybrid needs NNCF, which is not installed: pip install -e ".[build]" (it pins '
            "nncf)"
        ) from None
    nncf.set_log_level(logging.WARNING)  # its INFO lists every op it leaves out
    return nncf


@dataclass(frozen=True)
class Graph:
    """One IR of an int8-hybrid build."""

    engine: str  # the engine it serves
    onnx: Path  # its checked ONNX export
    spec: EngineSpec
    out_dir: Path  # where its model.xml goes
    lora_branches: bool = False  # a LoRA branch graph (build-engines --lora)

    @property
    def calibrated(self) -> bool:
        """Whether it gets int8 activations: the UNet's plain graph."""
        return self.engine == UNET and not self.lora_branches


@dataclass(frozen=True)
class Calibration:
    """What the UNet's activation ranges are calibrated on (build-engines --calibration-samples; the
    profile's opt size)."""

    samples: int = DEFAULT_SAMPLES
    width: int = 512
    height: int = 512

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"calibration samples must be at least 1, got {self.samples}")

    @property
    def steps(self) -> int:
        # A few samples still span the schedule, from noise to the last step.
        return min(STEPS, self.samples)

    def requests(self) -> Iterator[GenerationRequest]:
        """One per prompt, cycling through PROMPTS with new seeds, without end."""
        for i in itertools.count():
            yield GenerationRequest(
                prompt=PROMPTS[i % len(PROMPTS)],
                width=self.width,
                height=self.height,
                num_inference_steps=self.steps,
                guidance_scale=GUIDANCE,
                seed=SEED + i,
            )

    def key(self) -> dict[str, Any]:
        prompts = hashlib.sha256(json.dumps([PROMPTS, GUIDANCE, SEED]).encode()).hexdigest()[:16]
        return {
            "samples": self.samples,
            "size": [self.width, self.height],
            "steps": self.steps,
            "set": prompts,
        }


class RecordingEngines(Engines):
    """`inner`, keeping a copy of every input it is given for engine `engine` (`feeds`, in call order)."""

    def __init__(self, inner: Engines, engine: str) -> None:
        self.inner, self.engine, self.device = inner, engine, inner.device
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, engine: str, inputs: dict[str, torch.Tensor], lora: str = "") -> dict[str, torch.Tensor]:
        if engine == self.engine:
            self.feeds.append({name: t.detach().cpu().numpy().copy() for name, t in inputs.items()})
        return self.inner.run(engine, inputs, lora)


def record_unet_feeds(
    engines: Engines, assets: PipelineAssets, calibration: Calibration
) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs over `calibration.samples` calls of `generate` on `engines`: each request stopped
    after its last step (the VAE never runs) or once there are enough."""
    recorder = RecordingEngines(engines, UNET)

    def stop(progress: Progress) -> None:
        if len(recorder.feeds) >= calibration.samples or progress.step == progress.total:
            raise Cancelled

    for request in calibration.requests():
        before = len(recorder.feeds)
        try:
            generate(request, recorder, assets, on_step=stop)
        except Cancelled:
            pass
        if len(recorder.feeds) >= calibration.samples:
            return recorder.feeds[: calibration.samples]
        if len(recorder.feeds) == before:  # not to loop forever on a pipeline that calls no UNet
            raise RuntimeError(f"calibration: {request.prompt!r} made no UNet call")
    raise AssertionError("unreachable: the requests never end")


def constant_weight_ops(model: ov.Model) -> list[str]:
    """The MatMul ops with a constant operand and the Gather ops on a constant table (embeddings): those
    int8-hybrid gives int8 weights only."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        operands = range(2) if kind == "MatMul" else range(1) if kind == "Gather" else range(0)
        if any(op.input_value(i).get_node().get_type_name() == "Constant" for i in operands):
            names.append(op.get_friendly_name())
    return names


def compress_weights(model: ov.Model, ignored: list[str] | None = None) -> ov.Model:
    """int8 weights (asymmetric, per output channel) for every op with constant weights: MatMul, Gather
    (embeddings), Convolution; but the ops named in `ignored`."""
    nncf = require_nncf()
    scope = nncf.IgnoredScope(names=ignored) if ignored else None
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)


def compress_branch_weights(model: ov.Model) -> ov.Model:
    """`compress_weights` for a LoRA branch graph, but for its 1x1 convolutions, whose weights stay as
    converted (fp16 stored). OpenVINO 2026.4's CPU plugin cannot compile the UNet's branch graph at static
    shapes when they are int8: "Requested output shape [2,1,64] is incompatible with input shape" at the
    Reshape after a transformer's proj_in (a 1x1 convolution with a LoCon branch beside it), measured on the
    tiny checkpoint; at dynamic shapes it compiles, and int8 3x3 convolutions compile either way. They are
    about 4% of SD v1's UNet weights (the transformers' proj_in and proj_out, the resnets' shortcuts)."""
    ones = [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "Convolution" and list(op.input_value(1).get_partial_shape())[2:] == [1, 1]
    ]
    return compress_weights(model, ones)


def quantize_hybrid(model: ov.Model, feeds: list[dict[str, np.ndarray]]) -> ov.Model:
    """int8 weights for the MatMul and Gather ops; int8 weights and activations for the convolutions and
    int8 inputs for attention's products, activation ranges from `feeds`."""
    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    weight_only = constant_weight_ops(model)
    compressed = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT8_ASYM,
        ignored_scope=nncf.IgnoredScope(types=["Convolution"]),  # quantized below, with their activations
    )
    return nncf.quantize(
        compressed,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,  # no quantizers around normalization, softmax, element-wise
        ignored_scope=nncf.IgnoredScope(names=weight_only),
        subset_size=len(feeds),
        # SmoothQuant moves scale from activations into weights: not for weights already compressed
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
        ),
    )


class Int8Converter:
    """Converts the `graphs` of an int8-hybrid build, each only when its sidecar is not up to date. The
    calibration (fp32 IRs of the text encoder and UNet in `scratch`, then the pipeline over them) runs at
    most once, and only when the UNet is converted."""

    def __init__(
        self, graphs: list[Graph], calibration: Calibration, assets: PipelineAssets, scratch: Path
    ) -> None:
        self.graphs, self.calibration, self.assets, self.scratch = graphs, calibration, assets, scratch
        sources = {g.engine: g for g in graphs if g.engine == TEXT_ENCODER or g.calibrated}
        if set(sources) != {TEXT_ENCODER, UNET}:
            raise ValueError(
                f"calibration needs the text encoder's and the UNet's graphs, got {sorted(sources)}"
            )
        self.sources = sources
        self.nncf_version = require_nncf().__version__

    def convert(self, graph: Graph) -> Converted:
        return convert_engine(graph.onnx, graph.spec, graph.out_dir, PRECISION, self.compression(graph))

    def compression(self, graph: Graph) -> Compression:
        key: dict[str, Any] = {"nncf": self.nncf_version, "weights": "int8_asym"}
        if graph.lora_branches:
            return Compression({**key, "kept": "1x1 convolutions"}, compress_branch_weights)
        if not graph.calibrated:
            return Compression(key, compress_weights)
        calibration = {**self.calibration.key(), TEXT_ENCODER: onnx_record(self.sources[TEXT_ENCODER].onnx)}
        key |= {"activations": "int8", "calibration": calibration}
        return Compression(key, lambda model: quantize_hybrid(model, self.unet_feeds))

    @cached_property
    def unet_feeds(self) -> list[dict[str, np.ndarray]]:
        try:
            for graph in self.sources.values():
                convert_engine(graph.onnx, graph.spec, self.scratch / graph.engine / "1", "fp32")
            geometry = self.assets.manifest.geometry
            engines = OpenVinoEngines(self.scratch, geometry, "fp32", only=list(self.sources))
            return record_unet_feeds(engines, self.assets, self.calibration)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)  # not to be published with the repository
