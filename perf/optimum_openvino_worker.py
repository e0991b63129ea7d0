"""optimum-intel's OVStableDiffusionPipeline as a worker process, run with the python of the venv that
perf/optimum_openvino.py makes (its own transformers, diffusers, numpy, torch). It imports nothing from this
project.

    python optimum_openvino_worker.py --checkpoint DIR --cache DIR --size 512 --precision f32
    python optimum_openvino_worker.py --checkpoint DIR --cache DIR --export-only
    ... [--int8-hybrid-samples N --calibration-prompts FILE]

Loads the diffusers checkpoint as FastSD CPU does: `OVStableDiffusionPipeline.from_pretrained(...,
export=True, compile=False)`, the exported OpenVINO IR saved in --cache (keyed by the checkpoint's path and
newest file time: a second run loads it with `from_pretrained(IR, compile=False, ov_config=...)`), a static
reshape to one size × size image, then `compile()`. The precision is set explicitly
(ov_config's INFERENCE_PRECISION_HINT); threads are OpenVINO's default (all cores). With
--int8-hybrid-samples the pipeline served is optimum-intel's hybrid quantization of that IR (see
quantize_hybrid), made once and kept in --cache beside it. With --export-only it
exports the IR (unless it is there), answers and exits: perf.compare exports in a process of its own before
it loads its other contestants, so that the export's peak memory (GBs at full size) is not added to theirs.
Else it serves requests, one JSON object per line on stdin:

    {"prompt": "...", "seed": 42, "steps": 4, "guidance": 7.5, "out": "/path/image.npy"}

makes the image (negative prompt "", the checkpoint's own scheduler, one CPU torch generator seeded with
`seed`, output_type "np"), writes it as uint8 [1, H, W, 3] to `out` and answers {"path": out, "s": seconds}
(or {"error": "..."}) on stdout. The first stdout line is {"ready": true, ...} with what it loaded, or
{"error": "..."}. Everything else it or its libraries print goes to stderr. Ends at the end of stdin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# OpenVINO's CPU plugin takes these; the precision of the compiled models when none is set depends on the CPU
# (bf16 where it has AMX/AVX-512 bf16), so it is always given.
PRECISIONS = ("f32", "bf16")
# OpenVINO's package sends usage telemetry as it is imported unless told not to; without its telemetry module
# it uses its own no-op stub (as python_backend/ov_sessions.py does for the server and the build).
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # None: "not importable"


def checkpoint_key(checkpoint: Path) -> str:
    """The checkpoint's path and the time of its newest file: a new export when either changes."""
    newest = max(p.stat().st_mtime_ns for p in checkpoint.rglob("*") if p.is_file())
    return hashlib.sha256(f"{checkpoint.resolve()}\0{newest}".encode()).hexdigest()[:16]


def readable_checkpoint(checkpoint: Path, work: Path) -> Path:
    """The checkpoint as this venv's transformers reads it. transformers 5.24 (ours) saves CLIPTextModel
    without the `text_model.` prefix of its keys, which the transformers optimum-intel supports (< 5.6) needs:
    it would load such a text encoder with random weights. Then a copy of the checkpoint is made in `work`
    (links to every file but the text encoder's weights, which are written again with the prefix); else the
    checkpoint itself."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = checkpoint / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        return checkpoint
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
        if all(k.startswith("text_model.") for k in keys):
            return checkpoint
        tensors = {k if k.startswith("text_model.") else f"text_model.{k}": f.get_tensor(k) for k in keys}
        metadata = f.metadata()
    copy = work / "checkpoint"
    shutil.rmtree(copy, ignore_errors=True)
    for path in sorted(checkpoint.rglob("*")):
        target = copy / path.relative_to(checkpoint)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path != weights:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    save_file(tensors, str(copy / "text_encoder" / "model.safetensors"), metadata=metadata)
    print(f"worker: text encoder keys given the text_model. prefix in {copy}", file=sys.stderr)
    return copy


def export(checkpoint: Path, cache: Path) -> tuple[Path, bool]:
    """The checkpoint's OpenVINO IR in `cache` (exported now, or before): its folder, and whether it was
    exported now. fp32 weights as in the checkpoint, no weight compression whatever the size."""
    import gc

    from optimum.intel import OVStableDiffusionPipeline

    work = cache / checkpoint_key(checkpoint)
    ir = work / "ir"
    if (ir / "model_index.json").is_file():
        return ir, False
    source = readable_checkpoint(checkpoint, work)
    pipe = OVStableDiffusionPipeline.from_pretrained(source, export=True, compile=False, load_in_8bit=False)
    partial = work / "ir.partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    del pipe
    gc.collect()
    partial.rename(ir)
    if source != checkpoint:
        shutil.rmtree(source)
    return ir, True


def quantize_hybrid(ir: Path, samples: int, prompts: list[str]) -> tuple[Path, bool]:
    """optimum-intel's hybrid quantization of the fp32 IR `ir`, as its documentation gives it for Stable
    Diffusion (`OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=..., num_samples=...)`): the
    UNet's MatMul and Gather weights int8, its other ops int8 with activations calibrated on `samples` UNet
    calls of its own pipeline over `prompts` (its loop: 512 px, the pipeline's default 50 steps, prompt after
    prompt until it has enough), the text encoder and VAE int8 weights only. Kept beside `ir`, one folder per
    samples and prompts: the folder, and whether it was made now."""
    import gc

    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    digest = hashlib.sha256(json.dumps([samples, prompts]).encode()).hexdigest()[:16]
    quantized = ir.parent / f"ir-int8-hybrid-{digest}"
    if (quantized / "model_index.json").is_file():
        return quantized, False
    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts, num_samples=samples)
    pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, quantization_config=config)
    partial = quantized.with_name(quantized.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    del pipe
    gc.collect()
    partial.rename(quantized)
    return quantized, True


def prepare(checkpoint: Path, cache: Path, hybrid: tuple[int, list[str]] | None) -> dict[str, Any]:
    """The IR to serve, exported and (with `hybrid`: samples and prompts) quantized unless an earlier run did:
    its folder and what was made now, with the seconds it took."""
    started = time.perf_counter()
    ir, exported = export(checkpoint, cache)
    info: dict[str, Any] = {"exported": exported, "export_s": round(time.perf_counter() - started, 3)}
    if hybrid is not None:
        started = time.perf_counter()
        ir, info["quantized"] = quantize_hybrid(ir, *hybrid)
        info["quantize_s"] = round(time.perf_counter() - started, 3)
    info["ir"] = str(ir)
    return info


def fake_quantize_ops(ir: Path) -> int:
    """How many of the UNet IR's ops quantize activations (0 but for an int8-hybrid IR)."""
    import openvino as ov

    unet = ov.Core().read_model(ir / "unet" / "openvino_model.xml")
    return sum(op.get_type_name() == "FakeQuantize" for op in unet.get_ops())


