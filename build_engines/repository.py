"""Write a Triton model repository: one model per engine plus the `pipeline` model.

config.pbtxt files are built as Triton's own ModelConfig protobuf from `shapes.engine_specs` and
`request.REQUEST_INPUTS`, so names, dtypes and dims cannot drift from what the code expects.

A checkpoint built with a prefix names each of its models `PREFIX_<model>` (`shapes.triton_model`), so
several checkpoints share one repository; every function here writes and removes only inside the folders
of the models it names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engines.onnx_export import EXTERNAL_DATA
from python_backend import schedulers
from python_backend.adapters import LORA_INPUT
from python_backend.control import unit_inputs
from python_backend.ov_sessions import (
    DEFAULT_COMPILED_LIMIT,
    INFERENCE_PRECISION,
    RELEASE_AFTER_RUN,
    STATIC,
    runs_once_per_request,
)
from python_backend.pipeline import EMBEDDINGS_FILE, LORA_TARGETS_FILE, SCHEDULER_CONFIG, TOKENIZER_DIR
from python_backend.request import CONTROL_INPUTS, REQUEST_INPUTS, STREAM_INPUTS
from python_backend.shapes import (
    BATCH_AXES,
    CONTROLNET,
    LORA_LIBRARY,
    OPEN_ON_FIRST_REQUEST,
    PIPELINE,
    PIPELINE_MANIFEST,
    UNET,
    VAE_ENCODER,
    EngineSpec,
    PipelineManifest,
    Profile,
    stream_model,
    triton_model,
)

# The hand-written python models that build-engines copies into the repository it writes.
SOURCES = Path(__file__).resolve().parents[1] / "model_repository"
OPENVINO_FILES = ("model.xml", "model.bin", "model.xml.json")  # an OpenVINO engine's IR and its sidecar
PIPELINE_CONTROL = "pipeline_control"  # interrupt / skip of running generations (python_backend.jobs)

TRITON_DTYPES = {
    np.float32: mc.TYPE_FP32,
    np.float16: mc.TYPE_FP16,
    np.int32: mc.TYPE_INT32,
    np.int64: mc.TYPE_INT64,
    np.uint8: mc.TYPE_UINT8,
    np.object_: mc.TYPE_STRING,
    np.bool_: mc.TYPE_BOOL,
}


def _tensor(
    message: mc.ModelInput | mc.ModelOutput, name: str, dtype: type[np.generic], dims: tuple[int, ...]
):
    message.name = name
    message.data_type = TRITON_DTYPES[dtype]
    message.dims.extend(dims)
    return message


def python_engine_config(
    spec: EngineSpec,
    profile: Profile,
    prefix: str = "",
    unet_batch_delay_ms: float = 0.0,
    lora_component: str | None = None,
    gpu: bool = False,
) -> mc.ModelConfig:
    """A python-backend model hosting the engine (model_repository/engine): its ONNX file on ONNX Runtime
    (CPU), or with `gpu` its TensorRT plan. `lora_component`: the graph has LoRA branches for that
    component's layers; the model then takes each row's LoRA set (`lora`, optional: a client calling the
    engine directly may leave it out)."""
    config = mc.ModelConfig(name=triton_model(prefix, spec.name), backend="python")
    config = _engine_config(config, spec, profile, gpu, unet_batch_delay_ms)
    if lora_component is not None:
        _tensor(config.input.add(), LORA_INPUT, np.object_, (1,)).optional = True
        config.parameters["lora_component"].string_value = lora_component
    if spec.name == VAE_ENCODER:  # only img2img and inpainting use it
        config.parameters[OPEN_ON_FIRST_REQUEST].string_value = "true"
    return config


def tensorrt_engine_config(
    spec: EngineSpec, profile: Profile, prefix: str = "", unet_batch_delay_ms: float = 0.0
) -> mc.ModelConfig:
    """A `tensorrt_plan` model."""
    config = mc.ModelConfig(name=triton_model(prefix, spec.name), platform="tensorrt_plan")
    return _engine_config(config, spec, profile, True, unet_batch_delay_ms)


def openvino_native_config(spec: EngineSpec, precision: str, prefix: str = "") -> mc.ModelConfig:
    """A model for Triton's own openvino backend (NGC images; not in the pip-installed Triton). It takes
    no bounded dynamic shapes and batches only to exactly max_batch_size, so: max_batch_size 0, the batch
    axis in the dims, no dynamic batcher (concurrent requests' UNet calls run one after another), the IR as
    converted (dynamic axes: compiled once for every shape). It cannot be told to run f32 on a CPU with
    bf16: an fp32 build there runs bf16, and an int8-hybrid one its unquantized ops (sd-serve says so). bf16
    and int8-hybrid-bf16 hint bf16."""
    config = mc.ModelConfig(name=triton_model(prefix, spec.name), backend="openvino", max_batch_size=0)
    for t in spec.inputs:
        _tensor(config.input.add(), t.name, t.dtype, t.concrete_dims())
    for t in spec.outputs:
        _tensor(config.output.add(), t.name, t.dtype, t.concrete_dims())
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["PERFORMANCE_HINT"].string_value = "LATENCY"
    config.parameters["NUM_STREAMS"].string_value = "1"
    if INFERENCE_PRECISION[precision] == "bf16":
        config.parameters["HINT_BF16"].string_value = "YES"
    return config


def _engine_config(
    config: mc.ModelConfig, spec: EngineSpec, profile: Profile, gpu: bool, unet_batch_delay_ms: float
) -> mc.ModelConfig:
    """The batch axis is Triton's (max_batch_size > 0), so the UNet's dynamic batcher can merge calls
    from concurrent requests (at different steps: the timestep is per sample) into one engine run.
    Triton only merges calls whose other dims agree (same size, same prompt length)."""
    batch_axes = {str(t.dims[0]) for t in (*spec.inputs, *spec.outputs)}
    if len(batch_axes) != 1 or not BATCH_AXES >= batch_axes:
        raise ValueError(f"{spec.name}: every tensor must lead with the same batch axis, got {batch_axes}")
    config.max_batch_size = profile.axis_ranges()[batch_axes.pop()][2]
    for t in spec.inputs:
        _tensor(config.input.add(), t.name, t.dtype, t.concrete_dims()[1:])
    for t in spec.outputs:
        _tensor(config.output.add(), t.name, t.dtype, t.concrete_dims()[1:])
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=1)  # one copy of the weights
    if spec.name == UNET or spec.name.startswith(f"{CONTROLNET}_"):  # a ControlNet runs per step too
        # No preferred sizes. Calls that queue while the UNet runs go into its next run together (the
        # largest batch the queue holds). With no delay (the default) an idle server adds no wait to a call;
        # a delay holds a lone call up to that long for others to join it, so that concurrent requests meet
        # even when each one's per-step work is as long as a UNet run (small images, a busy CPU).
        config.dynamic_batching.SetInParent()  # present even when every field keeps its default
        config.dynamic_batching.max_queue_delay_microseconds = round(unet_batch_delay_ms * 1000)
    return config


@dataclass(frozen=True)
class OpenVinoOptions:
    """The openvino target's engines (build-engines --precision, --openvino-shapes, --openvino-backend)."""

    precision: str = "fp32"
    shapes: str = STATIC
    compiled_shapes: int = DEFAULT_COMPILED_LIMIT
    native: bool = False  # Triton's openvino backend instead of our python model


@dataclass(frozen=True)
class ServingOptions:
    """How the pipeline models take load (build-engines' "serving" options).

    One instance (its process imports torch: ~250 MB) generates up to `max_concurrent_requests` requests
    at once in worker threads. Requests beyond those wait in Triton's queue: at most `max_queue_size`
    (0: unbounded), each at most `queue_timeout_s` (0: forever; a client's shorter request timeout wins).
    Past either limit Triton refuses at once with UNAVAILABLE, which a client retries elsewhere or later.
    `response_cache` (`pipeline` only: Triton caches no decoupled model) answers a repeated request.
    """

    max_concurrent_requests: int = 1
    max_queue_size: int = 32
    queue_timeout_s: float = 300.0
    response_cache: bool = False


def pipeline_config(
    default_scheduler: schedulers.SchedulerChoice,
    streaming: bool = False,
    serving: ServingOptions = ServingOptions(),
    manifest: PipelineManifest | None = None,
    token_table: dict[str, Any] | None = None,
) -> mc.ModelConfig:
    """`pipeline`, or with `streaming` the decoupled `pipeline_stream` (same model.py): progress and
    previews over gRPC streaming, cancellable. Both prefixed by the manifest's prefix."""
    pipeline = triton_model(manifest.prefix if manifest else "", PIPELINE)
    config = mc.ModelConfig(
        name=stream_model(pipeline) if streaming else pipeline, backend="python", max_batch_size=0
    )
    units = unit_inputs(manifest.controlnet_units if manifest else 0)  # ControlNet units' fields
    for name, dtype in (
        REQUEST_INPUTS | units | CONTROL_INPUTS | (STREAM_INPUTS if streaming else {})
    ).items():
        _tensor(config.input.add(), name, dtype, (1,)).optional = name != "prompt"
    _tensor(config.output.add(), "images", np.uint8, (-1, -1, -1, 3))
    _tensor(config.output.add(), "info", np.object_, (1,))
    if streaming:
        _tensor(config.output.add(), "progress", np.object_, (1,))  # JSON: step, total, elapsed_s
        _tensor(config.output.add(), "preview", np.object_, (1,))  # PNG
        config.model_transaction_policy.decoupled = True
    else:
        config.response_cache.enable = serving.response_cache
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.parameters["max_concurrent_requests"].string_value = str(serving.max_concurrent_requests)
    # Clients use one of `pipeline` and `pipeline_stream` (the A1111 gateway the stream): each imports torch
    # and diffusers (~300 MB) with its first request, so that the one left unused does not hold them.
    config.parameters[OPEN_ON_FIRST_REQUEST].string_value = "true"
    # The dynamic batcher here only for its queue policy (max_batch_size 0: one request per execute).
    # Requests wait in its queue while every worker is busy (model.py blocks in execute), so the queue
    # metrics (and an autoscaler reading them) see them and the policy bounds them.
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = serving.max_queue_size
    policy.default_timeout_microseconds = round(serving.queue_timeout_s * 1e6)
    policy.allow_timeout_override = True  # a request's own `timeout` (only shorter) also bounds its wait
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    listing = [
        {"name": s.name, "a1111": s.a1111, **({"default": True} if s == default_scheduler else {})}
        for s in schedulers.SCHEDULERS
    ]
    config.parameters["schedulers"].string_value = json.dumps(listing)
    if manifest is not None:
        # Which checkpoint this is, for clients that list models without generating (sd-gateway's
        # /sdapi/v1/sd-models, sd-vae, embeddings): the names the `info` output reports.
        checkpoint: dict[str, Any] = {"model": manifest.model_name, "model_hash": manifest.model_hash}
        if manifest.vae_name:
            checkpoint.update(vae=manifest.vae_name, vae_hash=manifest.vae_hash)
        if manifest.controlnets:
            checkpoint["controlnets"] = list(manifest.controlnets)
        if token_table:
            width = manifest.geometry.text_hidden_size
            checkpoint["embeddings"] = {
                name: {"vectors": len(e["vector_ids"]), "shape": width, "hash": e["hash"]}
                for name, e in token_table.items()
            }
        config.parameters["checkpoint"].string_value = json.dumps(checkpoint)
    # No FORCE_CPU_ONLY_INPUT_TENSORS "no", on either target: that parameter only lets the model's own
    # request inputs arrive in GPU memory (e.g. from a client's CUDA shared memory), where model.py's
    # as_numpy() fails. BLS outputs of GPU engines stay on the GPU without it: "If you do not specify the
    # preferred_memory parameter, the output tensors will be allocated on the same device where the output
    # tensors were received from the model" (Triton's BLS documentation).
    return config


def control_config() -> mc.ModelConfig:
    """`pipeline_control`: job_id (+ action) in, whether that job was running out. One instance: each
    request is a file check and write."""
    config = mc.ModelConfig(name=PIPELINE_CONTROL, backend="python", max_batch_size=0)
    _tensor(config.input.add(), "job_id", np.object_, (1,))
    _tensor(config.input.add(), "action", np.object_, (1,)).optional = True
    _tensor(config.output.add(), "found", np.bool_, (1,))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return config


def lora_library_config() -> mc.ModelConfig:
    """`lora_library`: the server's LoRA files (refresh: scan the folder again first), as JSON."""
    config = mc.ModelConfig(name=LORA_LIBRARY, backend="python", max_batch_size=0)
    _tensor(config.input.add(), "refresh", np.bool_, (1,)).optional = True
    _tensor(config.output.add(), "loras", np.object_, (1,))
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    return config


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def engine_dir(repository: Path, engine: str, prefix: str = "") -> Path:
    """The folder of a checkpoint's engine model (Triton's model name is its folder's)."""
    return repository / triton_model(prefix, engine)


def onnx_dir(repository: Path, engine: str, target: str, prefix: str = "") -> Path:
    """Where an engine's ONNX file goes: it is the model itself on the onnx target, and the source of the
    TensorRT plan or OpenVINO IR beside it otherwise (Triton ignores non-numeric folders)."""
    return engine_dir(repository, engine, prefix) / ("1" if target == "onnx" else "onnx")


def write_onnx_runtime_model(
    repository: Path,
    spec: EngineSpec,
    profile: Profile,
    prefix: str = "",
    unet_batch_delay_ms: float = 0.0,
    lora_component: str | None = None,
) -> None:
    """config.pbtxt and model.py of an ONNX Runtime engine model (its model.onnx is exported there)."""
    model_dir = engine_dir(repository, spec.name, prefix)
    config = python_engine_config(spec, profile, prefix, unet_batch_delay_ms, lora_component)
    write_config(model_dir, config)
    if lora_component is None:  # a build without --lora after one with it
        shutil.rmtree(model_dir / "1" / "lora", ignore_errors=True)
    _remove(model_dir / "1", "model.plan", "model.plan.json", *OPENVINO_FILES)
    shutil.copyfile(SOURCES / "engine" / "1" / "model.py", model_dir / "1" / "model.py")


def write_openvino_model(
    repository: Path,
    spec: EngineSpec,
    profile: Profile,
    openvino: OpenVinoOptions,
    prefix: str = "",
    unet_batch_delay_ms: float = 0.0,
    lora_component: str | None = None,
) -> None:
    """config.pbtxt (and model.py) of an OpenVINO engine model (its model.xml is converted there): our
    python model (model_repository/engine, python_backend/ov_sessions.py), or with `openvino.native` Triton's
    openvino backend."""
    model_dir = engine_dir(repository, spec.name, prefix)
    _remove(
        model_dir / "1", "model.onnx", "model.onnx.json", "model.onnx.data", "model.plan", "model.plan.json"
    )
    if lora_component is None:
        shutil.rmtree(model_dir / "1" / "lora", ignore_errors=True)
    if openvino.native:
        write_config(model_dir, openvino_native_config(spec, openvino.precision, prefix))
        _remove(model_dir / "1", "model.py")
        return
    config = python_engine_config(spec, profile, prefix, unet_batch_delay_ms, lora_component)
    config.parameters["precision"].string_value = openvino.precision
    config.parameters["shapes"].string_value = openvino.shapes
    config.parameters["compiled_shapes"].string_value = str(openvino.compiled_shapes)
    if runs_once_per_request(spec.name):
        config.parameters[RELEASE_AFTER_RUN].string_value = "true"
    write_config(model_dir, config)
    (model_dir / "1").mkdir(exist_ok=True)  # int8-hybrid IRs are converted into it after this
    shutil.copyfile(SOURCES / "engine" / "1" / "model.py", model_dir / "1" / "model.py")


def write_tensorrt_model(
    repository: Path,
    spec: EngineSpec,
    profile: Profile,
    prefix: str = "",
    unet_batch_delay_ms: float = 0.0,
    lora_component: str | None = None,
) -> None:
    """config.pbtxt of a TensorRT engine model (its model.plan is built there): Triton's tensorrt backend
    runs it, unless it has LoRA branches (`lora_component`): then our python model hosts it on the GPU
    (python_backend/trt_sessions.py), as Triton's backend cannot feed each row its LoRA factors."""
    model_dir = engine_dir(repository, spec.name, prefix)
    _remove(model_dir / "1", "model.onnx", "model.onnx.json", "model.onnx.data", *OPENVINO_FILES)
    if lora_component is None:
        write_config(model_dir, tensorrt_engine_config(spec, profile, prefix, unet_batch_delay_ms))
        shutil.rmtree(
            model_dir / "1" / "lora", ignore_errors=True
        )  # a build without --lora after one with it
        _remove(model_dir / "1", "model.py")
        return
    config = python_engine_config(spec, profile, prefix, unet_batch_delay_ms, lora_component, gpu=True)
    write_config(model_dir, config)
    shutil.copyfile(SOURCES / "engine" / "1" / "model.py", model_dir / "1" / "model.py")


def _remove(folder: Path, *names: str) -> None:
    """Drop what a build for the other target left, so each model folder holds one kind of model."""
    for name in names:
        (folder / name).unlink(missing_ok=True)


def write_pipeline_model(
    repository: Path,
    checkpoint: Path,
    manifest: PipelineManifest,
    serving: ServingOptions = ServingOptions(),
    token_table: dict[str, Any] | None = None,
    lora_targets: dict[str, dict[str, list[int]]] | None = None,
) -> None:
    """The pipeline models (`pipeline` and the streaming `pipeline_stream`, prefixed by the manifest's
    prefix) with what they need from the checkpoint: tokenizer, scheduler config, manifest, and the engines'
    LoRA branch layers (`lora_targets`, {component: {path: base weight shape}}) when they have them; and the
    models one per repository: `pipeline_control`, which stops the jobs of every checkpoint's pipelines, and
    `lora_library`, which lists the server's LoRA files."""
    scheduler_config = json.loads((checkpoint / SCHEDULER_CONFIG).read_text())
    default = schedulers.choice_for_class(scheduler_config["_class_name"])
    for streaming in (False, True):
        config = pipeline_config(default, streaming, serving, manifest, token_table)
        model_dir = repository / config.name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        write_config(model_dir, config)
        shutil.copyfile(SOURCES / PIPELINE / "1" / "model.py", version / "model.py")
        shutil.rmtree(version / TOKENIZER_DIR, ignore_errors=True)
        shutil.copytree(checkpoint / TOKENIZER_DIR, version / TOKENIZER_DIR)
        (version / SCHEDULER_CONFIG).parent.mkdir(exist_ok=True)
        shutil.copyfile(checkpoint / SCHEDULER_CONFIG, version / SCHEDULER_CONFIG)
        manifest.write(version / PIPELINE_MANIFEST)
        (version / EMBEDDINGS_FILE).unlink(missing_ok=True)
        if token_table is not None:  # textual inversions the text encoder was built with
            (version / EMBEDDINGS_FILE).write_text(json.dumps(token_table, indent=1, sort_keys=True) + "\n")
        (version / LORA_TARGETS_FILE).unlink(missing_ok=True)
        if lora_targets is not None:
            (version / LORA_TARGETS_FILE).write_text(json.dumps(lora_targets) + "\n")
    for name, config in ((PIPELINE_CONTROL, control_config()), (LORA_LIBRARY, lora_library_config())):
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
        write_config(repository / name, config)
        shutil.copyfile(SOURCES / name / "1" / "model.py", repository / name / "1" / "model.py")


class Stage:
    """A build written beside the repository and moved into it at the end (`publish`): a build that
    fails leaves the repository as it was, and a server never loads a half-written model.

    The stage is a hidden sibling folder (the same filesystem, so the moves are renames). What a build
    only ever replaces whole and is costly to make (ONNX exports, TensorRT plans and their sidecars) is
    hard-linked in from the repository first, so an up-to-date export is still kept rather than redone;
    everything else is written afresh."""

    # Per model folder: what onnx_export.export_engine, tensorrt_engine.build_engine and
    # openvino_engine.convert_engine reuse when their
    # sidecar matches, and otherwise unlink or rename over (never write into: the link is the live file).
    REUSABLE = tuple(
        f"{folder}/{name}"
        # 1/lora, onnx/lora: the UNet's LoRA branch graph and plan (build-engines --lora)
        for folder in ("1", "onnx", "1/lora", "onnx/lora")
        for name in (
            "model.onnx",
            EXTERNAL_DATA,
            "model.onnx.json",
            "model.plan",
            "model.plan.json",
            *OPENVINO_FILES,
        )
    )

    def __init__(self, repository: Path, models: Sequence[str]) -> None:
        self.repository = repository
        repository.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{repository.name}.build-", dir=repository.parent))
        for model in models:
            for name in self.REUSABLE:
                built = repository / model / name
                if built.is_file():
                    (self.path / model / name).parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(built, self.path / model / name)

    def publish(self) -> None:
        """Move each model folder of the stage over the repository's; the ones they replace go into the
        stage, to be removed with it. Other models in the repository (other checkpoints) stay as they are."""
        self.repository.mkdir(exist_ok=True)
        replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.path))
        for staged in sorted(p for p in self.path.iterdir() if p.is_dir() and p != replaced):
            live = self.repository / staged.name
            if _same_filesystem(self.path, self.repository):
                if live.exists():
                    live.rename(replaced / staged.name)
                staged.rename(live)
            else:  # --output is a mount point: its parent, where the stage is, is another filesystem
                shutil.rmtree(live, ignore_errors=True)
                shutil.move(staged, live)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _same_filesystem(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _link_or_copy(source: Path, target: Path) -> None:
    if _same_filesystem(source.parent, target.parent):
        os.link(source, target)
    else:
        shutil.copy2(source, target)
