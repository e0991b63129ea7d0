"""Convert our checked ONNX exports to OpenVINO IR (model.xml + model.bin) for the openvino target, and check
each IR against ONNX Runtime.

The IR keeps the ONNX file's dynamic axes, and names them (ov_sessions.AXES_INFO): the engine model compiles
it once for every shape, or per image count and size (python_backend/ov_sessions.py). Weights are stored fp32
for an fp32 build and fp16 for a bf16 one (half the file and the memory map; OpenVINO converts them to bf16
when it compiles). An int8-hybrid build passes a `Compression` (build_engines/openvino_int8.py: NNCF's int8
weights, and int8 activations where it calibrated them) applied to the converted model before it is saved.

A JSON sidecar records what the IR was made from (the ONNX export's own record, the IR's precision, OpenVINO's
version, the compression's settings); a later build with the same record keeps it. The IR's precision is
ov_sessions.IR_PRECISION's: int8-hybrid and int8-hybrid-bf16 differ only in how the engine model compiles it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from build_engines.onnx_export import CHECK_SIZES, sample_inputs
from python_backend.ov_sessions import AXES_INFO, IR_FILE, IR_PRECISION, compile_config, ov
from python_backend.shapes import EngineSpec, with_scaled_latents

WEIGHTS_FILE = "model.bin"
SIDECAR_FILE = "model.xml.json"
IR_FORMAT = 2  # bump when the conversion itself changes, so that kept IR files are redone (2: AXES_INFO)
# The IR run in f32 vs ONNX Runtime on the same inputs (CHECK_SIZES), relative L2 error per output. fp32: the
# same weights, only kernels differ (measured ≤ 3e-6 on the full-size UNet). bf16 builds store fp16 weights:
# their rounding alone (measured: ≈ 5e-4 relative on the tiny UNet). int8-hybrid (openvino_int8.py) is int8
# rounding of weights and of the UNet's convolution inputs, measured on the tiny checkpoint: UNet 5.9e-2 (8
# calibration samples at 256 px) to 9.1e-2 (200 at 512 px; the check's random inputs lie partly outside the
# calibrated ranges), VAE decoder 2.4e-2, text encoder 1.9e-2, VAE encoder 1.0e-2. 0.2 is the int8 quality
# budget's per-engine limit (perf/quality.py), which judges the images; this check catches a broken
# quantization (wrong ranges or weights give errors of order 1).
MAX_REL_ERROR = {"fp32": 1e-4, "bf16": 1e-2, "int8-hybrid": 0.2}  # per IR precision (IR_PRECISION's values)
assert set(MAX_REL_ERROR) == set(IR_PRECISION.values())
CHECK_RANK = 3  # LoRA branches' rank in that check


class ConversionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Compression:
    """What NNCF does to a converted model before it is saved (int8-hybrid: build_engines/openvino_int8.py).
    `key`: its settings, recorded in the sidecar, so that an IR compressed otherwise is made again."""

    key: dict[str, Any]
    apply: Callable[[Any], Any]  # ov.Model -> ov.Model


@dataclass(frozen=True)
class Converted:
    path: Path
    rel_error: float  # the largest over the outputs, vs ONNX Runtime
    reused: bool


def convert_engine(
    onnx_path: Path, spec: EngineSpec, out_dir: Path, precision: str, compression: Compression | None = None
) -> Converted:
    """out_dir/model.xml from `onnx_path` (an export with its sidecar), unless an up-to-date one is there.
    `precision`: the IR's (ov_sessions.IR_PRECISION). `compression`: int8-hybrid's (and only its: the other
    precisions are the converted graph as it is)."""
    if precision not in MAX_REL_ERROR:
        raise ValueError(f"precision must be one of {tuple(MAX_REL_ERROR)}, got {precision!r}")
    if (compression is not None) != (precision == "int8-hybrid"):
        raise ValueError(f"precision {precision!r} with compression {compression and compression.key}")
    key: dict[str, Any] = {
        "onnx": onnx_record(onnx_path),
        "precision": precision,
        "openvino": ov.get_version(),
        "ir_format": IR_FORMAT,
    }
    if compression is not None:
        key["compression"] = compression.key
    target, sidecar = out_dir / IR_FILE, out_dir / SIDECAR_FILE
    if target.exists() and sidecar.exists():
        recorded = json.loads(sidecar.read_text())
        if recorded.get("key") == key:
            return Converted(target, recorded["rel_error"], reused=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (target, sidecar, out_dir / WEIGHTS_FILE):
        stale.unlink(missing_ok=True)
    model = ov.convert_model(onnx_path)
    if compression is not None:
        model = compression.apply(model)
    # The axes' names, which the IR's shapes do not keep: the engine model compiles per image axes' sizes.
    model.set_rt_info(
        json.dumps({t.name: [d if isinstance(d, str) else None for d in t.dims] for t in spec.inputs}),
        AXES_INFO,
    )
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        ov.save_model(model, Path(tmp) / IR_FILE, compress_to_fp16=precision != "fp32")
        del model
        (Path(tmp) / WEIGHTS_FILE).rename(out_dir / WEIGHTS_FILE)
        (Path(tmp) / IR_FILE).rename(target)
    error = check_against_onnx(spec, target, onnx_path)
    if error > MAX_REL_ERROR[precision]:
        raise ConversionError(
            f"{spec.name}: the OpenVINO IR differs from ONNX Runtime by {error:.2e} relative "
            f"(limit {MAX_REL_ERROR[precision]:.0e})"
        )
    sidecar.write_text(json.dumps({"key": key, "rel_error": error}, indent=2) + "\n")
    return Converted(target, error, reused=False)


def onnx_record(onnx_path: Path) -> dict[str, Any]:
    """What an ONNX export was made from (onnx_export.export_engine's sidecar)."""
    return dict(json.loads(onnx_path.with_name(onnx_path.name + ".json").read_text())["key"])


def check_against_onnx(spec: EngineSpec, ir: Path, onnx_path: Path) -> float:
    """The IR compiled in f32 vs ONNX Runtime, on the export check's inputs: the largest relative L2 error
    over the outputs. f32, whatever the build's precision: this checks the conversion; the reduced precision
    itself is judged by the quality budget (perf/quality.py)."""
    # Axes the export check has no size for: a LoRA branch graph's rank per layer (lora_branch.py)
    sized = with_scaled_latents(CHECK_SIZES)
    axes = {d for t in spec.inputs for d in t.dims if isinstance(d, str)} - sized.keys()
    feeds = sample_inputs(spec, {**CHECK_SIZES, **dict.fromkeys(axes, CHECK_RANK)}, seed=1)
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(ir), "CPU", compile_config("fp32", None))
    results = compiled(feeds)
    errors = [
        float(np.linalg.norm(results[i] - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        for i, ref in enumerate(reference)
    ]
    return max(errors)