def load(
    checkpoint: Path, cache: Path, size: int, precision: str, hybrid: tuple[int, list[str]] | None
) -> tuple[Any, dict[str, Any]]:
    """The compiled pipeline and what to report about it."""
    from optimum.intel import OVStableDiffusionPipeline

    info = prepare(checkpoint, cache, hybrid)
    ir = Path(info["ir"])
    info["unet_fake_quantize"] = fake_quantize_ops(ir)
    # OpenVINO's model cache (compiled models, per shape and precision) without the weights, which it reads
    # from the IR: at full size a blob with them would add the UNet's 3.4 GB again for each size.
    ov_config = {
        "INFERENCE_PRECISION_HINT": precision,
        "CACHE_DIR": str(ir.parent / "ov-cache"),
        "CACHE_MODE": "OPTIMIZE_SIZE",
    }
    started = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, ov_config=ov_config)
    info["load_s"] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    info["compile_s"] = round(time.perf_counter() - started, 3)
    info["scheduler"] = type(pipe.scheduler).__name__
    try:  # what the compiled UNet really runs with (a hint the CPU cannot honour falls back)
        compiled = pipe.unet.request
        precision_type = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
        info["unet_precision"] = getattr(precision_type, "to_string", lambda: str(precision_type))()
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    except Exception as e:  # property names differ between OpenVINO versions: report, do not fail
        info["unet_precision"] = f"unknown ({type(e).__name__}: {e})"
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


def versions() -> dict[str, str]:
    import importlib.metadata

    names = ("optimum-intel", "optimum", "openvino", "transformers", "diffusers", "torch", "numpy")
    return {name: importlib.metadata.version(name) for name in names}


def generate(pipe: Any, size: int, request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    started = time.perf_counter()
    images = pipe(
        request["prompt"],
        negative_prompt="",
        height=size,
        width=size,
        num_inference_steps=int(request["steps"]),
        guidance_scale=float(request["guidance"]),
        generator=torch.Generator("cpu").manual_seed(int(request["seed"])),
        output_type="np",
    ).images
    image = (np.asarray(images) * 255).round().astype(np.uint8)
    np.save(request["out"], image)
    return {"path": request["out"], "s": round(time.perf_counter() - started, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="exported IR and OpenVINO's model cache")
    parser.add_argument("--size", type=int, help="image side (static reshape)")
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="export (and quantize) the IR into --cache (unless there), answer, exit",
    )
    parser.add_argument("--int8-hybrid-samples", type=int, help="hybrid-quantize on this many UNet calls")
    parser.add_argument("--calibration-prompts", type=Path, help="JSON list of prompts to calibrate on")
    args = parser.parse_args()
    if not args.export_only and (args.size is None or args.precision is None):
        parser.error("--size and --precision are needed, but with --export-only")
    if (args.int8_hybrid_samples is None) != (args.calibration_prompts is None):
        parser.error("--int8-hybrid-samples and --calibration-prompts go together")
    hybrid = None
    if args.int8_hybrid_samples is not None:
        hybrid = (args.int8_hybrid_samples, json.loads(args.calibration_prompts.read_text()))

    # The protocol owns stdout: anything else printed there (by optimum, diffusers, C++ code) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def answer(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        if args.export_only:
            answer({"ready": True, **prepare(args.checkpoint.resolve(), args.cache, hybrid)})
            return 0
        pipe, info = load(args.checkpoint.resolve(), args.cache, args.size, args.precision, hybrid)
        answer({"ready": True, "versions": versions(), **info})
    except Exception as e:
        traceback.print_exc()
        answer({"error": f"{type(e).__name__}: {e}"})
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer(generate(pipe, args.size, json.loads(line)))
        except Exception as e:
            traceback.print_exc()
            answer({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
